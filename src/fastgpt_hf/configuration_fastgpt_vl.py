"""`FastGPTVLConfig`: a FastGPT language model (`text_config`) reading a Transformers vision encoder (`vision_config`).

The composite follows Transformers' LLaVA configuration: the vision encoder is any config `AutoModel` can build
(SigLIP, ViT, CLIP vision towers; SigLIP by default), the text model is a `FastGPTConfig` and never sees the
vision config. Each image becomes `image_seq_length` placeholder tokens (`image_token_id`) in the prompt, one per
patch feature the projector writes into the language model's embedding space. A video becomes, per frame, its patch
features average-pooled over `video_pool_size` x `video_pool_size` patches, projected by the same projector and
marked with a learned frame-order embedding: `num_frames * tokens_per_frame` placeholders (`video_token_id`).
"""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.models.auto.configuration_auto import AutoConfig

from .configuration_fastgpt import FastGPTConfig

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
        video_token_id (`int`, *optional*):
            Token id of the video placeholder; None for a model that reads no video.
        video_pool_size (`int`, defaults to 2):
            Side of the square of patches averaged into one video token: a 14 x 14 patch grid pooled by 2 gives
            7 x 7 = 49 tokens per frame.
        max_video_frames (`int`, defaults to 1024):
            Frames the learned frame-order embedding covers; longer videos are an error.
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
    video_token_id: int | None = None
    video_pool_size: int = 2
    max_video_frames: int = 1024

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.vision_feature_select_strategy not in FEATURE_SELECT_STRATEGIES:
            raise ValueError(
                f"vision_feature_select_strategy must be one of {list(FEATURE_SELECT_STRATEGIES)}, "
                f"got {self.vision_feature_select_strategy!r}."
            )
        for field in ("image_token_id", "video_token_id"):
            token_id = getattr(self, field)
            if token_id is not None and not 0 <= token_id < self.text_config.vocab_size:
                raise ValueError(
                    f"{field} ({token_id}) must be a token of the language model "
                    f"(0 <= id < text_config.vocab_size = {self.text_config.vocab_size}); add the placeholder to "
                    "the tokenizer and use its id."
                )
        for field in ("image_seq_length", "video_pool_size", "max_video_frames"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be a positive integer, got {getattr(self, field)}.")
        encoder_outputs = self.vision_config.num_hidden_layers + 1  # the embeddings, then each layer
        if not -encoder_outputs <= self.vision_feature_layer < encoder_outputs:
            raise ValueError(
                f"vision_feature_layer ({self.vision_feature_layer}) must index the vision encoder's "
                f"{encoder_outputs} hidden states: from {-encoder_outputs} to {encoder_outputs - 1}."
            )
        if self.projector_hidden_act not in ACT2FN:
            raise ValueError(
                f"projector_hidden_act {self.projector_hidden_act!r} is not one of Transformers' activations: "
                f"{sorted(ACT2FN)}."
            )
        self.tie_word_embeddings = self.text_config.tie_word_embeddings

    @property
    def video_tokens_per_frame(self) -> int:
        """Placeholders per video frame: the encoder's square patch grid (`image_size // patch_size` per side, as in
        SigLIP, ViT and CLIP) pooled by `video_pool_size`."""
        grid = self.vision_config.image_size // self.vision_config.patch_size
        return (grid // self.video_pool_size) ** 2

    def max_frames_in_context(self, prompt_tokens: int) -> int:
        """The most frames one video can have beside `prompt_tokens` other tokens within `max_position_embeddings`."""
        free_positions = self.text_config.max_position_embeddings - prompt_tokens
        return min(free_positions // self.video_tokens_per_frame, self.max_video_frames)


__all__ = ["FastGPTVLConfig"]
