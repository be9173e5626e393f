"""A decode step's windowed attention over an int8 key/value cache (`cache_quantization`), read as int8.

One query per row and head, `[B, H, 1, D]`, over the `QuantizedStates` a quantized static layer returns in a
one-token step: int8 keys and values `[B, K, S, D]` with float32 scales `[B, K, S, 1]`. Written as elementwise
products and sums, not as a matmul or sdpa over dequantized copies, so that inductor fuses the int8 -> float
conversion and the scales into its two reductions: a step reads each cached element as its one byte, where a
matmul's operand would first be written out and read back in bf16 (5 bytes of traffic per element instead of 1).

    scores[b, k, g, s] = sum_d q[b, k, g, d] * key_int8[b, k, s, d] * key_scale[b, k, s] * scaling
    p = softmax over the visible s (`attention_masks.windowed_visibility`, as the sdpa path's decode mask)
    output[b, k, g, d] = sum_s p[b, k, g, s] * value_scale[b, k, s] * value_int8[b, k, s, d]

The G = H / K query heads that share key head k are folded onto it (`[B, K, G, 1, D]`): each reads its key head once.
Softmax and both sums run in float32 (float64 for float64 queries). Outside compiled code the products are materialized
(`[B, K, G, S, D]`): the form is for the compiled decode step; an eager step pays that memory for the length of one
layer's call.
"""

import torch

from .attention_masks import windowed_visibility
from .cache_quantization import QuantizedStates


def quantized_one_query_attention(
    query: torch.Tensor,
    keys: QuantizedStates,
    values: QuantizedStates,
    key_is_real: torch.Tensor | None,
    window: int | None,
    scaling: float,
    num_sink_tokens: int = 0,
) -> torch.Tensor:
    """Windowed attention of one query `[B, H, 1, D]` (the last of the S keys) over int8 keys and values (module
    docstring); `key_is_real` `[B, S]` bool or None, `window` and `num_sink_tokens` as in `attention_masks`.
    Returns `[B, 1, H, D]` in the query's dtype."""
    batch, heads, _, head_dim = query.shape
    kv_heads, key_length = keys.data.shape[1:3]
    compute_dtype = torch.promote_types(query.dtype, torch.float32)
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, 1, head_dim).to(compute_dtype)  # [B, K, G, 1, D]
    scores = (grouped * keys.data[:, :, None].to(compute_dtype)).sum(-1)  # [B, K, G, S]
    scores = scores * (keys.scale[:, :, None, :, 0].to(compute_dtype) * scaling)
    visible = windowed_visibility(1, key_is_real, key_length, window, query.device, num_sink_tokens)  # [B|1,1,1,S]
    probabilities = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    weights = probabilities * values.scale[:, :, None, :, 0].to(compute_dtype)  # [B, K, G, S]
    output = (weights[..., None] * values.data[:, :, None].to(compute_dtype)).sum(-2)  # [B, K, G, D]
    return output.to(query.dtype).reshape(batch, 1, heads, head_dim)
