"""Generation state of FastGPT: what each layer kind keeps between decoding steps (DESIGN.md section 4).

Two caches, both built from `config.layer_types` (`generate()` builds them by itself):

`FastGPTDynamicCache` (the default; memory grows only where the layer kind needs it):
- `full_attention`: Transformers' `DynamicLayer`, every key and value.
- `sliding_attention`: Transformers' `DynamicSlidingWindowLayer`, the last `sliding_window - 1` keys and values.
- `dynamic_attention`: `DynamicCompressedLayer`, the last `dynamic_window - 1` keys and values plus, per block of
  `compress_block_size` positions, the sum of its real tokens' pre-rotary keys and values, their count and the
  block's compressed entry (`CompressedBlocks`): O(window + length / b), and a decode step compresses one block.

`FastGPTStaticCache` (`cache_implementation="static"`, `torch.compile`): the same state in buffers allocated once.
Every layer keeps its last N + 1 keys and values, the newest in the last slot and the N before it in a ring
(N + 1 = the window, at most `max_cache_len`), so that a decode step writes a few slots instead of moving the
cache; the dynamic layer adds the block state for ceil(max_cache_len / b) blocks.

Layout contract of every layer's `update` (what the windowed backends in `attention_masks` expect): it returns the
kept past followed by the T new tokens, so queries are the last T of the S returned keys. The past is in time order,
except in the static cache's one-token step, where every real past key is within the query's window and its order
does not matter. Which returned keys are real tokens: the dynamic cache reads it off the 2D attention mask
(`kept_key_mask`); the static cache keeps a flag per slot (never-written slots and padding are False), so a compiled
decode step needs only the new tokens' mask and reads no Python int in tensor code: one CUDA graph serves every
step. `update_with_key_mask` gives both. The dynamic cache counts lengths in Python ints, the static cache in a
device tensor.
"""

from collections.abc import Callable

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
from .configuration_fastgpt import DYNAMIC, FULL, SLIDING, FastGPTConfig

# The attention's compressors: key and value block means `[B, K, C, D]` -> their compressed entries.
BlockCompressor = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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


