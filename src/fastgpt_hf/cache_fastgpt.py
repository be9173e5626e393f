"""Generation state of FastGPT: what each layer kind keeps between decoding steps (DESIGN.md section 4).

Two caches, both built from `config.layer_types` and each layer's window (`config.attention_window`), as
Transformers builds its own from `layer_types` (`generate()` builds them by itself). This module holds the caches,
the serving engine's `FastGPTRowCache` and the checks of new positions against a cache; their layers are in
`cache_dynamic_layers` and `cache_static_layers`, the block state both share in `cache_blocks`.

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
have left the window (`StaticRolledLayer`). With `kv_quantization="int8"` its layers keep keys and values as int8
with a float32 scale per row, key/value head and slot (`cache_quantization`): about half the bytes of bf16; the
dynamic layers' block state stays in the model's dtype (float32 sums), computed from the unquantized new tokens.

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

import torch
from transformers.cache_utils import (
    Cache,
    DynamicCache,
    StaticCache,
)

from .cache_blocks import BlockTokens, CompressedBlocks
from .cache_dynamic_layers import dynamic_layer
from .cache_quantization import check_kv_quantization
from .cache_static_layers import StaticCompressedLayer, StaticRolledLayer
from .configuration_fastgpt import DYNAMIC, SELECTIVE, FastGPTConfig


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
                given_row = min(row, position_ids.shape[0] - 1)  # position_ids may be [1, T], shared by the rows
                raise ValueError(
                    f"position_ids[{given_row}, {token}] = {int(position_ids[given_row, token])} "
                    f"falls in block {int(blocks[given_row, token])} of "
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
        (queries are the last T) and which keys are real, `[B or 1, S]` bool or None (all real). A quantized static
        cache returns `QuantizedStates` for keys and values in a one-token step (`StaticRolledLayer`).

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
    (`generation_fast_path`); otherwise a cache of another length compiles the step again.
    `kv_quantization`: None keeps keys and values in the model's dtype; "int8" as int8 with float32 scales
    (`cache_quantization`; generate(): `cache_config={"kv_quantization": "int8"}`)."""

    def __init__(
        self,
        config: FastGPTConfig,
        max_cache_len: int,
        offloading: bool = False,
        dynamic_length: bool = False,
        kv_quantization: str | None = None,
    ):
        check_kv_quantization(kv_quantization)
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
                block_size = config.compress_block_size
                layer = StaticCompressedLayer(
                    max_cache_len, kept_length, block_size, dynamic_length, sinks, kv_quantization
                )
            else:
                layer = StaticRolledLayer(max_cache_len, kept_length, dynamic_length, sinks, kv_quantization)
            layers.append(layer)
        Cache.__init__(self, layers=layers, offloading=offloading)
        self.max_cache_len = max_cache_len
        self.kv_quantization = kv_quantization
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

    A sequence enters a row by `copy_rows` from the `FastGPTStaticCache` that prefilled it; a decode step then
    runs over every row at once, with `position_ids` `[B, 1]` (each row's own position) and the mask `[B, 1]` of the
    rows that hold a sequence (a free row's token is padding: it changes nothing that a later `copy_rows` keeps).
    The layers' counters advance by one per decode step for every row: they are the rings' clock, not a length.
    `row_lengths` holds each row's tokens, set by whoever drives the rows, and `get_seq_length()` the longest, which
    is what the model checks positions and `max_cache_len` against outside compiled code."""

    def __init__(self, config: FastGPTConfig, max_cache_len: int, max_rows: int, kv_quantization: str | None = None):
        super().__init__(config, max_cache_len, kv_quantization=kv_quantization)
        self.max_rows = max_rows
        self.row_lengths = [0] * max_rows

    def get_seq_length(self, layer_idx: int = 0) -> int | torch.Tensor:
        if torch.compiler.is_compiling():
            # Read by no compiled code; a Python value that changes every step would recompile every step.
            return super().get_seq_length(layer_idx)
        return max(self.row_lengths)

    @torch.no_grad()
    def copy_rows(self, source: FastGPTStaticCache, targets: torch.Tensor) -> None:
        """Overwrite rows `targets` with the sequences of `source` (a static cache of the same config and
        `max_cache_len` that prefilled them, left padding allowed): every slot, block and sink, the slots laid out
        oldest first in this cache's ring order, so that the next decode steps evict them in time order (left
        padding, never real, first). `source` row i goes into row `targets[i]`, a device tensor: no host value is
        read, so the copies can be compiled, or captured in a CUDA graph, with the forward that filled `source`.
        The caller sets `row_lengths`. Rows of `targets` named twice must receive equal sequences. Both caches
        must have the same `kv_quantization`."""
        if source.kv_quantization != self.kv_quantization:
            raise ValueError(
                f"copy_rows takes a cache of kv_quantization={self.kv_quantization!r}, as this one, got one of "
                f"{source.kv_quantization!r}: prefill with a FastGPTStaticCache built with the same kv_quantization."
            )
        count = targets.shape[0]
        for layer, source_layer in zip(self.layers, source.layers, strict=True):
            order, source_order = layer.slot_order(), source_layer.slot_order()
            # x[rows, :, order] indexes `[n, slots, K, *]`: the advanced indices' dimensions come first.
            for buffer, source_buffer in zip(layer.slot_buffers(), source_layer.slot_buffers(), strict=True):
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
    "FastGPTDynamicCache",
    "FastGPTRowCache",
    "FastGPTStaticCache",
    "check_cache",
    "check_positions_are_distinct",
    "check_positions_follow_cache",
]
