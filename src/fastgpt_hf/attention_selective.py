"""The global branch of a selective layer: the dynamic layer's memory slots and compressed blocks, plus the exact
tokens of the blocks each query selects (the selection branch of NSA, Native Sparse Attention, DeepSeek 2025),
all in one softmax.

The rule (README, "The selective layer"; float64 reference: `attention_reference.selective_global_attention`).
For query i and the G query heads that share key/value head k, block c's selection score is the sum over those heads
of the global branch's logit of c's compressed entry, `scale * q_h(i) . compress_k(mean key of c)`, pre-rotary
(NSA sums the heads' attention probabilities instead; with one head per group both rank alike). Among the blocks
visible to i (complete, `c * b + b - 1 <= position(i)`, holding a real token) the `num_selected_blocks` with the
highest scores are selected, a tie going to the lower block index; with fewer visible blocks, all of them. Every head
of the group then attends in one softmax to the memory slots, the compressed entries of the visible blocks and the
pre-rotary keys of every real token of the selected blocks (their values alike), none with a position encoding.
The selection is not differentiable (as in NSA): gradients reach the selected tokens' keys and values through their
attention weights, and the compressors through the compressed entries' weights, not through the choice.

Tokens are held by position, `[B, K, C * b, D]` with block c's tokens at [c * b, c * b + b) (`BlockTokens` in
`cache_blocks`), so a selected block is one gathered slice; a position with no real token is flagged not real.
"""

import torch
import torch.nn.functional as F

from .attention_compressed import memory_and_block_entries
from .attention_masks import compressed_visibility

# Gathered token entries (batch x kv heads x queries x selected tokens) per chunk of queries: bounds the gathered
# keys and values, `[B, K, t, k * b, D]` each, so that no tensor grows as T x k x b for a long prefill.
TOKEN_ENTRIES_PER_CALL = 2**18


