"""Who sees whom: FastGPT's visibility rules written once, as small mask functions composed the way Transformers'
`masking_utils` composes its own (and reusing its pieces: `and_masks`, `or_masks`, `causal_mask_function`,
`sliding_window_overlay`, `padding_mask_function`, `add_offsets_to_mask_function`).

A mask function takes `(batch_idx, head_idx, q_idx, kv_idx)` and says whether query q_idx may attend key kv_idx. The
same function serves every backend: flex_attention takes it as its `mask_mod`, and `dense_mask` evaluates it on
broadcast index grids into the boolean `[B or 1, 1, T, S]` mask of eager, sdpa and the float64 reference.

Windowed attention (every layer kind; DESIGN.md section 2). Layout contract shared by the windowed backends: queries
are the last T of the S keys, so query t sits at key index `S - T + t` (a cache returns its kept past followed by
the new tokens). Query t sees key s when

    s <= S - T + t                      (causal)
    S - T + t - s < window              (sliding window of `window` keys, itself included; None = unbounded)
        or s is a sink                  (attention sinks, `num_sink_tokens` N > 0: one of the row's first N real keys)
    key_is_real[s] or s == S - T + t    (padding is never seen; a padding query sees itself so no row is empty)

The last clause keeps softmax finite on padding rows; their outputs are never read, because padding keys are
masked everywhere and padding tokens are left out of the compressed blocks. The sinks are counted on the S keys as
given (`sink_token_mask`): the first N keys when every key is real. A cache that drops keys keeps each row's first
N real ones ahead of the rest (`cache_dynamic_layers.SinkTokens`; the static cache's sink slots, flagged real once their
token has left the window), so counting on its keys finds the same tokens, or, in the static cache's one-token step,
ring slots that are within the window anyway.

The global branch of a dynamic layer: its S = M + C keys are M memory slots, then C compressed blocks of b
positions. A query at position p sees every memory slot and block c once the block is complete
(`c * b + b - 1 <= p`) if it holds a real token.
"""

from collections.abc import Callable

import torch
from transformers.masking_utils import (
    add_offsets_to_mask_function,
    and_masks,
    causal_mask_function,
    or_masks,
    padding_mask_function,
    sliding_window_overlay,
)


def own_key_function(batch_idx, head_idx, q_idx, kv_idx):
    """The query's own key (both indices on the keys' axis)."""
    return kv_idx == q_idx


def sink_token_mask(key_is_real: torch.Tensor, num_sink_tokens: int) -> torch.Tensor:
    """`[B, S]` bool: each row's first `num_sink_tokens` real keys (`key_is_real` `[B, S]`), its attention sinks."""
    return key_is_real & (key_is_real.cumsum(-1) <= num_sink_tokens)


