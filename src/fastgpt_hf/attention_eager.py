"""Eager windowed attention: the dense score matrix, masked, softmaxed. Readable, O(T x S) memory."""

import torch
from torch import nn

from .attention_masks import windowed_visibility


def eager_windowed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_is_real: torch.Tensor | None,
    window: int | None,
    scaling: float,
    dropout: float = 0.0,
    num_sink_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Windowed causal attention (rule in `attention_masks`).

    Args:
        query: `[B, H, T, D]`; key, value: `[B, K, S, D]` with H a multiple of K.
        key_is_real: `[B, S]` bool or None.
        num_sink_tokens: each row's first real keys that every windowed query also sees (0: none).
    Returns:
        output `[B, T, H, D]` and the attention weights `[B, H, T, S]`.
    """
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    visible = windowed_visibility(query.shape[2], key_is_real, key.shape[2], window, query.device, num_sink_tokens)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=dropout > 0)
    return torch.matmul(weights, value).transpose(1, 2), weights
