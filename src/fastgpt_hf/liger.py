"""FastGPT in Liger-Kernel: `apply_liger_kernel_to_fastgpt`, which `Trainer(use_liger_kernel=True)` calls.

Liger (`pip install "fastgpt_hf[liger]"`) finds a model's patch function by `config.model_type` in
`MODEL_TYPE_TO_APPLY_LIGER_FN`; importing this module adds "fastgpt" and "fastgpt_vl" (the captioning model, whose
language model gets the kernels) there. `import fastgpt_hf` does not import it: `liger_registration` has it
imported when Liger loads that table.

`apply_liger_kernel_to_fastgpt` is `apply_liger_kernel_to_llama` for FastGPT, with Liger's own modules and
functions: the RMSNorms run `LigerRMSNorm`, the MLPs `LigerSwiGLUMLP`, rotary `liger_rotary_pos_emb`, and in
training with labels the loss comes from Liger's fused linear cross-entropy, which never builds the
`[B, T, vocab]` logits. Attention itself and the dynamic layers' global branch (memory slots, `compress_k`,
`compress_v`, `mix_gate`: the float32 parts, `_keep_in_fp32_modules`) are left as they are.
"""

import sys
from types import MethodType

import torch
from liger_kernel.transformers.model.llama import lce_maybe_trainable_lm_head
from liger_kernel.transformers.model.loss_utils import unpack_cross_entropy_result
from liger_kernel.transformers.monkey_patch import (
    MODEL_TYPE_TO_APPLY_LIGER_FN,
    _patch_rms_norm_module,
    _patch_swiglu_module,
)
from liger_kernel.transformers.rms_norm import LigerRMSNorm
from liger_kernel.transformers.rope import liger_rotary_pos_emb
from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
from transformers import PreTrainedModel
from transformers.modeling_utils import slice_logits_to_keep

from . import modeling_fastgpt
from .configuration_fastgpt import FastGPTConfig
from .configuration_fastgpt_vl import FastGPTVLConfig
from .modeling_fastgpt import FastGPTForCausalLM, FastGPTLanguageModelingHead
from .modeling_fastgpt_vl import FastGPTForConditionalGeneration

# Liger's SwiGLU kernel computes silu(gate) * up.
SWIGLU_ACTIVATIONS = ("silu", "swish")


def apply_liger_kernel_to_fastgpt(
    rope: bool = True,
    swiglu: bool = True,
    rms_norm: bool = True,
    fused_linear_cross_entropy: bool = True,
    model: PreTrainedModel | None = None,
) -> None:
    """Liger's kernels in a FastGPT model, as `apply_liger_kernel_to_llama` does for Llama.

    Args:
        rope: rotary position embedding by Liger's kernel (`liger_rotary_pos_emb_on_copies`). Like Liger's Llama
            patch, this replaces the modeling module's `apply_rotary_pos_emb`, so every FastGPT model of the
            process uses it from then on.
        swiglu: the MLPs (`gate_proj`, `up_proj`, `down_proj`) through Liger's SiLU-and-multiply kernel; needs
            `hidden_act` "silu".
        rms_norm: every RMSNorm (`input_layernorm`, `post_attention_layernorm`, the final `norm`) by Liger's.
        fused_linear_cross_entropy: in training with labels, the loss from `lm_head` and the labels in chunks,
            without the logits (the output's `logits` is then None); elsewhere the model's own head.
        model: a FastGPT model already built (what Trainer passes): its modules are patched in place. Without
            it, the classes are patched so that models built afterwards get the kernels (Liger's MLP module has
            no biases: leave `swiglu` off for `mlp_bias` models in that case).
    """
    if model is None:
        patch_classes(rope, swiglu, rms_norm, fused_linear_cross_entropy)
        return
    # The FastGPTModel inside: the model itself, `model.model`, or the captioning model's `language_model`.
    language_model = model.get_decoder()
    if swiglu and language_model.config.hidden_act not in SWIGLU_ACTIVATIONS:
        raise ValueError(
            f"Liger's SwiGLU kernel computes silu, and this model's hidden_act is "
            f"{language_model.config.hidden_act!r}: pass swiglu=False"
            " (Trainer: liger_kernel_config={'swiglu': False})."
        )
    if rope:
        # The module that holds the attention classes: this package's, or a checkpoint's copy (trust_remote_code).
        sys.modules[type(language_model).__module__].apply_rotary_pos_emb = liger_rotary_pos_emb_on_copies
    if rms_norm:
        _patch_rms_norm_module(language_model.norm)
    for decoder_layer in language_model.layers:
        if swiglu:
            _patch_swiglu_module(decoder_layer.mlp, LigerSwiGLUMLP)
        if rms_norm:
            _patch_rms_norm_module(decoder_layer.input_layernorm)
            _patch_rms_norm_module(decoder_layer.post_attention_layernorm)
    if fused_linear_cross_entropy and hasattr(model, "logits_and_loss"):
        model.logits_and_loss = MethodType(fused_linear_cross_entropy_logits_and_loss, model)


