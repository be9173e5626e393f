"""The captioning adapter recipe: LoRA on the language model, the projector fully trained, the vision encoder frozen.

LoRA targets FastGPT's attention (`q_proj`, `k_proj`, `v_proj`, `o_proj`) and MLP (`gate_proj`, `up_proj`,
`down_proj`) projections inside `model.language_model` only: the vision encoder has layers of the same names and
stays frozen. The projector (`multi_modal_projector`) is in `modules_to_save`, so it trains in full and is saved with
the adapter; `save_pretrained` on the PEFT model writes only these weights. The video recipe adds the frame-order
embedding (`video_frame_embedding`) to the fully trained modules; image and video adapters are separate PEFT adapters,
trained, saved and loaded apart (`PeftModel.from_pretrained(..., adapter_name=...)`, `load_adapter`).
"""

from peft import LoraConfig

LANGUAGE_MODEL_PROJECTIONS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def captioning_lora_config(rank: int = 16, alpha: int = 32, dropout: float = 0.0) -> LoraConfig:
    """A `LoraConfig` for `FastGPTForConditionalGeneration`: rank-`rank` LoRA on the language model's projections,
    the projector trainable and saved with the adapter."""
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=LANGUAGE_MODEL_PROJECTIONS,
        modules_to_save=["multi_modal_projector"],
    )


def video_lora_config(rank: int = 16, alpha: int = 32, dropout: float = 0.0) -> LoraConfig:
    """`captioning_lora_config` for videos: the frame-order embedding trains in full alongside the projector."""
    config = captioning_lora_config(rank, alpha, dropout)
    config.modules_to_save = ["multi_modal_projector", "video_frame_embedding"]
    return config


__all__ = ["LANGUAGE_MODEL_PROJECTIONS", "captioning_lora_config", "video_lora_config"]
