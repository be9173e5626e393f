"""FastGPT reading images: vision encoder -> projector -> placeholder tokens of a FastGPT language model.

Transformers' LLaVA pattern: `FastGPTVLModel` holds `vision_tower` (any `AutoModel` vision encoder),
`multi_modal_projector` (`FastGPTVLProjector`, the trainable adapter) and `language_model` (a `FastGPTModel`,
built from `config.text_config` alone); `FastGPTForConditionalGeneration` adds the `lm_head`. Each image's patch
features `[image_seq_length, vision hidden]` are projected to `[image_seq_length, text hidden]` and written over the
embeddings of its `image_seq_length` placeholder tokens (`config.image_token_id`), in order. `generate()` encodes the
images once before prefill (`get_image_features`) and decodes with FastGPT's own cache (`FastGPTGenerationMixin`).
"""

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.models.auto import AutoModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from ..modeling_fastgpt import FastGPTGenerationMixin
from .configuration_fastgpt_vl import FastGPTVLConfig


class FastGPTVLProjector(nn.Module):
    """Patch features `[..., vision hidden]` -> language-model embeddings `[..., text hidden]`: linear, act, linear."""

    def __init__(self, config: FastGPTVLConfig):
        super().__init__()
        vision_size, text_size = config.vision_config.hidden_size, config.text_config.hidden_size
        self.linear_1 = nn.Linear(vision_size, text_size, bias=config.multimodal_projector_bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(text_size, text_size, bias=config.multimodal_projector_bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


class FastGPTVLPreTrainedModel(PreTrainedModel):
    config: FastGPTVLConfig
    config_class = FastGPTVLConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["FastGPTDecoderLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """Both sub-models read their config's attention implementation at every call."""
        return True


class FastGPTVLModel(FastGPTVLPreTrainedModel):
    def __init__(self, config: FastGPTVLConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = FastGPTVLProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        """pixel_values `[N images, C, H, W]` -> the vision encoder's output, with `pooler_output` the projected
        features `[N images, image_seq_length, text hidden]` (in the language model's embedding space)."""
        kwargs.pop("output_hidden_states", None)
        pixel_values = pixel_values.to(self.vision_tower.dtype)
        image_outputs = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True, **kwargs)
        selected = image_outputs.hidden_states[self.config.vision_feature_layer]
        if self.config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]  # the class token
        image_outputs.pooler_output = self.multi_modal_projector(selected)
        return image_outputs

    def placeholder_mask(self, input_ids: torch.LongTensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Bool `[B, T]` of the image placeholders; their count must equal the features of the given images."""
        placeholder_mask = input_ids == self.config.image_token_id
        num_placeholders = int(placeholder_mask.sum())
        num_images = 0 if image_features is None else image_features.shape[0]
        features_per_image = self.config.image_seq_length
        if image_features is not None and image_features.shape[1] != features_per_image:
            raise ValueError(
                f"The vision encoder gives {image_features.shape[1]} features per image but config.image_seq_length "
                f"is {features_per_image}; set image_seq_length to {image_features.shape[1]} (and the processor's "
                "num_image_tokens with it)."
            )
        if num_placeholders != num_images * features_per_image:
            raise ValueError(
                f"The prompts hold {num_placeholders} image placeholder tokens (id {self.config.image_token_id}) but "
                f"{num_images} images need {num_images * features_per_image} ({features_per_image} per image). Put "
                "one '<image>' per image in the text and let FastGPTProcessor expand it, or pass one image per "
                f"{features_per_image} placeholder tokens."
            )
        return placeholder_mask

    def merge_image_features(self, input_ids: torch.LongTensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings `[B, T, text hidden]` with the placeholders replaced by image features, in order."""
        inputs_embeds = self.get_input_embeddings()(input_ids)
        placeholder_mask = self.placeholder_mask(input_ids, image_features)
        if image_features is None:
            return inputs_embeds
        image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(placeholder_mask[..., None], image_features)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MultimodalBaseModelOutputWithPast:
        """input_ids `[B, T]` with `image_seq_length` placeholders per image; pixel_values `[N images, C, H, W]` in
        the order of their placeholders (or `mm_encoder_outputs["image"]` already encoded, as `generate()` does)."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and (mm_encoder_outputs or {}).get("image") is not None:
            raise ValueError("Pass either pixel_values or mm_encoder_outputs['image'], not both.")
        image_outputs = (mm_encoder_outputs or {}).get("image")
        if image_outputs is None and pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values=pixel_values)
        image_features = None if image_outputs is None else image_outputs.pooler_output
        is_prefill = cache is None or cache.get_seq_length() == 0
        if inputs_embeds is None and (is_prefill or image_features is not None):
            inputs_embeds = self.merge_image_features(input_ids, image_features)
        elif inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        elif image_features is not None:
            raise ValueError("Images need input_ids to place them; pass input_ids instead of inputs_embeds.")
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        return MultimodalBaseModelOutputWithPast(**outputs, image_outputs=image_outputs)


class FastGPTForConditionalGeneration(FastGPTVLPreTrainedModel, FastGPTGenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: FastGPTVLConfig):
        super().__init__(config)
        self.model = FastGPTVLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(
        self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        """See `FastGPTVLModel.get_image_features`."""
        return self.model.get_image_features(pixel_values=pixel_values, **kwargs)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MultimodalCausalLMOutputWithPast:
        """As `FastGPTVLModel.forward`; labels `[B, T]` (-100 where no loss, e.g. on placeholders and the prompt)."""
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            vocab_size = self.config.text_config.vocab_size
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)
        return MultimodalCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
        )


__all__ = ["FastGPTForConditionalGeneration", "FastGPTVLModel", "FastGPTVLPreTrainedModel", "FastGPTVLProjector"]
