"""The layers of `FastGPTDynamicCache`, one per layer kind (`dynamic_layer`; `cache_fastgpt` describes the
cache): Transformers' dynamic layers for full and sliding layers, the block state added for dynamic and selective
layers (`cache_blocks`), and `SinkTokens` for the windowed layers' attention sinks. Each `update` returns the kept
keys and values and which keys are real tokens, read off the 2D attention mask (`kept_key_mask`).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers.cache_utils import (
    DynamicLayer,
    DynamicSlidingWindowLayer,
)

from .cache_blocks import BlockTokens, CompressedBlocks
from .configuration_fastgpt import DYNAMIC, SELECTIVE, FastGPTConfig


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
