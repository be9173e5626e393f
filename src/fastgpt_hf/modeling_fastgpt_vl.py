"""FastGPT reading images: vision encoder -> projector -> placeholder tokens of a FastGPT language model.

Transformers' LLaVA pattern: `FastGPTVLModel` holds `vision_tower` (any `AutoModel` vision encoder),
`multi_modal_projector` (`FastGPTVLProjector`, the trainable adapter) and `language_model` (a `FastGPTModel`,
built from `config.text_config` alone); `FastGPTForConditionalGeneration` adds the `lm_head`. Each image's patch
features `[image_seq_length, vision hidden]` are projected to `[image_seq_length, text hidden]` and written over the
embeddings of its `image_seq_length` placeholder tokens (`config.image_token_id`), in order. A video `[F, C, H, W]`
goes through the same encoder frame by frame; each frame's patch grid is average-pooled by `config.video_pool_size`,
projected, and offset by a learned embedding of the frame's index (`video_frame_embedding`), giving
`F * config.video_tokens_per_frame` features for its placeholders (`config.video_token_id`). Image and video prompts
may share a batch. `generate()` encodes the pixels once before prefill (`get_image_features`, `get_video_features`)
and decodes with FastGPT's own cache (`FastGPTGenerationMixin`).
"""

import math

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.models.auto import AutoModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .checkpoints import FastGPTCheckpointMixin
from .configuration_fastgpt_vl import FastGPTVLConfig
from .generation_fastgpt import FastGPTGenerationMixin
from .input_checks import check_inputs
from .modeling_fastgpt import FastGPTLanguageModelingHead, FastGPTModel


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


def pool_frame_patches(patch_features: torch.Tensor, pool_size: int) -> torch.Tensor:
    """`[M, P, D]` patch features of a square g x g grid -> `[M, (g // pool_size) ** 2, D]`, each the mean of
    `pool_size` x `pool_size` neighbouring patches (a remainder at the grid's edge is dropped)."""
    grid = math.isqrt(patch_features.shape[1])
    if grid * grid != patch_features.shape[1] or grid < pool_size:
        raise ValueError(
            f"Video frames need a square patch grid of at least video_pool_size={pool_size} per side; the vision "
            f"encoder gives {patch_features.shape[1]} patches per frame (with vision_feature_select_strategy "
            "'default' the first position is dropped as a class token)."
        )
    grid_features = patch_features.transpose(1, 2).unflatten(2, (grid, grid))  # [M, D, g, g]
    return nn.functional.avg_pool2d(grid_features, pool_size).flatten(2).transpose(1, 2)


class FastGPTVLPreTrainedModel(FastGPTCheckpointMixin, PreTrainedModel):
    config: FastGPTVLConfig
    config_class = FastGPTVLConfig
    base_model_prefix = "model"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["FastGPTDecoderLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    checkpoint_auto_classes = {
        "AutoModel": "FastGPTVLModel",
        "AutoModelForImageTextToText": "FastGPTForConditionalGeneration",
    }

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """Both sub-models read their config's attention implementation at every call."""
        return True


