"""Windowed attention through PyTorch's flex_attention with a block mask.

The block mask skips every 128 x 128 tile outside the window, so a sliding layer's work grows as T x window.
On CUDA the kernel is compiled once per process (flex_attention's fused kernel exists only compiled), or by the
caller's torch.compile when the model runs compiled; on the CPU flex_attention runs its unfused reference, which is
what the CPU tests use to check this mask.
"""

import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled once; dynamic shapes so that new lengths do not recompile."""
    return torch.compile(flex_attention, dynamic=True)


def flex_windowed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_is_real: torch.Tensor | None,
    window: int | None,
    scaling: float,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, None]:
    """Same contract as `eager_windowed_attention` (rule in `attention_masks`); returns `([B, T, H, D], None)`."""
    if dropout > 0:
        raise ValueError("flex_attention has no attention dropout; set attention_dropout=0.0 or use 'sdpa'.")
    batch, _, query_length, _ = query.shape
    key_length = key.shape[2]
    query_offset = key_length - query_length

    def visible(batch_index, head_index, query_index, key_index):
        query_position = query_index + query_offset
        seen = key_index <= query_position
        if window is not None:
            seen = seen & (query_position - key_index < window)
        if key_is_real is not None:
            seen = seen & (key_is_real[batch_index, key_index] | (key_index == query_position))
        return seen

    mask_batch = batch if key_is_real is not None else None
    block_mask = create_block_mask(
        visible, mask_batch, None, query_length, key_length, device=query.device, _compile=query.is_cuda
    )
    # Inside an outer torch.compile (a compiled model or decode step) flex_attention is traced as it is; calling the
    # separately compiled one there fails, as Transformers' own flex integration notes.
    attend = compiled_flex_attention() if query.is_cuda and not torch.compiler.is_compiling() else flex_attention
    output = attend(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=True)
    return output.transpose(1, 2), None
