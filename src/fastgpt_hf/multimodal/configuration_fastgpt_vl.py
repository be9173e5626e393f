"""`FastGPTVLConfig`: a FastGPT language model (`text_config`) reading a Transformers vision encoder (`vision_config`).

The composite follows Transformers' LLaVA configuration: the vision encoder is any config `AutoModel` can build
(SigLIP, ViT, CLIP vision towers; SigLIP by default), the text model is a `FastGPTConfig` and never sees the
vision config. Each image becomes `image_seq_length` placeholder tokens (`image_token_id`) in the prompt, one per
patch feature the projector writes into the language model's embedding space.
"""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.models.auto.configuration_auto import AutoConfig

from ..configuration_fastgpt import FastGPTConfig

FEATURE_SELECT_STRATEGIES = ("default", "full")


@strict
class FastGPTVLConfig(PreTrainedConfig):
    r"""
    Configuration of `FastGPTForConditionalGeneration`.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            The vision encoder's config; a dict needs a `model_type` known to `AutoConfig`. Defaults to a
            `siglip_vision_model` of SigLIP-base size.
        text_config (`dict` or `FastGPTConfig`, *optional*):
            The language model's config.
        image_token_id (`int`, defaults to 3):
            Token id of the image placeholder; the processor expands one `<image>` into `image_seq_length` of them.
        image_seq_length (`int`, defaults to 196):
            Placeholder tokens per image: the vision encoder's patch count (minus its class token under "default").
        projector_hidden_act (`str`, defaults to `"gelu"`):
            Activation between the projector's two linear layers.
        vision_feature_select_strategy (`str`, defaults to `"full"`):
            `"full"` keeps every output position of the vision encoder; `"default"` drops the first one (the class
            token of ViT and CLIP encoders; SigLIP has none).
        vision_feature_layer (`int`, defaults to -1):
            Hidden state of the vision encoder read by the projector (-1: the last layer).
        multimodal_projector_bias (`bool`, defaults to `True`):
            Whether the projector's linear layers have biases.
    """

    model_type = "fastgpt_vl"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
        "text_config": SubConfigSpec(config_class=FastGPTConfig),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 3
    image_seq_length: int = 196
    projector_hidden_act: str = "gelu"
    vision_feature_select_strategy: Literal["default", "full"] = "full"
    vision_feature_layer: int = -1
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.vision_feature_select_strategy not in FEATURE_SELECT_STRATEGIES:
            raise ValueError(
                f"vision_feature_select_strategy must be one of {list(FEATURE_SELECT_STRATEGIES)}, "
                f"got {self.vision_feature_select_strategy!r}."
            )
        if not 0 <= self.image_token_id < self.text_config.vocab_size:
            raise ValueError(
                f"image_token_id ({self.image_token_id}) must be a token of the language model "
                f"(0 <= id < text_config.vocab_size = {self.text_config.vocab_size}); add the placeholder to the "
                "tokenizer and use its id."
            )
        if self.image_seq_length <= 0:
            raise ValueError(f"image_seq_length must be a positive integer, got {self.image_seq_length}.")
        self.tie_word_embeddings = self.text_config.tie_word_embeddings


__all__ = ["FastGPTVLConfig"]