class FastGPTVLModel(FastGPTVLPreTrainedModel):
    def __init__(self, config: FastGPTVLConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = FastGPTVLProjector(config)
        self.language_model = FastGPTModel(config.text_config)
        self.video_frame_embedding = None
        if config.video_token_id is not None:
            self.video_frame_embedding = nn.Embedding(config.max_video_frames, config.text_config.hidden_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def select_vision_features(
        self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> tuple[BaseModelOutputWithPooling, torch.Tensor]:
        """pixel_values `[N, C, H, W]` -> the encoder's output and its patch features `[N, P, vision hidden]`."""
        vision = self.config.vision_config
        expected = (vision.num_channels, vision.image_size, vision.image_size)
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1:] != expected:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(
                f"pixel_values must be a tensor [images, {', '.join(map(str, expected))}] (the vision encoder's "
                f"channels and image_size); got {got}. Prepare images with the model's processor (FastGPTProcessor)."
            )
        kwargs.pop("output_hidden_states", None)
        pixel_values = pixel_values.to(self.vision_tower.dtype)
        outputs = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True, **kwargs)
        selected = outputs.hidden_states[self.config.vision_feature_layer]
        if self.config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]  # the class token
        return outputs, selected

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        """pixel_values `[N images, C, H, W]` -> the vision encoder's output, with `pooler_output` the projected
        features `[N images, image_seq_length, text hidden]` (in the language model's embedding space)."""
        image_outputs, selected = self.select_vision_features(pixel_values, **kwargs)
        if selected.shape[1] != self.config.image_seq_length:
            raise ValueError(
                f"The vision encoder gives {selected.shape[1]} features per image but config.image_seq_length is "
                f"{self.config.image_seq_length}; set image_seq_length to {selected.shape[1]} (and the processor's "
                "num_image_tokens with it)."
            )
        image_outputs.pooler_output = self.multi_modal_projector(selected)
        return image_outputs

    @can_return_tuple
    def get_video_features(
        self, pixel_values_videos: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        """pixel_values_videos `[N videos, F, C, H, W]` -> the vision encoder's output over the N * F frames, with
        `pooler_output` `[N videos, F * tokens_per_frame, text hidden]`: each frame's patches pooled, projected and
        marked with the frame's order embedding, frame after frame."""
        if self.video_frame_embedding is None:
            raise ValueError("This model reads no video: config.video_token_id is None; set it to the video token.")
        num_videos, num_frames = pixel_values_videos.shape[:2]
        if num_frames > self.config.max_video_frames:
            raise ValueError(
                f"The videos have {num_frames} frames, more than config.max_video_frames={self.config.max_video_frames}"
                "; sample fewer frames (the processor's num_frames)."
            )
        video_outputs, selected = self.select_vision_features(pixel_values_videos.flatten(0, 1), **kwargs)
        pooled = pool_frame_patches(selected, self.config.video_pool_size)  # [N * F, tokens_per_frame, vision]
        projected = self.multi_modal_projector(pooled).unflatten(0, (num_videos, num_frames))
        frame_order = self.video_frame_embedding(torch.arange(num_frames, device=projected.device))  # [F, text]
        video_outputs.pooler_output = (projected + frame_order[None, :, None].to(projected.dtype)).flatten(1, 2)
        return video_outputs

    def placeholder_mask(
        self, input_ids: torch.LongTensor, modality: str, token_id: int, features: torch.Tensor | None
    ) -> torch.Tensor:
        """Bool `[B, T]` of one modality's placeholders; their count must equal the given features
        `[N inputs, tokens per input, hidden]`."""
        placeholder_mask = input_ids == token_id
        num_placeholders = int(placeholder_mask.sum())
        num_inputs, tokens_per_input = (0, 0) if features is None else features.shape[:2]
        if num_placeholders != num_inputs * tokens_per_input:
            raise ValueError(
                f"The prompts hold {num_placeholders} {modality} placeholder tokens (id {token_id}) but "
                f"{num_inputs} {modality}s need {num_inputs * tokens_per_input} ({tokens_per_input} per {modality}). "
                f"Put one '<{modality}>' per {modality} in the text and let FastGPTProcessor expand it, and give "
                f"every {modality} (and, for videos, the number of frames the prompt was built for)."
            )
        return placeholder_mask

    def merge_multimodal_features(
        self,
        input_ids: torch.LongTensor,
        image_features: torch.Tensor | None,
        video_features: torch.Tensor | None,
    ) -> torch.Tensor:
        """Token embeddings `[B, T, text hidden]` with each modality's placeholders replaced by its features, in
        order; image and video prompts may share a batch."""
        inputs_embeds = self.get_input_embeddings()(input_ids)
        modalities = (
            ("image", self.config.image_token_id, image_features),
            ("video", self.config.video_token_id, video_features),
        )
        for modality, token_id, features in modalities:
            if token_id is None:
                continue
            placeholder_mask = self.placeholder_mask(input_ids, modality, token_id, features)
            if features is not None:
                features = features.to(inputs_embeds.device, inputs_embeds.dtype)
                inputs_embeds = inputs_embeds.masked_scatter(placeholder_mask[..., None], features)
        return inputs_embeds

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MultimodalBaseModelOutputWithPast:
        """input_ids `[B, T]` with `image_seq_length` placeholders per image and `F * tokens_per_frame` per video;
        pixel_values `[N images, C, H, W]` and pixel_values_videos `[N videos, F, C, H, W]` in the order of their
        placeholders (or `mm_encoder_outputs["image"]` / `["video"]` already encoded, as `generate()` does).
        The ids and mask are checked (`check_inputs`) before any pixel is encoded or any id embedded."""
        check_inputs(input_ids, inputs_embeds, attention_mask, cache, self.config.text_config)
        encoded = dict(mm_encoder_outputs or {})
        for modality, pixels, encode in (
            ("image", pixel_values, self.get_image_features),
            ("video", pixel_values_videos, self.get_video_features),
        ):
            if pixels is not None and encoded.get(modality) is not None:
                raise ValueError(f"Pass either the {modality} pixels or mm_encoder_outputs[{modality!r}], not both.")
            if pixels is not None:
                encoded[modality] = encode(pixels)
        image_features = None if encoded.get("image") is None else encoded["image"].pooler_output
        video_features = None if encoded.get("video") is None else encoded["video"].pooler_output
        has_features = image_features is not None or video_features is not None
        is_prefill = cache is None or cache.get_seq_length() == 0
        if inputs_embeds is None and (is_prefill or has_features):
            inputs_embeds = self.merge_multimodal_features(input_ids, image_features, video_features)
        elif inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        elif has_features:
            raise ValueError("Images and videos need input_ids to place them; pass input_ids, not inputs_embeds.")
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        return MultimodalBaseModelOutputWithPast(
            **outputs, image_outputs=encoded.get("image"), video_outputs=encoded.get("video")
        )


class FastGPTForConditionalGeneration(FastGPTVLPreTrainedModel, FastGPTLanguageModelingHead, FastGPTGenerationMixin):
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

    def get_video_features(
        self, pixel_values_videos: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        """See `FastGPTVLModel.get_video_features`."""
        return self.model.get_video_features(pixel_values_videos=pixel_values_videos, **kwargs)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
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
            pixel_values_videos=pixel_values_videos,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        logits, loss = self.logits_and_loss(outputs.last_hidden_state, labels, logits_to_keep, **kwargs)
        return MultimodalCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
            video_outputs=outputs.video_outputs,
        )


__all__ = [
    "FastGPTForConditionalGeneration",
    "FastGPTVLModel",
    "FastGPTVLPreTrainedModel",
    "FastGPTVLProjector",
    "pool_frame_patches",
]
