"""The visibility rule of windowed causal attention, written once as a dense boolean mask.

Layout contract shared by every windowed backend: queries are the last T of the S keys, so query t sits at key
index `S - T + t` (the cache returns its kept past followed by the new tokens). Query t sees key s when

    s <= S - T + t                      (causal)
    S - T + t - s < window              (sliding window of `window` keys, itself included; None = unbounded)
    key_is_real[s] or s == S - T + t    (padding is never seen; a padding query sees itself so no row is empty)

The last clause keeps softmax finite on padding rows; their outputs are never read, because padding keys are
masked everywhere and padding tokens are left out of the compressed blocks.
"""

import torch


def windowed_visibility(
    query_length: int, key_is_real: torch.Tensor | None, key_length: int, window: int | None, device: torch.device
) -> torch.Tensor:
    """Boolean mask `[B or 1, 1, T, S]`, True where query t may attend key s.

    Args:
        query_length: T, the number of queries (the last T of the keys).
        key_is_real: `[B, S]` bool, False at padding; None when every key is real.
        key_length: S.
        window: keys seen per query, itself included; None for full causal attention.
    """
    query_index = torch.arange(key_length - query_length, key_length, device=device)[:, None]
    key_index = torch.arange(key_length, device=device)[None, :]
    visible = key_index <= query_index
    if window is not None:
        visible = visible & (query_index - key_index < window)
    if key_is_real is None:
        return visible[None, None]
    return visible[None, None] & (key_is_real[:, None, None, :] | (key_index == query_index)[None, None])