def patch_classes(rope: bool, swiglu: bool, rms_norm: bool, fused_linear_cross_entropy: bool) -> None:
    """`apply_liger_kernel_to_fastgpt` without a model: the classes of this package's modeling modules."""
    if rope:
        modeling_fastgpt.apply_rotary_pos_emb = liger_rotary_pos_emb_on_copies
    if rms_norm:
        modeling_fastgpt.FastGPTRMSNorm = LigerRMSNorm
    if swiglu:
        modeling_fastgpt.FastGPTMLP = LigerSwiGLUMLP
    if fused_linear_cross_entropy:
        FastGPTForCausalLM.logits_and_loss = fused_linear_cross_entropy_logits_and_loss
        FastGPTForConditionalGeneration.logits_and_loss = fused_linear_cross_entropy_logits_and_loss


def liger_rotary_pos_emb_on_copies(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`modeling_fastgpt.apply_rotary_pos_emb` by Liger's kernel: query `[B, H, T, D]`, key `[B, K, T, D]`, cos,
    sin `[B or 1, T, D]`. The kernel writes its result over its inputs, and a dynamic layer's global branch still
    reads the query and key before rotary, so it gets copies."""
    return liger_rotary_pos_emb(query.clone(), key.clone(), cos, sin)


def fused_linear_cross_entropy_logits_and_loss(
    self: PreTrainedModel,
    hidden_states: torch.Tensor,
    labels: torch.LongTensor | None,
    logits_to_keep: int | torch.Tensor = 0,
    skip_logits: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`FastGPTLanguageModelingHead.logits_and_loss` with Liger's fused linear cross-entropy, chosen as Liger's
    Llama forward chooses: without logits (None) when `skip_logits`, which defaults to training with labels (or
    `shift_labels`); Trainer passes True when it evaluates the loss alone. hidden_states `[B, T, hidden]`."""
    shift_labels = kwargs.pop("shift_labels", None)
    has_labels = labels is not None or shift_labels is not None
    if skip_logits and not has_labels:
        raise ValueError("skip_logits=True computes the loss alone: pass labels (or shift_labels).")
    if skip_logits is None:
        skip_logits = self.training and has_labels
    if not skip_logits:
        if shift_labels is not None:
            kwargs["shift_labels"] = shift_labels
        return FastGPTLanguageModelingHead.logits_and_loss(self, hidden_states, labels, logits_to_keep, **kwargs)
    result = lce_maybe_trainable_lm_head(
        self,
        hidden_states=slice_logits_to_keep(hidden_states, logits_to_keep),
        hidden_size=hidden_states.shape[-1],
        labels=labels,
        shift_labels=shift_labels,
        **kwargs,
    )
    loss = unpack_cross_entropy_result(result)[0]
    return None, loss


for model_type in (FastGPTConfig.model_type, FastGPTVLConfig.model_type):
    MODEL_TYPE_TO_APPLY_LIGER_FN[model_type] = apply_liger_kernel_to_fastgpt

__all__ = ["apply_liger_kernel_to_fastgpt"]
