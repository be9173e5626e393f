"""Generation state of FastGPT: what each layer kind keeps between decoding steps (DESIGN.md section 4).

Two caches, both built from `config.layer_types` and each layer's window (`config.attention_window`), as
Transformers builds its own from `layer_types` (`generate()` builds them by itself):

`FastGPTDynamicCache` (the default; memory grows only where the layer kind needs it):
- `full_attention`: `DynamicFullLayer` (Transformers' `DynamicLayer`), every key and value.
- `sliding_attention`: `DynamicSlidingLayer` (Transformers' `DynamicSlidingWindowLayer`), the last
  `sliding_window - 1` keys and values.
- `dynamic_attention`: `DynamicCompressedLayer`, the last `dynamic_window - 1` keys and values, the running sums of
  the pre-rotary keys and values of the open block, and one compressed entry (and real-token count) per block
  (`CompressedBlocks`): O(window + length / b), and a decode step compresses one block.
- `selective_attention`: `DynamicSelectiveLayer`, the dynamic layer's state and every real token's pre-rotary key
  and value by position (`BlockTokens`), since any complete block may be selected later: O(window + length).
- with attention sinks (`num_sink_tokens` > 0), the windowed layers' `DynamicSink*Layer`s: the same, and each row's
  first `num_sink_tokens` real tokens once they leave the window (`SinkTokens`).

`FastGPTStaticCache` (`cache_implementation="static"`, `torch.compile`): the same state in buffers allocated once;
it refuses `selective_attention` layers.
Every layer keeps its last N + 1 keys and values, the newest in the last slot and the N before it in a ring
(N + 1 = the window, at most `max_cache_len`), so that a decode step writes a few slots instead of moving the
cache; the dynamic layer adds the block state for ceil(max_cache_len / b) blocks. With attention sinks the windowed
layers keep each row's first `num_sink_tokens` real tokens in as many slots ahead of the window's, seen once they
have left the window (`StaticRolledLayer`).

One `update` contract for every layer (what the windowed backends in `attention_masks` expect): it takes the new
keys, values and the 2D attention mask, and returns the kept past followed by the T new tokens, so queries are the
last T of the S returned keys. The past is in time order (after the kept sinks, which only the sink clause reaches),
except in the static cache's one-token step, where every real past key but the sinks is within the query's window
and its order does not matter, and which returned keys are real tokens:
the dynamic cache reads it off the 2D attention mask (`kept_key_mask`); the static cache keeps a flag per slot
(never-written slots and padding are False), so a compiled decode step needs only the new tokens' mask and reads no
Python int in tensor code: one CUDA graph serves every step. The dynamic cache counts lengths in Python ints, the
static cache in a device tensor.

Rollback (`crop(-k)`, which assisted, prompt-lookup and speculative decoding call after each verification): every
layer of the dynamic cache can forget its last k tokens once `activate_past_recording` was called (`generate()`
calls it), as Transformers' sliding layers do: windows keep every token until the next crop, and the dynamic layers
replay their recorded tokens onto the block state of the last crop. The static cache can crop where its buffers hold
every position (`max_cache_len` at most each window); elsewhere crop raises a ValueError that says so.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers.cache_utils import (
    Cache,
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    StaticCache,
    StaticLayer,
)

from .attention_compressed import add_block_statistics
from .configuration_fastgpt import DYNAMIC, SELECTIVE, FastGPTConfig


class BlockMeans(NamedTuple):
    """The block means a step changed (`CompressedBlocks.add_to_blocks`), which the attention compresses and hands
    back to `write_entries`: key and value means `[B, K, N, D]` in float32 (float64), and `written`, where their
    entries go: `[B]` (N = 1, a one-token step: each row's open block) or `[B, C]` bool (N = C, every block; True
    where the entry is recomputed)."""

    key_means: torch.Tensor
    value_means: torch.Tensor
    written: torch.Tensor


def kept_key_mask(
    attention_mask: torch.Tensor | None, seen_length: int, key_length: int, device: torch.device
) -> torch.Tensor | None:
    """Which of the S keys a layer's `update` returned are real tokens: `[B or 1, S]` bool, or None when all are.

    Args:
        attention_mask: `[B, seen_length]` 2D mask of the whole sequence so far (1 real, 0 padding), or None.
        seen_length: tokens seen by the layer, the new ones included.
        key_length: S; the returned keys are the last S positions, after `S - seen_length` empty slots if positive.
    """
    if attention_mask is None:
        if key_length <= seen_length:
            return None
        return (torch.arange(key_length, device=device) >= key_length - seen_length)[None]
    # Padding by S on the left and keeping the last S needs no branch on the (compiled: symbolic) lengths.
    return F.pad(attention_mask, (key_length, 0), value=0)[:, -key_length:]


class KeyMaskFromAttentionMask:
    """The update contract of every FastGPT cache layer, for Transformers' dynamic layers: `update` returns the keys
    and values and which of the keys are real tokens, read off the 2D attention mask (`kept_key_mask`)."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        seen_length = self.get_seq_length() + key_states.shape[2]
        all_keys, all_values = super().update(key_states, value_states)
        return all_keys, all_values, kept_key_mask(attention_mask, seen_length, all_keys.shape[2], all_keys.device)


class DynamicFullLayer(KeyMaskFromAttentionMask, DynamicLayer):
    """Cache of a `full_attention` layer: Transformers' `DynamicLayer`, every key and value."""


class DynamicSlidingLayer(KeyMaskFromAttentionMask, DynamicSlidingWindowLayer):
    """Cache of a `sliding_attention` layer: Transformers' `DynamicSlidingWindowLayer`, the last window - 1."""