def select_blocks(
    block_logits: torch.Tensor, block_visible: torch.Tensor, num_selected_blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected blocks of each query and key/value head (module docstring).

    Args:
        block_logits: `[B, K, G, T, C]`, the global branch's logits of the compressed entries per query head.
        block_visible: `[B, 1, T, C]` bool.
    Returns:
        block indices `[B, K, T, k]` and whether each is a selected visible block `[B, K, T, k]` bool, with
        k = min(num_selected_blocks, C). Detached: the choice carries no gradient.
    """
    scores = block_logits.detach().sum(2).masked_fill(~block_visible, float("-inf"))  # [B, K, T, C]
    # A stable sort keeps equal scores in block order: ties go to the lower block index.
    selected = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :num_selected_blocks]
    return selected, block_visible.expand_as(scores).gather(-1, selected)


def gather_blocks(block_tokens: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Tokens `[B, K, C, b, D]` of the `selected` blocks `[B, K, T, k]` -> `[B, K, T, k * b, D]`."""
    rows = torch.arange(selected.shape[0], device=selected.device)[:, None, None, None]
    heads = torch.arange(selected.shape[1], device=selected.device)[None, :, None, None]
    return block_tokens[rows, heads, selected].flatten(3, 4)


def selective_global_branch_attention(
    query_states: torch.Tensor,
    query_positions: torch.Tensor,
    memory_keys: torch.Tensor,
    memory_values: torch.Tensor,
    block_keys: torch.Tensor,
    block_values: torch.Tensor,
    block_counts: torch.Tensor,
    token_keys: torch.Tensor,
    token_values: torch.Tensor,
    token_is_real: torch.Tensor,
    block_size: int,
    num_selected_blocks: int,
    scaling: float,
    dropout: float = 0.0,
    token_entries_per_call: int = TOKEN_ENTRIES_PER_CALL,
) -> torch.Tensor:
    """Softmax attention of pre-rotary queries over memory slots, visible compressed blocks and the tokens of the
    selected blocks (module docstring).

    Args:
        query_states: `[B, H, T, D]`, before rotary; query_positions: `[B, T]`.
        memory_keys, memory_values: `[M, K, D]`.
        block_keys, block_values: `[B, K, C, D]`, already compressed; block_counts: `[B, C]`.
        token_keys, token_values: `[B, K, C * b, D]`, pre-rotary, by position; token_is_real: `[B, C * b]` bool.
        token_entries_per_call: queries go in chunks whose gathered tokens `[B, K, t, k * b]` number at most this
            many (at least one query a chunk).
    Returns:
        `[B, T, H, D]`.
    """
    batch, heads, query_length, head_dim = query_states.shape
    kv_heads, num_blocks = block_keys.shape[1], block_keys.shape[2]
    entries = memory_and_block_entries(
        memory_keys, memory_values, block_keys, block_values, kv_heads
    )  # [B, K, M + C, D]
    blocks = (
        token_keys.unflatten(2, (num_blocks, block_size)),  # [B, K, C, b, D]
        token_values.unflatten(2, (num_blocks, block_size)),
        token_is_real.unflatten(1, (num_blocks, block_size))[:, None].expand(-1, kv_heads, -1, -1),  # [B, K, C, b]
    )
    queries = query_states.unflatten(1, (kv_heads, heads // kv_heads))  # [B, K, G, T, D]
    tokens_per_query = batch * kv_heads * min(num_selected_blocks, num_blocks) * block_size
    queries_per_call = max(1, token_entries_per_call // tokens_per_query)
    outputs = []
    for start in range(0, query_length, queries_per_call):
        chunk = slice(start, start + queries_per_call)
        visible = compressed_visibility(query_positions[:, chunk], block_counts, block_size, memory_keys.shape[0])
        outputs.append(
            attend_chunk(queries[:, :, :, chunk], visible, entries, blocks, num_selected_blocks, scaling, dropout)
        )
    output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=3)
    return output.flatten(1, 2).transpose(1, 2)


def attend_chunk(
    queries: torch.Tensor,
    visible: torch.Tensor,
    entries: tuple[torch.Tensor, torch.Tensor],
    blocks: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    num_selected_blocks: int,
    scaling: float,
    dropout: float,
) -> torch.Tensor:
    """One chunk of queries `[B, K, G, t, D]`, `visible` `[B, 1, t, M + C]`, `entries` the memory and compressed keys
    and values `[B, K, M + C, D]`, `blocks` the block-shaped token keys, values `[B, K, C, b, D]` and flags
    `[B, K, C, b]` -> `[B, K, G, t, D]`."""
    entry_keys, entry_values = entries
    num_entries = entry_keys.shape[2]
    num_memory = num_entries - blocks[0].shape[2]
    entry_logits = queries @ entry_keys[:, :, None].transpose(-1, -2) * scaling  # [B, K, G, t, M + C]
    selected, chosen = select_blocks(entry_logits[..., num_memory:], visible[..., num_memory:], num_selected_blocks)
    block_token_keys, block_token_values, block_token_is_real = blocks
    token_keys = gather_blocks(block_token_keys, selected)  # [B, K, t, k * b, D]
    token_values = gather_blocks(block_token_values, selected)
    token_is_real = gather_blocks(block_token_is_real[..., None], selected)[..., 0]  # [B, K, t, k * b]
    token_visible = token_is_real & chosen.repeat_interleave(block_token_keys.shape[3], dim=-1)
    token_logits = torch.einsum("bkgtd,bktsd->bkgts", queries, token_keys) * scaling
    logits = torch.cat(
        [entry_logits.masked_fill(~visible[:, :, None], float("-inf")),
         token_logits.masked_fill(~token_visible[:, :, None], float("-inf"))], dim=-1
    )  # fmt: skip
    weights = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(queries.dtype)
    weights = F.dropout(weights, p=dropout, training=dropout > 0)
    entry_weights, token_weights = weights.split([num_entries, token_keys.shape[3]], dim=-1)
    return entry_weights @ entry_values[:, :, None] + torch.einsum("bkgts,bktsd->bkgtd", token_weights, token_values)