def sink_key_function(key_is_real: torch.Tensor | None, num_sink_tokens: int) -> Callable:
    """Key kv_idx is one of its row's attention sinks (`sink_token_mask`; the first keys when every key is real)."""
    if key_is_real is not None:
        return padding_mask_function(sink_token_mask(key_is_real, num_sink_tokens))

    def is_sink(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx < num_sink_tokens

    return is_sink


def windowed_mask_function(
    window: int | None, key_is_real: torch.Tensor | None, query_offset: int, num_sink_tokens: int = 0
) -> Callable:
    """The windowed rule (module docstring) with query t at key index `query_offset + t` (`S - T`).

    Args:
        window: keys seen per query, itself included; None for full causal attention.
        key_is_real: `[B, S]` bool, False at padding; None when every key is real.
        num_sink_tokens: N, each row's first N real keys seen besides the window (0: none).
    """
    rule = [causal_mask_function]
    if window is not None and num_sink_tokens > 0:
        rule.append(or_masks(sliding_window_overlay(window), sink_key_function(key_is_real, num_sink_tokens)))
    elif window is not None:
        rule.append(sliding_window_overlay(window))
    if key_is_real is not None:
        rule.append(or_masks(padding_mask_function(key_is_real), own_key_function))
    return add_offsets_to_mask_function(and_masks(*rule), query_offset, 0)


def memory_slot_function(num_memory_tokens: int) -> Callable:
    """The global branch's first `num_memory_tokens` keys: the memory slots, seen by every query."""

    def is_memory_slot(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx < num_memory_tokens

    return is_memory_slot


def complete_block_function(query_positions: torch.Tensor, block_size: int, num_memory_tokens: int) -> Callable:
    """Block key `num_memory_tokens + c` is complete at the query's position (`query_positions` `[B, T]`)."""

    def is_complete(batch_idx, head_idx, q_idx, kv_idx):
        last_position = (kv_idx - num_memory_tokens) * block_size + block_size - 1
        return last_position <= query_positions[batch_idx, q_idx]

    return is_complete


def nonempty_block_function(block_counts: torch.Tensor, num_memory_tokens: int) -> Callable:
    """Block key `num_memory_tokens + c` holds a real token (`block_counts` `[B, C]`)."""

    def holds_real_token(batch_idx, head_idx, q_idx, kv_idx):
        return block_counts[batch_idx, (kv_idx - num_memory_tokens).clamp(min=0)] > 0

    return holds_real_token


def compressed_mask_function(
    query_positions: torch.Tensor, block_counts: torch.Tensor, block_size: int, num_memory_tokens: int
) -> Callable:
    """The global branch's rule (module docstring): memory slots, then the complete blocks that hold a real token.
    Composed with `|` and `&` directly: `and_masks` / `or_masks` start from a tensor of ones / zeros, four more
    operators in every decode step of every dynamic layer."""
    is_memory_slot = memory_slot_function(num_memory_tokens)
    is_complete = complete_block_function(query_positions, block_size, num_memory_tokens)
    holds_real_token = nonempty_block_function(block_counts, num_memory_tokens)

    def is_visible(batch_idx, head_idx, q_idx, kv_idx):
        block_is_visible = is_complete(batch_idx, head_idx, q_idx, kv_idx) & holds_real_token(
            batch_idx, head_idx, q_idx, kv_idx
        )
        return is_memory_slot(batch_idx, head_idx, q_idx, kv_idx) | block_is_visible

    return is_visible


def dense_mask(
    mask_function: Callable, batch_size: int, query_length: int, key_length: int, device: torch.device
) -> torch.Tensor:
    """`mask_function` evaluated on every (batch, query, key): a boolean `[B', 1, T, S]`, with B' 1 where the rule
    does not depend on the row (broadcasting keeps only the dimensions the rule reads)."""
    batch_idx = torch.arange(batch_size, device=device).view(-1, 1, 1, 1)
    head_idx = torch.zeros((), dtype=torch.long, device=device)
    q_idx = torch.arange(query_length, device=device).view(1, 1, -1, 1)
    kv_idx = torch.arange(key_length, device=device).view(1, 1, 1, -1)
    return mask_function(batch_idx, head_idx, q_idx, kv_idx).expand(-1, 1, query_length, key_length)


def windowed_visibility(
    query_length: int,
    key_is_real: torch.Tensor | None,
    key_length: int,
    window: int | None,
    device: torch.device,
    num_sink_tokens: int = 0,
) -> torch.Tensor:
    """Boolean mask `[B or 1, 1, T, S]` of the windowed rule, True where query t may attend key s.

    Args:
        query_length: T, the number of queries (the last T of the keys).
        key_is_real: `[B, S]` bool, False at padding; None when every key is real (the mask is then `[1, 1, T, S]`).
        key_length: S.
        window: keys seen per query, itself included; None for full causal attention.
        num_sink_tokens: N, each row's first N real keys seen besides the window (0: none).
    """
    rule = windowed_mask_function(window, key_is_real, key_length - query_length, num_sink_tokens)
    batch_size = 1 if key_is_real is None else key_is_real.shape[0]
    return dense_mask(rule, batch_size, query_length, key_length, device)


def compressed_visibility(
    query_positions: torch.Tensor, block_counts: torch.Tensor, block_size: int, num_memory_tokens: int
) -> torch.Tensor:
    """Boolean mask `[B, 1, T, M + C]` of the global branch for queries at `query_positions` `[B, T]` over the
    memory slots and the blocks of `block_counts` `[B, C]`."""
    rule = compressed_mask_function(query_positions, block_counts, block_size, num_memory_tokens)
    batch_size, query_length = query_positions.shape
    key_length = num_memory_tokens + block_counts.shape[1]
    return dense_mask(rule, batch_size, query_length, key_length, query_positions.device)