class CompressedBlocks:
    """Block state of a `dynamic_attention` layer, shared by both caches: float32 (float64) sums and real-token counts
    of every block, `block_key_sums` / `block_value_sums` `[B, K, C, D]` and `block_counts` `[B, C]`, and each
    block's compressed entry, `compressed_keys` / `compressed_values` `[B, K, C, D]` in the keys' dtype.

    An entry is recomputed each time a token joins its block, so a one-token step compresses one block per row; the
    incomplete block's entry is never seen before its last token writes it (`block_visibility`)."""

    compress_block_size: int

    def add_and_compress(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        positions: torch.Tensor,
        is_real: torch.Tensor | None,
        compress: BlockCompressor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add the new tokens (pre-rotary `[B, K, T, D]`, positions `[B, T]`) to their blocks and recompress the
        blocks they joined (all blocks for T > 1). Returns compressed keys, values `[B, K, C, D]` and counts `[B, C]`.

        Call after `update`, so that the blocks cover every position seen."""
        self.ensure_blocks(key_states)
        block_ids, index = add_block_statistics(
            self.block_key_sums,
            self.block_value_sums,
            self.block_counts,
            key_states,
            value_states,
            positions,
            is_real,
            self.compress_block_size,
        )
        if key_states.shape[2] == 1:
            # Only the blocks the new tokens joined: `[B, K, 1, D]` means in, entries written back in place.
            counts = self.block_counts.gather(1, block_ids).clamp(min=1)[:, None, :, None]
            keys, values = compress(self.block_key_sums[index] / counts, self.block_value_sums[index] / counts)
            self.compressed_keys.index_put_(index, keys.to(self.compressed_keys.dtype))
            self.compressed_values.index_put_(index, values.to(self.compressed_values.dtype))
        else:
            denominator = self.block_counts.clamp(min=1)[:, None, :, None]
            keys, values = compress(self.block_key_sums / denominator, self.block_value_sums / denominator)
            self.compressed_keys.copy_(keys)
            self.compressed_values.copy_(values)
        return self.compressed_keys, self.compressed_values, self.block_counts

    def ensure_blocks(self, key_states: torch.Tensor) -> None:
        """Make room for every block of the positions seen."""
        raise NotImplementedError

    def allocate_blocks(self, key_states: torch.Tensor, num_blocks: int) -> None:
        """Zero block state for `num_blocks` blocks, shaped and typed after `[B, K, T, D]` keys."""
        batch, kv_heads, _, head_dim = key_states.shape
        sum_dtype = torch.promote_types(key_states.dtype, torch.float32)
        self.block_key_sums = key_states.new_zeros(batch, kv_heads, num_blocks, head_dim, dtype=sum_dtype)
        self.block_value_sums = torch.zeros_like(self.block_key_sums)
        self.block_counts = self.block_key_sums.new_zeros(batch, num_blocks)
        self.compressed_keys = key_states.new_zeros(batch, kv_heads, num_blocks, head_dim)
        self.compressed_values = torch.zeros_like(self.compressed_keys)

    def block_buffers(self) -> list[torch.Tensor]:
        return [
            self.block_key_sums,
            self.block_value_sums,
            self.block_counts,
            self.compressed_keys,
            self.compressed_values,
        ]


class DynamicCompressedLayer(CompressedBlocks, DynamicSlidingWindowLayer):
    """Cache of a `dynamic_attention` layer: a sliding window of keys/values plus growing block state."""

    # Blocks sums cannot be un-added, and the window has already dropped what a rollback would need.
    is_croppable = False

    def __init__(self, sliding_window: int, compress_block_size: int):
        super().__init__(sliding_window=sliding_window)
        self.compress_block_size = compress_block_size
        self.block_counts: torch.Tensor | None = None

    def ensure_blocks(self, key_states: torch.Tensor) -> None:
        """Allocate the block state, or grow it by the blocks begun since (a copy every b positions)."""
        num_blocks = -(-self.cumulative_length // self.compress_block_size)
        if self.block_counts is None:
            self.allocate_blocks(key_states, num_blocks)
            return
        extra_blocks = num_blocks - self.block_counts.shape[1]
        if extra_blocks > 0:
            self.block_key_sums, self.block_value_sums, self.compressed_keys, self.compressed_values = (
                F.pad(buffer, (0, 0, 0, extra_blocks))
                for buffer in (self.block_key_sums, self.block_value_sums, self.compressed_keys, self.compressed_values)
            )
            self.block_counts = F.pad(self.block_counts, (0, extra_blocks))

    def num_blocks(self) -> int:
        """Blocks held (complete or not): one entry per `compress_block_size` positions seen."""
        return 0 if self.block_counts is None else self.block_counts.shape[1]

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "A FastGPT dynamic_attention layer cannot be cropped: its block sums and window have moved on. "
            "Use generation modes without cache rollback (no assisted or prompt-lookup decoding)."
        )

    def reset(self) -> None:
        super().reset()
        self.block_counts = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.block_counts is not None:
            beam_idx = beam_idx.to(self.block_counts.device)
            self.set_block_buffers([buffer.index_select(0, beam_idx) for buffer in self.block_buffers()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.block_counts is not None:
            self.set_block_buffers([buffer.repeat_interleave(repeats, dim=0) for buffer in self.block_buffers()])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.block_counts is not None:
            self.set_block_buffers([buffer[indices, ...] for buffer in self.block_buffers()])

    def set_block_buffers(self, buffers: list[torch.Tensor]) -> None:
        """Replace the block state, in `block_buffers()` order."""
        (
            self.block_key_sums,
            self.block_value_sums,
            self.block_counts,
            self.compressed_keys,
            self.compressed_values,
        ) = buffers


class StaticRolledLayer(StaticLayer):
    """Fixed `[B, K, N + 1, D]` buffers holding the last N + 1 keys and values, for `torch.compile`.

    Slot N holds the newest token; slots [0, N) are a ring of the N before it, the j-th token to leave slot N going
    to slot j % N. A one-token step (decode) therefore writes two slots and returns the buffers themselves: the
    query is the last returned key and every other real slot is within its window, so their order does not matter,
    and no step copies the cache. A longer step (prefill) returns the past in time order followed by the new tokens
    (`[B, K, P + T, D]`, queries last; P = the slots written so far, or all N + 1 in compiled code, which reads no
    count) and stores the last N + 1 of them. Slots not yet written are zeros, flagged
    not real in `slot_is_real` `[B, N + 1]`, which moves with the keys. The tokens seen (at most `max_positions`) are
    counted in `cumulative_length`, a 0-d device tensor as in Transformers' `StaticLayer`: a Python int that changes
    every step would make every compiled decode step a new CUDA graph.
    """

    is_croppable = False

    def __init__(self, max_positions: int, kept_length: int):
        self.ring_length = max(kept_length, 1)
        super().__init__(max_cache_len=self.ring_length + 1)
        self.max_positions = max_positions

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        # Which slots hold real tokens: never-written slots and left padding are False.
        self.slot_is_real = torch.zeros(self.batch_size, self.max_cache_len, dtype=torch.bool, device=self.device)
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.slot_is_real)

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        *args,
        is_real: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append `[B, K, T, D]` keys and values (`is_real` `[B, T]`, None: all real); return the kept past and
        them, queries last. `returned_key_is_real` then says which of the returned keys are real tokens."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if is_real is None:
            is_real = torch.ones(key_states.shape[0], key_states.shape[2], dtype=torch.bool, device=self.device)
        if key_states.shape[2] == 1:
            self.push_one(key_states, value_states, is_real.bool())
            self.returned_key_is_real = self.slot_is_real
            return self.keys, self.values
        newest_slot = torch.full((1,), self.ring_length, dtype=torch.long, device=self.device)
        past_order = torch.cat([self.ring_slots(self.cumulative_length), newest_slot])
        if not torch.compiler.is_compiling():
            # Outside compiled code the slots never written are left out: a first prefill attends to its own tokens
            # only (causal kernels, no mask), not to max_cache_len empty slots besides.
            past_order = past_order[self.max_cache_len - min(int(self.cumulative_length), self.max_cache_len) :]
        self.cumulative_length.add_(key_states.shape[2])
        all_keys = torch.cat([self.keys.index_select(2, past_order), key_states], dim=2)
        all_values = torch.cat([self.values.index_select(2, past_order), value_states], dim=2)
        self.returned_key_is_real = torch.cat([self.slot_is_real.index_select(1, past_order), is_real.bool()], dim=1)
        # The last min(S, N + 1) returned tokens go to the ring, oldest first, and the newest to slot N.
        stored = min(all_keys.shape[2], self.max_cache_len)
        stored_order = torch.cat([self.ring_slots(self.cumulative_length), newest_slot])[-stored:]
        self.keys.index_copy_(2, stored_order, all_keys[:, :, -stored:])
        self.values.index_copy_(2, stored_order, all_values[:, :, -stored:])
        self.slot_is_real.index_copy_(1, stored_order, self.returned_key_is_real[:, -stored:])
        return all_keys, all_values

    def ring_slots(self, tokens_seen: torch.Tensor) -> torch.Tensor:
        """The ring's slots oldest first, after `tokens_seen` tokens (the newest of them in slot N)."""
        tokens_in_ring = (tokens_seen - 1).clamp(min=0)
        return (tokens_in_ring + torch.arange(self.ring_length, device=self.device)) % self.ring_length

    def push_one(self, key_states: torch.Tensor, value_states: torch.Tensor, is_real: torch.Tensor) -> None:
        """Move the newest token from slot N into the ring, over its oldest slot, and write the new one in slot N.

        One `index_copy_` per buffer, as in Transformers' `StaticLayer`: compiled code does that in place, where a
        second write into a slice of the same buffer made inductor copy the whole buffer every step."""
        oldest = self.ring_slots(self.cumulative_length)[:1]
        slots = torch.cat([oldest, oldest.new_full((1,), self.ring_length)])
        newest = slice(self.ring_length, None)
        self.keys.index_copy_(2, slots, torch.cat([self.keys[:, :, newest], key_states], dim=2))
        self.values.index_copy_(2, slots, torch.cat([self.values[:, :, newest], value_states], dim=2))
        self.slot_is_real.index_copy_(1, slots, torch.cat([self.slot_is_real[:, newest], is_real], dim=1))
        self.cumulative_length.add_(1)

    def get_seq_length(self) -> torch.Tensor:
        """Tokens seen, a 0-d tensor (`int()` it outside compiled code)."""
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.max_positions

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Keys returned by the next `update` outside compiled code and the position of the oldest (negative while
        slots are empty)."""
        seen = int(self.cumulative_length)
        returned = self.max_cache_len if query_length == 1 else min(seen, self.max_cache_len) + query_length
        return returned, seen + query_length - returned

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("FastGPT's static cache cannot be cropped; use generation modes without cache rollback.")

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
        return [self.keys, self.values, self.slot_is_real]


class StaticCompressedLayer(CompressedBlocks, StaticRolledLayer):
    """Static cache of a `dynamic_attention` layer: the rolled window plus block state for every block."""

    def __init__(self, max_positions: int, kept_length: int, compress_block_size: int):
        super().__init__(max_positions=max_positions, kept_length=kept_length)
        self.compress_block_size = compress_block_size
        self.max_blocks = -(-max_positions // compress_block_size)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.allocate_blocks(key_states, self.max_blocks)
        if not torch.compiler.is_compiling():
            for buffer in self.block_buffers():
                torch._dynamo.mark_static_address(buffer)

    def ensure_blocks(self, key_states: torch.Tensor) -> None:
        """Every block of `max_positions` has its place from the start."""

    def batch_buffers(self) -> list[torch.Tensor]:
        return [*super().batch_buffers(), *self.block_buffers()]


def update_with_key_mask(
    cache: Cache,
    layer_idx: int,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Store `[B, K, T, D]` keys and values in a layer of either cache; return all S keys, values and which are real.

    `attention_mask` `[B, past + T]` (or, with the static cache, `[B, T]` for the new tokens only) or None.
    Returns keys and values `[B, K, S, D]` (queries are the last T) and `[B or 1, S]` bool or None (all real).
    """
    layer = cache.layers[layer_idx]
    new_is_real = None if attention_mask is None else attention_mask[:, -key_states.shape[2] :]
    if isinstance(layer, StaticRolledLayer):
        all_keys, all_values = cache.update(key_states, value_states, layer_idx, is_real=new_is_real)
        # Only the new tokens came back (a first prefill) and none is padding: no mask at all.
        only_new_real_tokens = attention_mask is None and all_keys.shape[2] == key_states.shape[2]
        return all_keys, all_values, None if only_new_real_tokens else layer.returned_key_is_real
    seen_length = layer.get_seq_length() + key_states.shape[2]
    all_keys, all_values = cache.update(key_states, value_states, layer_idx)
    return all_keys, all_values, kept_key_mask(attention_mask, seen_length, all_keys.shape[2], all_keys.device)


def layer_signature(config: FastGPTConfig) -> tuple:
    """What a cache's layers depend on in the config: the layer kinds and the window and block sizes."""
    return (tuple(config.layer_types), config.sliding_window, config.dynamic_window, config.compress_block_size)


class FastGPTDynamicCache(DynamicCache):
    """A `DynamicCache` whose layers follow `config.layer_types`; `generate()` builds it by itself."""

    def __init__(self, config: FastGPTConfig, offloading: bool = False):
        layers = []
        for layer_type in config.layer_types:
            if layer_type == SLIDING:
                layers.append(DynamicSlidingWindowLayer(sliding_window=config.sliding_window))
            elif layer_type == DYNAMIC:
                layers.append(DynamicCompressedLayer(config.dynamic_window, config.compress_block_size))
            else:
                layers.append(DynamicLayer())
        # DynamicCache's own constructor knows only Transformers' layer kinds: build the layers here instead.
        Cache.__init__(self, layers=layers, offloading=offloading, offload_only_non_sliding=False)
        self.layer_signature = layer_signature(config)


class FastGPTStaticCache(StaticCache):
    """Fixed-size buffers for at most `max_cache_len` positions: `cache_implementation="static"` and compile."""

    def __init__(self, config: FastGPTConfig, max_cache_len: int, offloading: bool = False):
        layers = []
        for layer_type in config.layer_types:
            window = {SLIDING: config.sliding_window, DYNAMIC: config.dynamic_window, FULL: max_cache_len}
            # The past a query can see beside itself; with the newest slot the buffers hold min(window, max_cache_len).
            kept_length = min(window[layer_type], max_cache_len) - 1
            if layer_type == DYNAMIC:
                layers.append(StaticCompressedLayer(max_cache_len, kept_length, config.compress_block_size))
            else:
                layers.append(StaticRolledLayer(max_cache_len, kept_length))
        Cache.__init__(self, layers=layers, offloading=offloading)
        self.max_cache_len = max_cache_len
        self.layer_signature = layer_signature(config)


class FastGPTRowCache(FastGPTStaticCache):
    """A static cache whose `max_rows` batch rows hold unrelated sequences, each at its own position: the state of
    continuous batching (`fastgpt_hf.serving`).

    A sequence enters a row by `load_row` from the batch-1 `FastGPTStaticCache` that prefilled it; a decode step then
    runs over every row at once, with `position_ids` `[B, 1]` (each row's own position) and the mask `[B, 1]` of the
    rows that hold a sequence (a free row's token is padding: it changes nothing that a later `load_row` keeps).
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
    def load_row(self, source: FastGPTStaticCache, row: int) -> None:
        """Overwrite row `row` with the one sequence of `source` (a batch-1 static cache of the same config and
        `max_cache_len`): every slot and block, its slots laid out oldest first in this cache's ring order, so that
        the next decode steps evict them in time order."""
        for layer, source_layer in zip(self.layers, source.layers, strict=True):
            order, source_order = ring_order(layer), ring_order(source_layer)
            layer.keys[row, :, order] = source_layer.keys[0, :, source_order]
            layer.values[row, :, order] = source_layer.values[0, :, source_order]
            layer.slot_is_real[row, order] = source_layer.slot_is_real[0, source_order]
            if isinstance(layer, StaticCompressedLayer):
                for buffer, source_buffer in zip(layer.block_buffers(), source_layer.block_buffers(), strict=True):
                    buffer[row] = source_buffer[0]
        self.row_lengths[row] = int(source.layers[0].get_seq_length())


def ring_order(layer: StaticRolledLayer) -> torch.Tensor:
    """A static layer's slots from the oldest kept token to the newest (slot N)."""
    newest_slot = torch.full((1,), layer.ring_length, dtype=torch.long, device=layer.device)
    return torch.cat([layer.ring_slots(layer.cumulative_length), newest_slot])


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
            f"compress_block_size) but the model has {layer_signature(config)}; "
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
    "FastGPTDynamicCache",
    "FastGPTRowCache",
    "FastGPTStaticCache",
    "StaticCompressedLayer",
    "StaticRolledLayer",
    "check_cache",
    "kept_key_mask",
    "update_with_key_mask",
]
