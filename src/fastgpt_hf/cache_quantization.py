"""Int8 keys and values of the static cache (`FastGPTStaticCache(..., kv_quantization="int8")`).

Each key and value vector (one row, key/value head and slot: the D numbers of a head) is stored as D int8 numbers
and one float32 scale, symmetric: `scale = max |x| / 127`, `q = round(x / scale)`, `x ~ q * scale`, so that
`|x - q * scale| <= scale / 2 = max |x| / 254` for every element. A vector's quantization depends on that vector
alone: a token is quantized once, when the cache writes it, the same whatever the chunks it came in. The cache then
holds D + 4 bytes per vector instead of 2 D (bf16): 0.52 of it at D = 128.

`QuantizedStates` is what a quantized static layer hands the attention in a one-token step (its int8 buffer and
scales, read by `attention_quantized`); a longer step gets keys and values dequantized to the model's dtype
(`dequantize`). `dequantize(..., torch.float64)` is the readable reference the tests hold both to.
"""

from typing import NamedTuple

import torch

# What `kv_quantization` takes: None (keys and values in the model's dtype) or "int8".
KV_QUANTIZATIONS = (None, "int8")
INT8_LIMIT = 127  # symmetric: -127 ... 127, so that -x quantizes to -q


def check_kv_quantization(kv_quantization: str | None) -> None:
    """Raise a ValueError naming the allowed values unless `kv_quantization` is one of `KV_QUANTIZATIONS`."""
    if kv_quantization not in KV_QUANTIZATIONS:
        raise ValueError(
            f"kv_quantization={kv_quantization!r} is not a key/value cache quantization FastGPT has; use one of "
            f"{list(KV_QUANTIZATIONS)} (None: keys and values in the model's dtype; 'int8': int8 with a float32 "
            "scale per row, key/value head and slot)."
        )


class QuantizedStates(NamedTuple):
    """Keys or values as a quantized cache holds them: `data` int8 `[B, K, S, D]` and `scale` float32 `[B, K, S, 1]`,
    `data * scale` the states."""

    data: torch.Tensor
    scale: torch.Tensor


def quantize(states: torch.Tensor) -> QuantizedStates:
    """`[B, K, T, D]` states (any float dtype) -> int8 `[B, K, T, D]` and float32 scales `[B, K, T, 1]`: symmetric
    absmax over each vector's D numbers (module docstring). A vector of zeros gets scale 0 and int8 zeros. Computed in
    float32 (float64 for float64 states), whatever the states' dtype."""
    compute_dtype = torch.promote_types(states.dtype, torch.float32)
    scale = states.abs().amax(-1, keepdim=True).to(torch.float32) / INT8_LIMIT
    # Divide by the stored (float32) scale, so that `data * scale` is the nearest int8 multiple of what is kept.
    divisor = torch.where(scale > 0, scale, 1).to(compute_dtype)
    data = torch.round(states.to(compute_dtype) / divisor).clamp(-INT8_LIMIT, INT8_LIMIT).to(torch.int8)
    return QuantizedStates(data, scale)


def dequantize(quantized: QuantizedStates, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """`data * scale` in `dtype`, `[B, K, S, D]`: the product taken in float32 (float64 for float64), then cast. With
    the default float64, the exact values the cache stands for: the reference of the attention's quantized form."""
    compute_dtype = torch.promote_types(dtype, torch.float32)
    return (quantized.data.to(compute_dtype) * quantized.scale.to(compute_dtype)).to(dtype)


__all__ = ["KV_QUANTIZATIONS", "QuantizedStates", "check_kv_quantization", "dequantize", "quantize"]