class SinkTokens:
    """Attention sinks of a windowed layer of the dynamic cache (`config.num_sink_tokens` N > 0), mixed in before
    the layer's class: beside its window, the layer keeps every token that leaves the window while it is one of
    the first N real tokens of some row, so that the windowed rule's sink clause (`attention_masks`) still finds it.

    `update` returns `[kept prefix][the window's last window - 1 keys][the new keys]`: the prefix, `sink_keys` /
    `sink_values` `[B, K, P, D]` and `sink_is_real` `[B, P]`, holds one column per such token, at most B x N (rows
    left-padded alike share theirs); `window_is_real` `[B, L]` flags the window's L keys. A prefix key left the
    window, so it is at least `window` keys before every later query in that layout: only the sink clause admits
    it. Counting real keys over the returned keys finds each row's first N real tokens: a row's real tokens that
    left the window without a place in the prefix come after its sinks. Rollback (`crop`) moves into the prefix
    the sinks among the tokens it drops from the window; beam search's row operations move the prefix with the
    rows.
    """

    num_sink_tokens: int
    SINK_STATE = ("sink_keys", "sink_values", "sink_is_real", "window_is_real")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The update contract (`KeyMaskFromAttentionMask`): `[B, K, T, D]` in; the prefix, the window and the new
        keys and values out, and which keys are real (None when `attention_mask` is None: every key is)."""
        batch, _, query_length, _ = key_states.shape
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.sink_keys, self.sink_values = key_states[:, :, :0], value_states[:, :, :0]
            self.sink_is_real = torch.zeros(batch, 0, dtype=torch.bool, device=key_states.device)
            self.window_is_real = self.sink_is_real
        new_is_real = torch.ones(batch, query_length, dtype=torch.bool, device=key_states.device)
        if attention_mask is not None:
            new_is_real = attention_mask[:, -query_length:].bool()
        self.cumulative_length += query_length
        keys = torch.cat([self.keys, key_states], dim=2)
        values = torch.cat([self.values, value_states], dim=2)
        is_real = torch.cat([self.window_is_real, new_is_real], dim=1)
        # The window keys a query can reach, as the base layer returns them, after the sinks among the older ones.
        reachable = max(0, keys.shape[2] - (self.sliding_window - 1 + query_length))
        prefix_keys, prefix_values, prefix_is_real = self.sinks_before(keys, values, is_real, reachable)
        all_keys = torch.cat([prefix_keys, keys[:, :, reachable:]], dim=2)
        all_values = torch.cat([prefix_values, values[:, :, reachable:]], dim=2)
        key_is_real = torch.cat([prefix_is_real, is_real[:, reachable:]], dim=1)
        # Recording the past (rollback), the window keeps every token until the next crop, as the base layer's does.
        kept_from = 0 if self.record_past else max(0, keys.shape[2] - (self.sliding_window - 1))
        self.keep_window(keys, values, is_real, kept_from, keys.shape[2])
        return all_keys, all_values, None if attention_mask is None else key_is_real

    def sinks_before(
        self, keys: torch.Tensor, values: torch.Tensor, is_real: torch.Tensor, end: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prefix with the sinks among the window columns `[0, end)` appended: keys, values `[B, K, P', D]` and
        which are real `[B, P']`. A column is kept if it is among the first N real tokens of any row."""
        real_rank = self.sink_is_real.sum(1, keepdim=True) + is_real[:, :end].cumsum(1)  # [B, end]
        is_sink = (is_real[:, :end] & (real_rank <= self.num_sink_tokens)).any(0)
        columns = is_sink.nonzero().flatten()
        return (
            torch.cat([self.sink_keys, keys[:, :, columns]], dim=2),
            torch.cat([self.sink_values, values[:, :, columns]], dim=2),
            torch.cat([self.sink_is_real, is_real[:, columns]], dim=1),
        )

    def keep_window(self, keys: torch.Tensor, values: torch.Tensor, is_real: torch.Tensor, start: int, end: int):
        """Keep window columns `[start, end)` of `keys`, `values` `[B, K, L, D]` and `is_real` `[B, L]`; the sinks
        among the columns before `start` join the prefix."""
        self.sink_keys, self.sink_values, self.sink_is_real = self.sinks_before(keys, values, is_real, start)
        self.keys, self.values = keys[:, :, start:end], values[:, :, start:end]
        self.window_is_real = is_real[:, start:end]

    def crop(self, tokens_to_remove: int) -> None:
        """The layer's own `crop` (its checks, the window, the blocks), then the sinks among the tokens it dropped
        from the front of the window moved into the prefix."""
        if not self.is_initialized:
            super().crop(tokens_to_remove)
            return
        keys, values, is_real, seen = self.keys, self.values, self.window_is_real, self.cumulative_length
        super().crop(tokens_to_remove)
        # The base crop keeps a contiguous run of the window that ends where the removed tokens began.
        end = keys.shape[2] - (seen - self.cumulative_length)
        self.keep_window(keys, values, is_real, end - self.keys.shape[2], end)

    def reset(self) -> None:
        super().reset()
        for name in self.SINK_STATE:
            setattr(self, name, None)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.map_sink_state(lambda state: state.index_select(0, beam_idx.to(state.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.map_sink_state(lambda state: state.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.map_sink_state(lambda state: state[indices, ...])

    def map_sink_state(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every tensor of `SINK_STATE` by `function` of it (nothing before the first step)."""
        if self.is_initialized:
            for name in self.SINK_STATE:
                setattr(self, name, function(getattr(self, name)))


class CompressedBlocks:
    """Block state of a `dynamic_attention` layer, shared by both caches (DESIGN.md section 4): one compressed entry
    per block, `compressed_keys` / `compressed_values` `[B, K, C, D]` in the keys' dtype, each block's real-token
    count `block_counts` `[B, C]` (a block without a real token is never visible), and the running float32 (float64)
    sums of each row's open block, the block of its latest real token: `open_key_sums` / `open_value_sums`
    `[B, K, D]`, `open_blocks` `[B]`. A closed block keeps its entry only.

    A token joining the open block recomputes that block's entry, so a one-token step compresses one block per row;
    the open block's entry is never seen before its last token writes it (`attention_masks.complete_block_function`).
    A step of several tokens sums every block over `[B, K, C, D]` for the time of the step only. A row's positions
    must not go back to a block before its open one, whose sums are gone (`check_positions_follow_cache`).

    Rollback (assisted and prompt-lookup decoding): after `activate_past_recording` the layer keeps the open-block
    state as of the last `crop` and the pre-rotary keys and values added since; `crop(-k)` returns to that state and
    adds back all but the last k of them (`rollback_blocks`): exactly the state of a cache that never saw them.
    """

    compress_block_size: int
    record_past: bool = False

    def add_to_blocks(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        positions: torch.Tensor,
        is_real: torch.Tensor | None,
    ) -> BlockMeans:
        """Add the new tokens (pre-rotary `[B, K, T, D]`, positions `[B, T]`, `is_real` `[B, T]` or None) to their
        blocks; return the means of the blocks whose entries change, for the attention to compress and hand to
        `write_entries`. Call after `update`, so that the blocks cover every position seen."""
        self.ensure_blocks(key_states)
        if self.record_past:
            self.recorded_tokens.append((key_states, value_states, positions, is_real))
        if key_states.shape[2] == 1:
            return self.add_one_token(key_states, value_states, positions, is_real)
        # Every block from each row's open block on is recomputed; the closed ones before it keep their entries.
        block_index = torch.arange(self.block_counts.shape[1], device=self.open_blocks.device)
        recomputed = block_index >= self.open_blocks[:, None]  # [B, C]
        key_sums, value_sums = self.add_tokens(key_states, value_states, positions, is_real)
        denominator = self.block_counts.clamp(min=1)[:, None, :, None]
        return BlockMeans(key_sums / denominator, value_sums / denominator, recomputed)

    def write_entries(
        self, key_entries: torch.Tensor, value_entries: torch.Tensor, written: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store the compressed entries of `add_to_blocks`' means (`BlockMeans.written` says where), in place;
        return every compressed key and value `[B, K, C, D]` and the blocks' real-token counts `[B, C]`."""
        if written.dim() == 1:  # one block per row: its index [B, K, 1] in every buffer
            batch, kv_heads = self.compressed_keys.shape[:2]
            rows = torch.arange(batch, device=written.device).view(-1, 1, 1)
            heads = torch.arange(kv_heads, device=written.device).view(1, -1, 1)
            one_block = (rows, heads, written.view(-1, 1, 1))
        for buffer, entries in ((self.compressed_keys, key_entries), (self.compressed_values, value_entries)):
            entries = entries.to(buffer.dtype)
            if written.dim() == 1:
                buffer.index_put_(one_block, entries)  # [B, K, 1]
            else:
                buffer.copy_(torch.where(written[:, None, :, None], entries, buffer))
        return self.compressed_keys, self.compressed_values, self.block_counts

    def add_one_token(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        positions: torch.Tensor,
        is_real: torch.Tensor | None,
    ) -> BlockMeans:
        """One token per row (`[B, K, 1, D]`): add it to its row's open block, or open its block with it; the mean
        of that block alone changes (a compiled decode step loops over no blocks)."""
        blocks = positions[:, 0] // self.compress_block_size  # [B]
        real = torch.ones_like(blocks, dtype=torch.bool) if is_real is None else is_real[:, 0].bool()
        opens_block = real & (blocks != self.open_blocks)
        self.open_blocks.copy_(torch.where(opens_block, blocks, self.open_blocks))
        weight = real.to(self.open_key_sums.dtype)
        kept = (~opens_block).to(weight.dtype)[:, None, None]  # [B, 1, 1]: 0 drops the closed block's sums
        for sums, states in ((self.open_key_sums, key_states), (self.open_value_sums, value_states)):
            sums.copy_(sums * kept + states[:, :, 0].to(sums.dtype) * weight[:, None, None])
        rows = torch.arange(blocks.shape[0], device=blocks.device)
        self.block_counts.index_put_((rows, self.open_blocks), weight.to(self.block_counts.dtype), accumulate=True)
        counts = self.block_counts[rows, self.open_blocks].clamp(min=1)[:, None, None, None]  # [B, 1, 1, 1]
        return BlockMeans(
            self.open_key_sums[:, :, None] / counts, self.open_value_sums[:, :, None] / counts, self.open_blocks
        )

    def add_tokens(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        positions: torch.Tensor,
        is_real: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Any number of tokens per row: sum every block over `[B, K, C, D]` for this step (each row's open block
        starting from its running sums) and keep the sums of the new open blocks. Returns the step's key and value
        sums `[B, K, C, D]` (a rollback's replay drops them: its closed blocks keep the entries they had)."""
        batch, kv_heads, _, head_dim = key_states.shape
        num_blocks = self.block_counts.shape[1]
        key_sums = self.open_key_sums.new_zeros(batch, kv_heads, num_blocks, head_dim)
        value_sums = torch.zeros_like(key_sums)
        rows = torch.arange(batch, device=key_sums.device)[:, None]
        heads = torch.arange(kv_heads, device=key_sums.device)[None, :]
        key_sums.index_put_((rows, heads, self.open_blocks[:, None]), self.open_key_sums)
        value_sums.index_put_((rows, heads, self.open_blocks[:, None]), self.open_value_sums)
        block_ids, _ = add_block_statistics(
            key_sums,
            value_sums,
            self.block_counts,
            key_states,
            value_states,
            positions,
            is_real,
            self.compress_block_size,
        )
        # Padding tokens sit in block 0 (`add_block_statistics`), below every open block.
        self.open_blocks.copy_(torch.maximum(self.open_blocks, block_ids.amax(dim=1)))
        self.open_key_sums.copy_(key_sums[rows, heads, self.open_blocks[:, None]])
        self.open_value_sums.copy_(value_sums[rows, heads, self.open_blocks[:, None]])
        return key_sums, value_sums

    def ensure_blocks(self, key_states: torch.Tensor) -> None:
        """Make room for every block of the positions seen."""
        raise NotImplementedError

    def allocate_blocks(self, key_states: torch.Tensor, num_blocks: int) -> None:
        """Empty block state for `num_blocks` blocks, shaped and typed after `[B, K, T, D]` keys."""
        batch, kv_heads, _, head_dim = key_states.shape
        sum_dtype = torch.promote_types(key_states.dtype, torch.float32)
        self.compressed_keys = key_states.new_zeros(batch, kv_heads, num_blocks, head_dim)
        self.compressed_values = torch.zeros_like(self.compressed_keys)
        self.block_counts = key_states.new_zeros(batch, num_blocks, dtype=sum_dtype)
        self.open_key_sums = key_states.new_zeros(batch, kv_heads, head_dim, dtype=sum_dtype)
        self.open_value_sums = torch.zeros_like(self.open_key_sums)
        self.open_blocks = torch.zeros(batch, dtype=torch.long, device=key_states.device)

    # The block state's attributes, in `block_buffers()` order.
    BLOCK_STATE = (
        "compressed_keys",
        "compressed_values",
        "block_counts",
        "open_key_sums",
        "open_value_sums",
        "open_blocks",
    )

    def block_buffers(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.BLOCK_STATE]

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None) -> None:
        """Keep what `crop` needs to roll the blocks back to this point (Transformers calls this before assisted
        decoding); `crop` moves the point forward. `recurrent_states_to_keep` is for linear-attention layers
        (Transformers passes it to every layer); the block state is rolled back by replay, so it needs none."""
        self.record_past = True
        self.start_rollback_point()

    def start_rollback_point(self) -> None:
        """Remember the counts and open-block state as they are now and forget the tokens recorded before."""
        self.recorded_tokens: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.rollback_point = None
        if getattr(self, "block_counts", None) is not None:
            self.rollback_point = [buffer.clone() for buffer in self.block_buffers()[2:]]

    def rollback_blocks(self, tokens_to_remove: int) -> None:
        """Return the block state to the rollback point, add back the tokens recorded since except the last
        `tokens_to_remove`, and make that the new rollback point. Writes in place (static buffers keep their
        address)."""
        recorded = sum(keys.shape[2] for keys, *_ in self.recorded_tokens)
        if tokens_to_remove > recorded:
            raise ValueError(
                f"Cannot remove {tokens_to_remove} tokens from a dynamic_attention layer that recorded {recorded} "
                "since activate_past_recording() or the last crop: only those can be rolled back."
            )
        if tokens_to_remove > 0:  # removing none keeps the state as it is
            replay = self.recorded_tokens_kept(recorded - tokens_to_remove)
            counts, open_key_sums, open_value_sums, open_blocks = self.block_buffers()[2:]
            for buffer in (counts, open_key_sums, open_value_sums, open_blocks):
                buffer.zero_()
            if self.rollback_point is not None:
                saved_counts, *saved_open = self.rollback_point
                counts[:, : saved_counts.shape[1]].copy_(saved_counts)
                for buffer, saved in zip((open_key_sums, open_value_sums, open_blocks), saved_open, strict=True):
                    buffer.copy_(saved)
            if replay is not None:
                self.add_tokens(*replay)
        self.start_rollback_point()

    def recorded_tokens_kept(self, kept: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The first `kept` recorded tokens as one step: keys, values `[B, K, kept, D]`, positions and is_real
        `[B, kept]`; None when `kept` is 0."""
        if kept == 0:
            return None
        keys, values, positions, is_real = [], [], [], []
        for step_keys, step_values, step_positions, step_is_real in self.recorded_tokens:
            keys.append(step_keys)
            values.append(step_values)
            positions.append(step_positions.expand(step_keys.shape[0], -1))
            real = torch.ones(step_positions.shape, dtype=torch.bool, device=step_keys.device)
            is_real.append(real.expand(step_keys.shape[0], -1) if step_is_real is None else step_is_real.bool())
        return (
            torch.cat(keys, dim=2)[:, :, :kept],
            torch.cat(values, dim=2)[:, :, :kept],
            torch.cat(positions, dim=1)[:, :kept],
            torch.cat(is_real, dim=1)[:, :kept],
        )

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` tokens (a negative count, as Transformers passes it): the window as
        the base layer crops it, the blocks by `rollback_blocks`. Only tokens added since `activate_past_recording`
        can be removed: a closed block's sums and the tokens that left the window are gone."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop takes minus the number of tokens to remove (Transformers' convention); got {tokens_to_remove}."
            )
        if tokens_to_remove < 0 and not self.record_past:
            raise ValueError(
                "A dynamic_attention layer can roll back only the tokens it recorded: call "
                "cache.activate_past_recording() before the forward passes to undo (generate() does so for assisted "
                "and prompt-lookup decoding). Without it the closed blocks' sums and the tokens that left the window "
                "are gone."
            )
        super().crop(tokens_to_remove)
        if self.record_past:
            self.rollback_blocks(-tokens_to_remove)


class OnePassBlocks(CompressedBlocks):
    """The block state of one forward pass without a cache (training, scoring): the blocks of its T positions (a
    real position never exceeds its token's index, so T / b blocks, rounded up, cover them), made for the pass and
    dropped after it. The global branch thus runs the caches' code with or without a cache."""

    def __init__(self, compress_block_size: int):
        self.compress_block_size = compress_block_size

    def ensure_blocks(self, key_states: torch.Tensor) -> None:
        self.allocate_blocks(key_states, -(-key_states.shape[2] // self.compress_block_size))


class DynamicCompressedLayer(CompressedBlocks, DynamicSlidingLayer):
    """Cache of a `dynamic_attention` layer: a sliding window of keys/values plus the block state, which grows by one
    entry per block. Croppable like Transformers' `DynamicSlidingWindowLayer`: after `activate_past_recording` the
    window keeps every token until the next `crop` and the blocks record what `rollback_blocks` replays."""

    is_croppable = True

    def __init__(self, sliding_window: int, compress_block_size: int):
        super().__init__(sliding_window=sliding_window)
        self.compress_block_size = compress_block_size
        self.block_counts: torch.Tensor | None = None
        self.start_rollback_point()

    def ensure_blocks(self, key_states: torch.Tensor) -> None:
        """Allocate the block state, or grow it by the blocks begun since (a copy every b positions)."""
        num_blocks = -(-self.cumulative_length // self.compress_block_size)
        if self.block_counts is None:
            self.allocate_blocks(key_states, num_blocks)
            return
        extra_blocks = num_blocks - self.block_counts.shape[1]
        if extra_blocks > 0:
            self.compressed_keys, self.compressed_values = (
                F.pad(buffer, (0, 0, 0, extra_blocks)) for buffer in (self.compressed_keys, self.compressed_values)
            )
            self.block_counts = F.pad(self.block_counts, (0, extra_blocks))

    def num_blocks(self) -> int:
        """Blocks held (complete or not): one entry per `compress_block_size` positions seen."""
        return 0 if self.block_counts is None else self.block_counts.shape[1]

    def reset(self) -> None:
        super().reset()
        self.block_counts = None
        self.start_rollback_point()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.map_row_state(lambda buffer: buffer.index_select(0, beam_idx.to(buffer.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.map_row_state(lambda buffer: buffer.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.map_row_state(lambda buffer: buffer[indices, ...])

    def row_state_names(self) -> tuple[str, ...]:
        """The attributes beside the window that are indexed by batch row first."""
        return self.BLOCK_STATE

    def map_row_state(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every tensor of `row_state_names()` by `function` of it (nothing before the first step)."""
        if self.block_counts is not None:
            for name in self.row_state_names():
                setattr(self, name, function(getattr(self, name)))


class BlockTokens:
    """The exact tokens of a `selective_attention` layer's blocks, mixed in before a `CompressedBlocks` class: every
    real token's pre-rotary key and value at its position, `token_keys` / `token_values` `[B, K, C * b, D]` in the
    keys' dtype, and how many real tokens each position holds, `token_counts` `[B, C * b]` (0 or 1: a row's real
    tokens have distinct positions), so that block c's tokens are positions [c * b, c * b + b) and a selected block is
    a slice (`attention_selective`). O(length) per layer: any complete block may be selected later."""

    TOKEN_STATE = ("token_keys", "token_values", "token_counts")
    token_keys: torch.Tensor | None = None

    def add_to_blocks(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        positions: torch.Tensor,
        is_real: torch.Tensor | None,
    ) -> BlockMeans:
        """`CompressedBlocks.add_to_blocks`, and the real tokens stored at their positions."""
        means = super().add_to_blocks(key_states, value_states, positions, is_real)
        self.ensure_tokens(key_states)
        # A position is a block of one: the block statistics' scatter stores each real token in its slot.
        add_block_statistics(
            self.token_keys, self.token_values, self.token_counts, key_states, value_states, positions, is_real, 1
        )
        return means

    def ensure_tokens(self, key_states: torch.Tensor) -> None:
        """Room for every position of the blocks held (`block_counts` `[B, C]`), zeros where no token is."""
        num_positions = self.block_counts.shape[1] * self.compress_block_size
        if self.token_keys is None:
            batch, kv_heads, _, head_dim = key_states.shape
            self.token_keys = key_states.new_zeros(batch, kv_heads, num_positions, head_dim)
            self.token_values = torch.zeros_like(self.token_keys)
            self.token_counts = self.block_counts.new_zeros(batch, num_positions)
            return
        extra_positions = num_positions - self.token_counts.shape[1]
        if extra_positions > 0:
            self.token_keys, self.token_values = (
                F.pad(buffer, (0, 0, 0, extra_positions)) for buffer in (self.token_keys, self.token_values)
            )
            self.token_counts = F.pad(self.token_counts, (0, extra_positions))

    def block_tokens(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token keys and values `[B, K, C * b, D]` by position, and which positions hold a real token `[B, C * b]`."""
        return self.token_keys, self.token_values, self.token_counts > 0


class OnePassSelectiveBlocks(BlockTokens, OnePassBlocks):
    """The block state and block tokens of one forward pass of a selective layer without a cache."""


class DynamicSelectiveLayer(BlockTokens, DynamicCompressedLayer):
    """Cache of a `selective_attention` layer: the dynamic layer's window and block state, and the tokens of every
    block (`BlockTokens`): O(window + length) where the dynamic layer keeps O(window + length / b). Croppable as the
    dynamic layer: a rollback also clears the removed tokens' positions."""

    def row_state_names(self) -> tuple[str, ...]:
        return (*self.BLOCK_STATE, *self.TOKEN_STATE)

    def reset(self) -> None:
        super().reset()
        self.token_keys = None

    def crop(self, tokens_to_remove: int) -> None:
        """`DynamicCompressedLayer.crop`, and the removed real tokens' positions emptied."""
        removed = self.recorded_tail(-tokens_to_remove)
        super().crop(tokens_to_remove)
        if removed is None:
            return
        positions, is_real = removed
        emptied = torch.zeros_like(self.token_counts)
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        emptied.index_put_((rows, positions), is_real.to(emptied.dtype), accumulate=True)
        emptied = emptied > 0
        self.token_counts.masked_fill_(emptied, 0)
        for buffer in (self.token_keys, self.token_values):
            buffer.masked_fill_(emptied[:, None, :, None], 0)

    def recorded_tail(self, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Positions and is_real `[B, count]` of the last `count` recorded tokens; None where there are none to
        remove or `crop` will refuse (too many, nothing recorded)."""
        recorded = sum(keys.shape[2] for keys, *_ in self.recorded_tokens)
        if count <= 0 or count > recorded or not self.record_past:
            return None
        _, _, positions, is_real = self.recorded_tokens_kept(recorded)
        return positions[:, recorded - count :], is_real[:, recorded - count :]


class DynamicSinkSlidingLayer(SinkTokens, DynamicSlidingLayer):
    """Cache of a `sliding_attention` layer with attention sinks: the last window - 1 and the sinks (`SinkTokens`)."""

    def __init__(self, sliding_window: int, num_sink_tokens: int):
        super().__init__(sliding_window=sliding_window)
        self.num_sink_tokens = num_sink_tokens


class DynamicSinkCompressedLayer(SinkTokens, DynamicCompressedLayer):
    """Cache of a `dynamic_attention` layer with attention sinks: its local branch's window keeps them."""

    def __init__(self, sliding_window: int, compress_block_size: int, num_sink_tokens: int):
        super().__init__(sliding_window, compress_block_size)
        self.num_sink_tokens = num_sink_tokens


class DynamicSinkSelectiveLayer(SinkTokens, DynamicSelectiveLayer):
    """Cache of a `selective_attention` layer with attention sinks: its local branch's window keeps them."""

    def __init__(self, sliding_window: int, compress_block_size: int, num_sink_tokens: int):
        super().__init__(sliding_window, compress_block_size)
        self.num_sink_tokens = num_sink_tokens


class StaticRolledLayer(StaticLayer):
    """Fixed `[B, K, N + 1, D]` buffers holding the last N + 1 keys and values, for `torch.compile`.

    Slot N holds the newest token; slots [0, N) are a ring of the N before it, the j-th token to leave slot N going
    to slot j % N. A one-token step (decode) therefore writes two slots and returns the buffers themselves: the
    query is the last returned key and every other real slot is within its window, so their order does not matter,
    and no step copies the cache. A longer step (prefill) returns the past in time order followed by the new tokens
    (`[B, K, P + T, D]`, queries last; P = the slots written so far, or all N + 1 in compiled code, which reads no
    count) and writes only the slots that change: the new tokens' and that of the token leaving slot N. Slots not yet
    written are zeros, flagged not real in `slot_is_real` `[B, N + 1]`, which moves with the keys. The tokens seen (at
    most `max_positions`) are counted in `cumulative_length`, a 0-d device tensor as in Transformers' `StaticLayer`:
    a Python int that changes every step would make every compiled decode step a new CUDA graph.

    With attention sinks (`num_sink_tokens` n > 0, windowed layers) the buffers have n more slots, ahead of the
    window's (`[B, K, n + N + 1, D]`, the ring and the newest slot shifted by n): slot j holds each row's j-th real
    token, written when it arrives, and is flagged real only once that token has left the window (before, the
    window's copy is seen; never both). `sink_columns` `[B, n]` holds the value of `cumulative_length` at which each
    arrived (the rings' clock) and `sink_counts` `[B]` how many a row has. Every step returns the sink slots first
    (outside compiled code from the first step after which one can have left the window), so the windowed rule's
    sink clause (`attention_masks`) counts the sinks that left, then the rest in time order in a longer step; in a
    one-token step the real ring slots that it counts after them are within the window anyway. The sink slots are
    written by the same `index_copy_` as the window's: a decode step writes n + 2 slots.
    """

    def __init__(self, max_positions: int, kept_length: int, dynamic_length: bool = False, num_sink_tokens: int = 0):
        self.ring_length = max(kept_length, 1)
        self.window_slots = self.ring_length + 1
        self.num_sink_tokens = num_sink_tokens
        super().__init__(max_cache_len=num_sink_tokens + self.window_slots)
        self.max_positions = max_positions
        self.dynamic_length = dynamic_length

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        # Which slots hold real tokens: never-written slots and left padding are False.
        self.slot_is_real = torch.zeros(self.batch_size, self.max_cache_len, dtype=torch.bool, device=self.device)
        if self.num_sink_tokens:
            self.sink_columns = torch.zeros(self.batch_size, self.num_sink_tokens, dtype=torch.long, device=self.device)
            self.sink_counts = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        if not torch.compiler.is_compiling():
            for buffer in (self.slot_is_real, *self.sink_buffers()):
                torch._dynamo.mark_static_address(buffer)
            if self.dynamic_length and self.window_slots == self.max_positions:  # the buffers follow the length
                for buffer in (self.keys, self.values, self.slot_is_real):
                    torch._dynamo.maybe_mark_dynamic(buffer, 2 if buffer.dim() == 4 else 1)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Append `[B, K, T, D]` keys and values; return the kept past and them, queries last, and which returned
        keys are real tokens (module docstring). `attention_mask` `[B, past + T]` or `[B, T]` (None: all real)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if attention_mask is None:
            is_real = torch.ones(key_states.shape[0], key_states.shape[2], dtype=torch.bool, device=self.device)
        else:
            is_real = attention_mask[:, -key_states.shape[2] :].bool()
        if key_states.shape[2] == 1:
            self.push_one(key_states, value_states, is_real)
            return self.keys, self.values, self.slot_is_real
        past_order, window_length = self.returned_past()
        # A token keeps its slot once in the ring (token t in slot t % N, the newest in slot N): only the new tokens
        # and the one leaving slot N are written, the last min(P + T, T + 1, N + 1) of the window's returned keys,
        # oldest first. Rewriting the whole kept past instead made each prefill chunk copy a full layer's every slot.
        stored = min(window_length + key_states.shape[2], key_states.shape[2] + 1, self.window_slots)
        sink_writes = self.sink_writes(key_states, value_states, is_real) if self.num_sink_tokens else None
        self.cumulative_length.add_(key_states.shape[2])
        all_keys = torch.cat([self.keys.index_select(2, past_order), key_states], dim=2)
        all_values = torch.cat([self.values.index_select(2, past_order), value_states], dim=2)
        key_is_real = torch.cat([self.slot_is_real.index_select(1, past_order), is_real], dim=1)
        writes = (self.window_order()[-stored:], all_keys[:, :, -stored:], all_values[:, :, -stored:])
        self.write_slots(*writes, key_is_real[:, -stored:], sink_writes)
        # Only the new tokens came back (a first prefill) and none is padding: no mask at all.
        only_new_real_tokens = attention_mask is None and all_keys.shape[2] == key_states.shape[2]
        return all_keys, all_values, None if only_new_real_tokens else key_is_real

    def returned_past(self) -> tuple[torch.Tensor, int]:
        """The slots a longer step returns ahead of its new tokens (the sink slots, then the window's oldest first)
        and how many of them are the window's. Outside compiled code the slots never written are left out, and the
        sink slots until one can have left the window: a first prefill attends to its own tokens only (causal
        kernels, no mask), not to empty slots besides."""
        past_order = self.window_order()
        window_length = self.window_slots
        sinks_returned = self.num_sink_tokens > 0
        if not torch.compiler.is_compiling():
            seen = int(self.cumulative_length)
            window_length = min(seen, self.window_slots)
            past_order = past_order[self.window_slots - window_length :]
            sinks_returned = sinks_returned and seen > self.window_slots
        if sinks_returned:
            past_order = torch.cat([self.sink_slots(), past_order])
        return past_order, window_length

    def window_order(self) -> torch.Tensor:
        """The window's slots from the oldest kept token to the newest (slot n + N)."""
        newest_slot = torch.full((1,), self.keys.shape[2] - 1, dtype=torch.long, device=self.device)
        return torch.cat([self.ring_slots(self.cumulative_length), newest_slot])

    def ring_slots(self, tokens_seen: torch.Tensor) -> torch.Tensor:
        """The ring's slots oldest first, after `tokens_seen` tokens (the newest of them in slot n + N)."""
        # Read off the buffer: symbolic in code compiled for any length.
        ring_length = self.keys.shape[2] - 1 - self.num_sink_tokens
        tokens_in_ring = (tokens_seen - 1).clamp(min=0)
        slots = (tokens_in_ring + torch.arange(ring_length, device=self.device)) % ring_length
        return slots + self.num_sink_tokens if self.num_sink_tokens else slots

    def push_one(self, key_states: torch.Tensor, value_states: torch.Tensor, is_real: torch.Tensor) -> None:
        """Move the newest token from slot n + N into the ring, over its oldest slot, and write the new one in slot
        n + N (and in its row's next sink slot, if it is one of the row's first n real tokens)."""
        sink_writes = self.sink_writes(key_states, value_states, is_real) if self.num_sink_tokens else None
        oldest = self.ring_slots(self.cumulative_length)[:1]
        slots = torch.cat([oldest, oldest.new_full((1,), self.keys.shape[2] - 1)])
        newest = slice(-1, None)
        self.write_slots(
            slots,
            torch.cat([self.keys[:, :, newest], key_states], dim=2),
            torch.cat([self.values[:, :, newest], value_states], dim=2),
            torch.cat([self.slot_is_real[:, newest], is_real], dim=1),
            sink_writes,
        )
        self.cumulative_length.add_(1)

    def write_slots(
        self,
        slots: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        is_real: torch.Tensor,
        sink_writes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    ) -> None:
        """Write window slots `slots` `[L]` (keys, values `[B, K, L, D]`, `is_real` `[B, L]`) and the sink slots'
        new contents (`sink_writes`, or None without sinks). One `index_copy_` per buffer, as in Transformers'
        `StaticLayer`: compiled code does that in place, where a second write into a slice of the same buffer made
        inductor copy the whole buffer every step."""
        if sink_writes is not None:
            sink_keys, sink_values, sink_is_real = sink_writes
            slots = torch.cat([self.sink_slots(), slots])
            keys, values = torch.cat([sink_keys, keys], dim=2), torch.cat([sink_values, values], dim=2)
            is_real = torch.cat([sink_is_real, is_real], dim=1)
        self.keys.index_copy_(2, slots, keys)
        self.values.index_copy_(2, slots, values)
        self.slot_is_real.index_copy_(1, slots, is_real)

    def sink_writes(
        self, key_states: torch.Tensor, value_states: torch.Tensor, is_real: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sink slots after a step of `[B, K, T, D]` new tokens (`is_real` `[B, T]`), call before it advances
        the clock: keys and values `[B, K, n, D]` and which are real `[B, n]`, as of the clock after the step.
        `sink_columns` and `sink_counts` are updated in place. Tensor arithmetic only, no host read."""
        kv_heads, query_length = key_states.shape[1:3]
        rank = self.sink_counts[:, None] + is_real.cumsum(1) - 1  # [B, T]: each real token's rank in its row
        arrives = is_real[:, :, None] & (rank[:, :, None] == self.sink_slots())  # [B, T, n]: token t is sink j
        arrived = arrives.any(1)  # [B, n]
        source = (arrives * torch.arange(query_length, device=self.device)[None, :, None]).sum(1)  # [B, n]
        sink_states = []
        for buffer, states in ((self.keys, key_states), (self.values, value_states)):
            gathered = states.gather(2, source[:, None, :, None].expand(-1, kv_heads, -1, states.shape[-1]))
            sink_states.append(torch.where(arrived[:, None, :, None], gathered, buffer[:, :, : self.num_sink_tokens]))
        self.sink_columns.copy_(torch.where(arrived, self.cumulative_length + source, self.sink_columns))
        self.sink_counts.add_(arrived.sum(1))
        # The window holds the last N + 1 tokens: a sink has left it once N + 1 arrived after it.
        left_window = self.sinks_arrived_before(self.cumulative_length + query_length - self.window_slots)
        return *sink_states, left_window

    def sinks_arrived_before(self, tokens_seen: int | torch.Tensor) -> torch.Tensor:
        """`[B, n]` bool: the sink slots holding a token that arrived among the first `tokens_seen` (the clock)."""
        return (self.sink_slots() < self.sink_counts[:, None]) & (self.sink_columns < tokens_seen)

    def sink_slots(self) -> torch.Tensor:
        """The sink slots' indices, `[n]`: the first n of the buffers."""
        return torch.arange(self.num_sink_tokens, device=self.device)

    def get_seq_length(self) -> torch.Tensor:
        """Tokens seen, a 0-d tensor (`int()` it outside compiled code)."""
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.max_positions

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Keys returned by the next `update` outside compiled code and the position of the oldest (negative while
        slots are empty; with sinks, as if the returned keys were consecutive)."""
        seen = int(self.cumulative_length)
        returned = self.max_cache_len if query_length == 1 else self.returned_past()[0].shape[0] + query_length
        return returned, seen + query_length - returned

    @property
    def is_croppable(self) -> bool:
        """Whether `crop` can roll back: only where the buffers hold every position the cache may see (full layers,
        windows of at least `max_cache_len`), as Transformers' `StaticSlidingWindowLayer`: a token that left the
        window is gone."""
        return self.window_slots >= self.max_positions

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` tokens (a negative count, as Transformers passes it), in place."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop takes minus the number of tokens to remove (Transformers' convention); got {tokens_to_remove}."
            )
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        if not self.is_croppable:
            raise ValueError(
                f"This static cache layer keeps the last {self.window_slots} of up to {self.max_positions} positions; "
                "the tokens that left its window are gone, so it cannot roll back. For assisted or prompt-lookup "
                "decoding use the dynamic cache (cache_implementation='dynamic'), or a max_cache_len no larger than "
                "every window (sliding_window, dynamic_window)."
            )
        seen = int(self.cumulative_length)
        if -tokens_to_remove > seen:
            raise ValueError(f"Cannot remove {-tokens_to_remove} tokens from a cache layer that holds {seen}.")
        kept = seen + tokens_to_remove
        # The ring never wrapped: token t sits in slot n + t and the newest in slot n + N. Token kept - 1 becomes the
        # newest. No sink has left the window: their slots are flagged not real, and those of removed tokens empty.
        first_slot, newest_slot = self.num_sink_tokens, self.num_sink_tokens + self.ring_length
        if kept > 0:
            source = torch.tensor([first_slot + kept - 1], device=self.device)
            newest = torch.tensor([newest_slot], device=self.device)
            self.keys.index_copy_(2, newest, self.keys.index_select(2, source))
            self.values.index_copy_(2, newest, self.values.index_select(2, source))
            self.slot_is_real.index_copy_(1, newest, self.slot_is_real.index_select(1, source))
        self.slot_is_real[:, first_slot + max(kept - 1, 0) : newest_slot].zero_()
        if kept == 0:
            self.slot_is_real.zero_()
        if self.num_sink_tokens:
            self.sink_counts.copy_(self.sinks_arrived_before(kept).sum(1))
        self.cumulative_length.sub_(-tokens_to_remove)

    def reset(self) -> None:
        """Zero the buffers in place (they keep their address) and forget the positions seen."""
        if self.is_initialized:
            for buffer in self.batch_buffers():
                buffer.zero_()
        self.cumulative_length.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch in place, so that the buffers keep their address."""
        if self.is_initialized:
            for buffer in self.batch_buffers():
                buffer.copy_(buffer.index_select(0, beam_idx.to(buffer.device)))

    def batch_buffers(self) -> list[torch.Tensor]:
        """Every tensor indexed by batch."""
        return [self.keys, self.values, self.slot_is_real, *self.sink_buffers()]

    def sink_buffers(self) -> list[torch.Tensor]:
        """The tensors of `sink_state_names()` (the sink slots themselves are in the key, value and flag buffers)."""
        return [getattr(self, name) for name in self.sink_state_names()]

    def sink_state_names(self) -> tuple[str, ...]:
        """The sinks' arrivals and counts, where the layer keeps sinks."""
        return ("sink_columns", "sink_counts") if self.num_sink_tokens else ()

    def slot_order(self) -> torch.Tensor:
        """Every slot: the sink slots, then the window's from the oldest kept token to the newest."""
        if not self.num_sink_tokens:
            return self.window_order()
        return torch.cat([self.sink_slots(), self.window_order()])

    def state_names(self) -> list[str]:
        """The attributes holding the layer's state (ExecuTorch export registers them as buffers)."""
        return ["keys", "values", "slot_is_real", *self.sink_state_names(), "cumulative_length"]


class StaticCompressedLayer(CompressedBlocks, StaticRolledLayer):
    """Static cache of a `dynamic_attention` layer: the rolled window plus the block state of every block."""

    def __init__(
        self,
        max_positions: int,
        kept_length: int,
        compress_block_size: int,
        dynamic_length: bool = False,
        num_sink_tokens: int = 0,
    ):
        super().__init__(max_positions, kept_length, dynamic_length, num_sink_tokens)
        self.compress_block_size = compress_block_size
        self.max_blocks = -(-max_positions // compress_block_size)
        self.start_rollback_point()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.allocate_blocks(key_states, self.max_blocks)
        if not torch.compiler.is_compiling():
            for buffer in self.block_buffers():
                torch._dynamo.mark_static_address(buffer)
            if self.dynamic_length:  # the blocks dim of [B, K, C, D] entries and [B, C] counts
                for buffer in (self.compressed_keys, self.compressed_values, self.block_counts):
                    torch._dynamo.maybe_mark_dynamic(buffer, 2 if buffer.dim() == 4 else 1)

    def ensure_blocks(self, key_states: torch.Tensor) -> None:
        """Every block of `max_positions` has its place from the start."""

    def batch_buffers(self) -> list[torch.Tensor]:
        return [*super().batch_buffers(), *self.block_buffers()]

    def state_names(self) -> list[str]:
        return [*super().state_names(), *self.BLOCK_STATE]


def check_positions_follow_cache(cache: Cache, position_ids: torch.Tensor, is_real: torch.Tensor | None) -> None:
    """Raise a ValueError if a real new token's position (`position_ids` `[B or 1, T]`, `is_real` `[B, T]` or None)
    falls in a block before its row's open block in the cache's dynamic layers: a closed block keeps its compressed
    entry only, and cannot take more tokens. Every dynamic layer sees the same positions, so the first one tells.

    On an accelerator one-token steps are not checked (as `check_token_ids`): the check would synchronise every
    decode step, and generate() derives their positions from the attention mask, which never goes back."""
    if position_ids.device.type != "cpu" and position_ids.shape[1] == 1:
        return
    for layer in cache.layers:
        if isinstance(layer, CompressedBlocks) and getattr(layer, "block_counts", None) is not None:
            blocks = position_ids // layer.compress_block_size
            behind = blocks < layer.open_blocks[:, None]
            if is_real is not None:
                behind = behind & is_real
            if bool(behind.any()):
                row, token = (int(index) for index in behind.nonzero()[0])
                raise ValueError(
                    f"position_ids[{row}, {token}] = {int(position_ids[min(row, position_ids.shape[0] - 1), token])} "
                    f"falls in block {int(blocks[min(row, blocks.shape[0] - 1), token])} of "
                    f"{layer.compress_block_size} positions, but row {row} of the cache has already closed that block "
                    "(a dynamic_attention layer keeps one compressed entry per closed block, not its sums). With a "
                    "cache, positions must not go back to an earlier block: leave position_ids out (they then count "
                    "the real tokens) or continue them from the cached ones."
                )
            return


def check_positions_are_distinct(cache: Cache | None, position_ids: torch.Tensor, is_real: torch.Tensor | None) -> None:
    """Raise a ValueError if two real tokens of a row share a position: in this call (`position_ids` `[B or 1, T]`,
    `is_real` `[B, T]` or None), or a new one with a token that the cache's selective layers hold. A selective layer
    keeps one token per position (`BlockTokens`). On an accelerator one-token steps are not checked (as
    `check_positions_follow_cache`)."""
    if position_ids.device.type != "cpu" and position_ids.shape[1] == 1:
        return
    batch = position_ids.shape[0] if is_real is None else is_real.shape[0]
    positions = position_ids.expand(batch, -1)
    real = torch.ones_like(positions) if is_real is None else is_real.long()
    tokens_at = torch.zeros(batch, int(positions.max()) + 1, dtype=torch.long, device=positions.device)
    tokens_at.index_put_((torch.arange(batch, device=positions.device)[:, None], positions), real, accumulate=True)
    held = next((layer for layer in getattr(cache, "layers", []) if isinstance(layer, BlockTokens)), None)
    if held is not None and held.token_keys is not None:
        width = min(tokens_at.shape[1], held.token_counts.shape[1])
        tokens_at[:, :width] += (held.token_counts[:, :width] > 0).long()
    if bool((tokens_at > 1).any()):
        row, position = (int(index) for index in (tokens_at > 1).nonzero()[0])
        raise ValueError(
            f"Row {row} has two real tokens at position {position}: a selective_attention layer keeps one token per "
            "position. Leave position_ids out (they then count the real tokens) or give each real token of a row "
            "its own position."
        )


def layer_signature(config: FastGPTConfig) -> tuple:
    """What a cache's layers depend on in the config: the layer kinds, the window and block sizes and the sinks."""
    return (
        tuple(config.layer_types),
        config.sliding_window,
        config.dynamic_window,
        config.compress_block_size,
        config.num_sink_tokens,
    )


class KeyMaskCache:
    """`update` of both FastGPT caches: one contract for every layer kind (module docstring)."""

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store `[B, K, T, D]` keys and values in layer `layer_idx`; return its keys and values `[B, K, S, D]`
        (queries are the last T) and which keys are real, `[B or 1, S]` bool or None (all real).

        `attention_mask` `[B, past + T]` (the static cache also takes `[B, T]`, the new tokens') or None. Offloading
        as in Transformers' `Cache.update`: the next offloaded layer is prefetched, this one offloaded after."""
        if self.offloading:
            torch.cuda.default_stream(key_states.device).wait_stream(self.prefetch_stream)
            self.prefetch_stream.wait_stream(torch.cuda.default_stream(key_states.device))
            self.prefetch(layer_idx + 1, self.only_non_sliding)
        returned = self.layers[layer_idx].update(key_states, value_states, attention_mask)
        if self.offloading:
            self.offload(layer_idx, self.only_non_sliding)
        return returned


def dynamic_layer(config: FastGPTConfig, layer_type: str) -> DynamicLayer:
    """The dynamic cache's layer for a `layer_type` layer; its windows keep the attention sinks where
    `config.num_sink_tokens` > 0."""
    window, sinks = config.attention_window(layer_type), config.num_sink_tokens
    if layer_type == DYNAMIC:
        if sinks:
            return DynamicSinkCompressedLayer(window, config.compress_block_size, sinks)
        return DynamicCompressedLayer(window, config.compress_block_size)
    if layer_type == SELECTIVE:
        if sinks:
            return DynamicSinkSelectiveLayer(window, config.compress_block_size, sinks)
        return DynamicSelectiveLayer(window, config.compress_block_size)
    if window is None:
        return DynamicFullLayer()
    return DynamicSinkSlidingLayer(window, sinks) if sinks else DynamicSlidingLayer(sliding_window=window)


class FastGPTDynamicCache(KeyMaskCache, DynamicCache):
    """A `DynamicCache` whose layers follow `config.layer_types`; `generate()` builds it by itself."""

    def __init__(self, config: FastGPTConfig, offloading: bool = False):
        layers = [dynamic_layer(config, layer_type) for layer_type in config.layer_types]
        # DynamicCache's own constructor knows only Transformers' layer kinds: build the layers here instead.
        Cache.__init__(self, layers=layers, offloading=offloading, offload_only_non_sliding=False)
        self.layer_signature = layer_signature(config)

    def check_room(self, past_length: int, query_length: int) -> None:
        """Nothing to check: the dynamic cache grows with the input."""

    def attention_mask_lengths(self, query_length: int) -> tuple[int, ...]:
        """The attention_mask widths a forward of `query_length` new tokens takes: every token so far."""
        return (int(self.get_seq_length()) + query_length,)


class FastGPTStaticCache(KeyMaskCache, StaticCache):
    """Fixed-size buffers for at most `max_cache_len` positions: `cache_implementation="static"` and compile.

    `dynamic_length=True` marks the dimensions that follow `max_cache_len` (full layers' slots, dynamic layers'
    blocks) dynamic for `torch.compile`, so that one compiled decode step serves caches of every length
    (`generation_fast_path`); otherwise a cache of another length compiles the step again."""

    def __init__(
        self, config: FastGPTConfig, max_cache_len: int, offloading: bool = False, dynamic_length: bool = False
    ):
        if SELECTIVE in config.layer_types:
            raise ValueError(
                "FastGPTStaticCache has no selective_attention layer (its block tokens grow with the length, which "
                "the static cache's fixed buffers, compile, ExecuTorch export and serving rows do not provide yet). "
                "Use FastGPTDynamicCache (generate(): cache_implementation='dynamic', the default on the CPU), or "
                "turn the selective layers into dynamic_attention in config.layer_types."
            )
        layers = []
        for layer_type in config.layer_types:
            window = config.attention_window(layer_type)
            # The past a query can see beside itself; with the newest slot the window holds min(window, max_cache_len).
            kept_length = min(window or max_cache_len, max_cache_len) - 1
            sinks = 0 if window is None else config.num_sink_tokens  # full layers see every token anyway
            if layer_type == DYNAMIC:
                layers.append(
                    StaticCompressedLayer(max_cache_len, kept_length, config.compress_block_size, dynamic_length, sinks)
                )
            else:
                layers.append(StaticRolledLayer(max_cache_len, kept_length, dynamic_length, sinks))
        Cache.__init__(self, layers=layers, offloading=offloading)
        self.max_cache_len = max_cache_len
        self.layer_signature = layer_signature(config)

    def check_room(self, past_length: int, query_length: int) -> None:
        """Raise a ValueError if `query_length` more tokens after `past_length` exceed `max_cache_len`."""
        if past_length + query_length > self.max_cache_len:
            raise ValueError(
                f"The static cache holds {self.max_cache_len} positions and has seen {past_length}; {query_length} "
                "more do not fit. Build it with a larger max_cache_len (generate(): generation_config.max_cache_len "
                "or a larger max_new_tokens)."
            )

    def attention_mask_lengths(self, query_length: int) -> tuple[int, ...]:
        """The attention_mask widths a forward of `query_length` new tokens takes: every token so far, or the new
        tokens alone (the cache flags its real slots itself). In compiled code only the latter: the cache's 0-d
        counter stays unread there, since reading it would synchronize."""
        if torch.compiler.is_compiling():
            return (query_length,)
        return (int(self.get_seq_length()) + query_length, query_length)


class FastGPTRowCache(FastGPTStaticCache):
    """A static cache whose `max_rows` batch rows hold unrelated sequences, each at its own position: the state of
    continuous batching (`fastgpt_hf.serving`).

    A sequence enters a row by `load_rows` from the `FastGPTStaticCache` that prefilled it; a decode step then
    runs over every row at once, with `position_ids` `[B, 1]` (each row's own position) and the mask `[B, 1]` of the
    rows that hold a sequence (a free row's token is padding: it changes nothing that a later `load_rows` keeps).
    The layers' counters advance by one per decode step for every row: they are the rings' clock, not a length.
    `row_lengths` holds each row's tokens, set by whoever drives the rows, and `get_seq_length()` the longest, which
    is what the model checks positions and `max_cache_len` against outside compiled code."""

    def __init__(self, config: FastGPTConfig, max_cache_len: int, max_rows: int):
        super().__init__(config, max_cache_len)
        self.max_rows = max_rows
        self.row_lengths = [0] * max_rows

    def get_seq_length(self, layer_idx: int = 0) -> int | torch.Tensor:
        if torch.compiler.is_compiling():
            # Read by no compiled code; a Python value that changes every step would recompile every step.
            return super().get_seq_length(layer_idx)
        return max(self.row_lengths)

    @torch.no_grad()
    def load_rows(self, source: FastGPTStaticCache, rows: list[int], lengths: list[int]) -> None:
        """Overwrite rows `rows` with the sequences of `source` (a static cache of the same config and
        `max_cache_len` that prefilled them, `source` row i into `rows[i]`, left padding allowed), `lengths[i]`
        real tokens each: every slot, block and sink, the slots laid out oldest first in this cache's ring order, so
        that the next decode steps evict them in time order (left padding, never real, first). One indexed copy
        per buffer for all rows."""
        self.copy_rows(source, torch.tensor(rows, dtype=torch.long, device=self.layers[0].device))
        for row, length in zip(rows, lengths, strict=True):
            self.row_lengths[row] = length

    @torch.no_grad()
    def copy_rows(self, source: FastGPTStaticCache, targets: torch.Tensor) -> None:
        """`load_rows`'s copies, `source` row i into row `targets[i]` (a device tensor: no host value is read, so
        the copies can be compiled, or captured in a CUDA graph, with the forward that filled `source`); the
        caller sets `row_lengths`. Rows of `targets` named twice must receive equal sequences."""
        count = targets.shape[0]
        for layer, source_layer in zip(self.layers, source.layers, strict=True):
            order, source_order = layer.slot_order(), source_layer.slot_order()
            # x[rows, :, order] indexes `[n, slots, K, D]`: the advanced indices' dimensions come first.
            for buffer, source_buffer in ((layer.keys, source_layer.keys), (layer.values, source_layer.values)):
                buffer[targets[:, None], :, order[None, :]] = source_buffer[:count, :, source_order].transpose(1, 2)
            layer.slot_is_real[targets[:, None], order[None, :]] = source_layer.slot_is_real[:count, source_order]
            if isinstance(layer, StaticCompressedLayer):
                for buffer, source_buffer in zip(layer.block_buffers(), source_layer.block_buffers(), strict=True):
                    buffer[targets] = source_buffer[:count]
            if layer.num_sink_tokens:  # the sinks' arrivals on this cache's clock: they leave the window as in `source`
                clock_shift = layer.cumulative_length - source_layer.cumulative_length
                layer.sink_columns[targets] = source_layer.sink_columns[:count] + clock_shift
                layer.sink_counts[targets] = source_layer.sink_counts[:count]


def check_cache(cache: Cache, config: FastGPTConfig, batch_size: int) -> None:
    """Raise a `ValueError` unless `cache` was built for this model's layers and holds `batch_size` rows."""
    if not isinstance(cache, (FastGPTDynamicCache, FastGPTStaticCache)):
        raise ValueError(  # noqa: TRY004 (ValueError like every other bad-input error of the model)
            f"FastGPT needs a cache whose layers follow config.layer_types, got a {type(cache).__name__}. "
            "Pass cache=None (forward and generate() build one), FastGPTDynamicCache(model.config) "
            "or FastGPTStaticCache(model.config, max_cache_len)."
        )
    if cache.layer_signature != layer_signature(config):
        raise ValueError(
            f"This cache was built for layers {cache.layer_signature} (layer_types, sliding_window, dynamic_window, "
            f"compress_block_size, num_sink_tokens) but the model has {layer_signature(config)}; "
            "build the cache from this model's config."
        )
    # Under tensor parallelism (Transformers sets `config.distributed_config`) a rank holds its share of the heads.
    tensor_parallel_size = getattr(getattr(config, "distributed_config", None), "tp_size", 1)
    for layer in cache.layers:
        if layer.is_initialized and layer.keys.dim() == 4:
            expected = (batch_size, config.num_key_value_heads // tensor_parallel_size, config.head_dim)
            held = (layer.keys.shape[0], layer.keys.shape[1], layer.keys.shape[3])
            if held != expected:
                raise ValueError(
                    f"The cache holds (batch, kv heads, head_dim) = {held} but the input needs {expected}; "
                    "continue a cache only with the rows (and model) that filled it."
                )
            return


__all__ = [
    "DynamicCompressedLayer",
    "DynamicFullLayer",
    "DynamicSelectiveLayer",
    "DynamicSinkCompressedLayer",
    "DynamicSinkSelectiveLayer",
    "DynamicSinkSlidingLayer",
    "DynamicSlidingLayer",
    "FastGPTDynamicCache",
    "FastGPTRowCache",
    "FastGPTStaticCache",
    "OnePassBlocks",
    "OnePassSelectiveBlocks",
    "SinkTokens",
    "StaticCompressedLayer",
    "StaticRolledLayer",
    "check_cache",
    "check_positions_are_distinct",
    "check_positions_follow_cache",
    "kept_key_mask",
]
