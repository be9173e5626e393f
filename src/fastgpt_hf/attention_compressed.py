"""The global branch of a dynamic layer: learned memory slots plus block-compressed summaries of the past.

DESIGN.md section 2. Position p belongs to block p // b. Each block keeps the sum of its real tokens' pre-rotary
keys and values and their count; a block's entry is `compress(sum / count)`, computed again each time a token joins
the block (the caches keep the entries, so a decode step compresses one block, not all). Query at position p sees
every memory slot and each block c with `c * b + b - 1 <= p` that holds at least one real token. Queries use no
rotary phase. Block sums are kept in float32 (float64 for float64 models) so that long blocks do not lose
precision in bf16.
"""

import functools

import torch
from transformers.masking_utils import or_masks

from .attention_masks import complete_block_function, compressed_visibility, dense_mask, memory_slot_function
from .attention_sdpa import masked_sdpa

# Mask entries (batch x queries x keys) per sdpa call of the global branch: bounds each call's mask, and its scores
# (times the heads) where a backend materializes them, while a long prefill makes a few large calls, not many small
# launch-bound ones (32K tokens of the `1b` preset at batch 1: 5 calls per layer; 1,024 queries a call made 32).
MASK_ENTRIES_PER_CALL = 2**22


def add_block_statistics(
    key_sums: torch.Tensor,
    value_sums: torch.Tensor,
    counts: torch.Tensor,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    positions: torch.Tensor,
    is_real: torch.Tensor | None,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add the real tokens of `[B, K, T, D]` keys and values to their blocks' sums and counts, in place.

    Returns each token's block `[B, T]` (block 0 for padding, which adds nothing) and the index that selects the
    tokens' blocks from `[B, K, C, D]` tensors as `[B, K, T, D]`. Accumulating `index_put_`, not `scatter_add_`:
    compiled code (a decode step) then updates the buffers in place, where inductor copies the whole buffer around
    a scatter."""
    if is_real is None:
        block_ids = positions // block_size
        weight = torch.ones_like(block_ids, dtype=counts.dtype)
    else:
        weight = is_real.to(counts.dtype)
        block_ids = torch.where(weight > 0, positions // block_size, 0)
    rows = torch.arange(block_ids.shape[0], device=block_ids.device)[:, None]
    counts.index_put_((rows, block_ids), weight, accumulate=True)
    heads = torch.arange(key_sums.shape[1], device=block_ids.device)[None, :, None]
    index = (rows[:, :, None], heads, block_ids[:, None, :])
    for sums, states in ((key_sums, key_states), (value_sums, value_states)):
        additions = states.to(sums.dtype) if is_real is None else states.to(sums.dtype) * weight[:, None, :, None]
        sums.index_put_(index, additions, accumulate=True)
    return block_ids, index


def indexed_block_means(
    key_states: torch.Tensor, value_states: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean key and value of each complete block when token t sits at position t (a prefill with nothing padded and
    default positions): a reshape and one reduction each, no scatter. Only complete blocks are ever visible there.

    Args:
        key_states, value_states: `[B, K, T, D]`, keys before rotary.
    Returns:
        `[B, K, T // b, D]` means, float32 (float64 for float64 models), as the block state's sums over counts.
    """
    blocks = key_states.shape[2] // block_size
    mean_dtype = torch.promote_types(key_states.dtype, torch.float32)
    key_blocks, value_blocks = (
        states[:, :, : blocks * block_size].unflatten(2, (blocks, block_size)) for states in (key_states, value_states)
    )
    return key_blocks.mean(3, dtype=mean_dtype), value_blocks.mean(3, dtype=mean_dtype)


def memory_and_block_entries(
    memory_keys: torch.Tensor,
    memory_values: torch.Tensor,
    block_keys: torch.Tensor,
    block_values: torch.Tensor,
    heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values `[B, H, M + C, D]` of the global branch: memory slots `[M, K, D]`, then the compressed blocks
    `[B, K, C, D]`, repeated to the H query heads. These tensors are small, and sdpa's fused kernels with a mask take
    no grouped heads (with `enable_gqa` a masked call falls back to the math path, which materializes the scores)."""
    batch = block_keys.shape[0]
    entries = []
    for memory, blocks in ((memory_keys, block_keys), (memory_values, block_values)):
        memory = memory.transpose(0, 1).expand(batch, -1, -1, -1).to(blocks.dtype)
        both = torch.cat([memory, blocks], dim=2)
        entries.append(both.repeat_interleave(heads // both.shape[1], dim=1))
    return entries[0], entries[1]


def global_branch_attention(
    query_states: torch.Tensor,
    query_positions: torch.Tensor,
    memory_keys: torch.Tensor,
    memory_values: torch.Tensor,
    block_keys: torch.Tensor,
    block_values: torch.Tensor,
    block_counts: torch.Tensor,
    block_size: int,
    scaling: float,
    dropout: float = 0.0,
    mask_entries_per_call: int = MASK_ENTRIES_PER_CALL,
) -> torch.Tensor:
    """Softmax attention of pre-rotary queries over memory slots and visible compressed blocks.

    Args:
        query_states: `[B, H, T, D]`, before rotary; query_positions: `[B, T]`.
        memory_keys, memory_values: `[M, K, D]`.
        block_keys, block_values: `[B, K, C, D]`, already compressed; block_counts: `[B, C]`.
        mask_entries_per_call: queries go to sdpa in chunks whose `[B, 1, chunk, M + C]` mask has at most this many
            entries (at least one query a call), so no tensor grows as T x C.
    Returns:
        `[B, T, H, D]`.
    """
    batch, heads, query_length, _ = query_states.shape
    keys, values = memory_and_block_entries(memory_keys, memory_values, block_keys, block_values, heads)
    queries_per_call = max(1, mask_entries_per_call // (batch * keys.shape[2]))
    if query_length <= queries_per_call:  # one call (a decode step): a symbolic loop step would pin the block count
        queries_per_call = query_length
    outputs = []
    for start in range(0, query_length, queries_per_call):
        positions = query_positions[:, start : start + queries_per_call]
        visible = compressed_visibility(positions, block_counts, block_size, memory_keys.shape[0])  # [B, 1, t, M + C]
        outputs.append(
            masked_sdpa(query_states[:, :, start : start + queries_per_call], keys, values, visible, dropout, scaling)
        )
    output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return output.transpose(1, 2)


def indexed_global_branch_attention(
    query_states: torch.Tensor,
    memory_keys: torch.Tensor,
    memory_values: torch.Tensor,
    block_keys: torch.Tensor,
    block_values: torch.Tensor,
    block_size: int,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """`global_branch_attention` for a prefill whose token t sits at position t, with the `T // b` complete blocks of
    `indexed_block_means`: every block is full, so the mask depends on T alone and is built once per length, shared
    by every dynamic layer (`indexed_global_visibility`); one sdpa call. `[B, H, T, D]` in, `[B, T, H, D]` out."""
    keys, values = memory_and_block_entries(memory_keys, memory_values, block_keys, block_values, query_states.shape[1])
    visible = indexed_global_visibility(query_states.shape[2], memory_keys.shape[0], block_size, query_states.device)
    output = masked_sdpa(query_states, keys, values, visible, dropout, scaling)
    return output.transpose(1, 2)


def indexed_global_visibility(
    query_length: int, num_memory_tokens: int, block_size: int, device: torch.device
) -> torch.Tensor:
    """`[1, 1, T, M + T // b]` bool: every memory slot, and block c from position c * b + b - 1 on. Kept per length
    and device (a few recent ones) outside compiled code, where inductor folds it into the kernels instead."""
    if torch.compiler.is_compiling():
        return build_indexed_global_visibility(query_length, num_memory_tokens, block_size, device)
    return cached_indexed_global_visibility(query_length, num_memory_tokens, block_size, device)


def build_indexed_global_visibility(
    query_length: int, num_memory_tokens: int, block_size: int, device: torch.device
) -> torch.Tensor:
    """Every block is full: the rule of `attention_masks` without its non-empty-block piece."""
    positions = torch.arange(query_length, device=device)[None]
    rule = or_masks(
        memory_slot_function(num_memory_tokens), complete_block_function(positions, block_size, num_memory_tokens)
    )
    return dense_mask(rule, 1, query_length, num_memory_tokens + query_length // block_size, device)


cached_indexed_global_visibility = functools.lru_cache(maxsize=8)(build_indexed_global_visibility)
