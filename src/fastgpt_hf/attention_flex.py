"""Windowed attention through PyTorch's flex_attention with a block mask.

The block mask skips every 128 x 128 tile outside the window, so a sliding layer's work grows as T x window.
On CUDA the kernel is compiled once per process (flex_attention's fused kernel exists only compiled), or by the
caller's torch.compile when the model runs compiled. An unpadded call's block mask depends on the window, the
sink count and the shape alone: it is built once and shared by the layers (`unpadded_block_mask`), as Transformers
builds one mask per window per forward for Gemma 3; on the CPU flex_attention runs its unfused reference, which is
what the CPU tests use to check this mask.
"""

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .attention_masks import windowed_mask_function


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
    num_sink_tokens: int = 0,
) -> tuple[torch.Tensor, None]:
    """Same contract as `eager_windowed_attention` (rule in `attention_masks`); returns `([B, T, H, D], None)`."""
    if dropout > 0:
        raise ValueError("flex_attention has no attention dropout; set attention_dropout=0.0 or use 'sdpa'.")
    batch, _, query_length, _ = query.shape
    key_length = key.shape[2]
    if key_is_real is None and not torch.compiler.is_compiling():
        block_mask = unpadded_block_mask(window, query_length, key_length, query.device, num_sink_tokens)
    else:
        visible = windowed_mask_function(window, key_is_real, key_length - query_length, num_sink_tokens)
        mask_batch = batch if key_is_real is not None else None
        block_mask = create_block_mask(
            visible, mask_batch, None, query_length, key_length, device=query.device, _compile=query.is_cuda
        )
    # Inside an outer torch.compile (a compiled model or decode step) flex_attention is traced as it is; calling the
    # separately compiled one there fails, as Transformers' own flex integration notes.
    attend = compiled_flex_attention() if query.is_cuda and not torch.compiler.is_compiling() else flex_attention
    output = attend(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=True)
    return output.transpose(1, 2), None


@functools.lru_cache(maxsize=16)
def unpadded_block_mask(
    window: int | None, query_length: int, key_length: int, device: torch.device, num_sink_tokens: int
) -> BlockMask:
    """The block mask of an unpadded call, built once per window, sink count and shape and shared by every layer of
    that window and every later call of that shape: building one costs far more than the kernel at a few thousand
    tokens. Compiled code builds its own, which inductor folds into the graph."""
    visible = windowed_mask_function(window, None, key_length - query_length, num_sink_tokens)
    on_cuda = device.type == "cuda"
    return create_block_mask(visible, None, None, query_length, key_length, device=device, _compile=on_cuda)
