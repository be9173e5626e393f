"""The layers of `FastGPTStaticCache` (`cache_fastgpt` describes the cache): `StaticRolledLayer`, the last N + 1
keys and values of a layer in fixed buffers (the newest in the last slot, the N before it in a ring) with the
attention sinks' slots ahead of them, and `StaticCompressedLayer`, the same with a dynamic layer's block state
(`cache_blocks`) for every block of `max_cache_len`. Either keeps its keys and values in the model's dtype or, with
`kv_quantization="int8"`, as int8 with a float32 scale per row, key/value head and slot (`cache_quantization`).
"""

import torch
from transformers.cache_utils import (
    StaticLayer,
)

from .cache_blocks import CompressedBlocks
from .cache_quantization import QuantizedStates, check_kv_quantization, dequantize, quantize


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

    With `kv_quantization="int8"` the keys and values are int8 and two more buffers, `key_scales` and `value_scales`
    `[B, K, n + N + 1, 1]` float32, hold their scales (`cache_quantization`); every slot move above moves them alike
    (`slot_buffers()`). New tokens are quantized as they arrive. A one-token step returns `QuantizedStates` (the int8
    buffer and its scales), which the attention reads as they are (`attention_quantized`); a longer step returns its
    keys and values dequantized to the model's dtype, so that the prefill paths stay as they are.
    """

    def __init__(
        self,
        max_positions: int,
        kept_length: int,
        dynamic_length: bool = False,
        num_sink_tokens: int = 0,
        kv_quantization: str | None = None,
    ):
        check_kv_quantization(kv_quantization)
        self.ring_length = max(kept_length, 1)
        self.window_slots = self.ring_length + 1
        self.num_sink_tokens = num_sink_tokens
        super().__init__(max_cache_len=num_sink_tokens + self.window_slots)
        self.max_positions = max_positions
        self.dynamic_length = dynamic_length
        self.kv_quantization = kv_quantization

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.states_dtype = key_states.dtype  # the model's: what a longer step returns
        if self.kv_quantization is None:
            super().lazy_initialization(key_states, value_states)
        else:  # Transformers' layer allocates its buffers in the dtype of the states it is given: empty int8 ones
            super().lazy_initialization(*(states[:, :, :0].to(torch.int8) for states in (key_states, value_states)))
            self.key_scales = torch.zeros(*self.keys.shape[:3], 1, dtype=torch.float32, device=self.device)
            self.value_scales = torch.zeros_like(self.key_scales)
            if not torch.compiler.is_compiling():
                for buffer in (self.key_scales, self.value_scales):
                    torch._dynamo.mark_static_address(buffer)
        # Which slots hold real tokens: never-written slots and left padding are False.
        self.slot_is_real = torch.zeros(self.batch_size, self.max_cache_len, dtype=torch.bool, device=self.device)
        if self.num_sink_tokens:
            self.sink_columns = torch.zeros(self.batch_size, self.num_sink_tokens, dtype=torch.long, device=self.device)
            self.sink_counts = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        if not torch.compiler.is_compiling():
            for buffer in (self.slot_is_real, *self.sink_buffers()):
                torch._dynamo.mark_static_address(buffer)
            if self.dynamic_length and self.window_slots == self.max_positions:  # the buffers follow the length
                for buffer in (*self.slot_buffers(), self.slot_is_real):
                    torch._dynamo.maybe_mark_dynamic(buffer, 2 if buffer.dim() == 4 else 1)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | QuantizedStates, torch.Tensor | QuantizedStates, torch.Tensor | None]:
        """Append `[B, K, T, D]` keys and values; return the kept past and them, queries last, and which returned
        keys are real tokens (module docstring). `attention_mask` `[B, past + T]` or `[B, T]` (None: all real).
        Quantized: `QuantizedStates` in a one-token step, else keys and values in the model's dtype (class
        docstring)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if attention_mask is None:
            is_real = torch.ones(key_states.shape[0], key_states.shape[2], dtype=torch.bool, device=self.device)
        else:
            is_real = attention_mask[:, -key_states.shape[2] :].bool()
        new_states = self.stored_states(key_states, value_states)
        if key_states.shape[2] == 1:
            self.push_one(new_states, is_real)
            return *self.keys_and_values(self.slot_buffers(), one_token=True), self.slot_is_real
        past_order, window_length = self.returned_past()
        # A token keeps its slot once in the ring (token t in slot t % N, the newest in slot N): only the new tokens
        # and the one leaving slot N are written, the last min(P + T, T + 1, N + 1) of the window's returned keys,
        # oldest first. Rewriting the whole kept past instead made each prefill chunk copy a full layer's every slot.
        stored = min(window_length + key_states.shape[2], key_states.shape[2] + 1, self.window_slots)
        sink_writes = self.sink_writes(new_states, is_real) if self.num_sink_tokens else None
        self.cumulative_length.add_(key_states.shape[2])
        all_states = [
            torch.cat([buffer.index_select(2, past_order), states], dim=2)
            for buffer, states in zip(self.slot_buffers(), new_states, strict=True)
        ]
        key_is_real = torch.cat([self.slot_is_real.index_select(1, past_order), is_real], dim=1)
        writes = [states[:, :, -stored:] for states in all_states]
        self.write_slots(self.window_order()[-stored:], writes, key_is_real[:, -stored:], sink_writes)
        # Only the new tokens came back (a first prefill) and none is padding: no mask at all.
        only_new_real_tokens = attention_mask is None and all_states[0].shape[2] == key_states.shape[2]
        return *self.keys_and_values(all_states, one_token=False), None if only_new_real_tokens else key_is_real

    def slot_buffers(self) -> list[torch.Tensor]:
        """The buffers indexed by slot (dim 2), in `stored_states` order: keys and values, and quantized their
        scales."""
        if self.kv_quantization is None:
            return [self.keys, self.values]
        return [self.keys, self.values, self.key_scales, self.value_scales]

    def stored_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """New `[B, K, T, D]` keys and values as `slot_buffers()` hold them: themselves, or quantized (int8 keys
        and values, then their scales `[B, K, T, 1]`)."""
        if self.kv_quantization is None:
            return key_states, value_states
        keys, values = quantize(key_states), quantize(value_states)
        return keys.data, values.data, keys.scale, values.scale

    def keys_and_values(self, states: list[torch.Tensor], one_token: bool) -> tuple:
        """The keys and values of `states` (in `slot_buffers()` order) as `update` returns them: themselves;
        quantized, `QuantizedStates` in a one-token step, else dequantized to the model's dtype."""
        if self.kv_quantization is None:
            return states[0], states[1]
        keys, values = QuantizedStates(states[0], states[2]), QuantizedStates(states[1], states[3])
        if one_token:
            return keys, values
        return dequantize(keys, self.states_dtype), dequantize(values, self.states_dtype)

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

    def push_one(self, new_states: tuple[torch.Tensor, ...], is_real: torch.Tensor) -> None:
        """Move the newest token from slot n + N into the ring, over its oldest slot, and write the new one
        (`new_states`: `stored_states` of one token) in slot n + N (and in its row's next sink slot, if it is one of
        the row's first n real tokens)."""
        sink_writes = self.sink_writes(new_states, is_real) if self.num_sink_tokens else None
        oldest = self.ring_slots(self.cumulative_length)[:1]
        slots = torch.cat([oldest, oldest.new_full((1,), self.keys.shape[2] - 1)])
        newest = slice(-1, None)
        writes = [
            torch.cat([buffer[:, :, newest], states], dim=2)
            for buffer, states in zip(self.slot_buffers(), new_states, strict=True)
        ]
        self.write_slots(slots, writes, torch.cat([self.slot_is_real[:, newest], is_real], dim=1), sink_writes)
        self.cumulative_length.add_(1)

    def write_slots(
        self,
        slots: torch.Tensor,
        states: list[torch.Tensor],
        is_real: torch.Tensor,
        sink_writes: tuple[list[torch.Tensor], torch.Tensor] | None,
    ) -> None:
        """Write window slots `slots` `[L]` (`states` in `slot_buffers()` order, `[B, K, L, *]`, `is_real`
        `[B, L]`) and the sink slots' new contents (`sink_writes`, or None without sinks). One `index_copy_` per
        buffer, as in Transformers' `StaticLayer`: compiled code does that in place, where a second write into a
        slice of the same buffer made inductor copy the whole buffer every step."""
        if sink_writes is not None:
            sink_states, sink_is_real = sink_writes
            slots = torch.cat([self.sink_slots(), slots])
            states = [torch.cat([sink, window], dim=2) for sink, window in zip(sink_states, states, strict=True)]
            is_real = torch.cat([sink_is_real, is_real], dim=1)
        for buffer, written in zip(self.slot_buffers(), states, strict=True):
            buffer.index_copy_(2, slots, written)
        self.slot_is_real.index_copy_(1, slots, is_real)

    def sink_writes(
        self, new_states: tuple[torch.Tensor, ...], is_real: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The sink slots after a step of T new tokens (`new_states`: `stored_states`, `[B, K, T, *]`; `is_real`
        `[B, T]`), call before it advances the clock: their contents in `slot_buffers()` order, `[B, K, n, *]`, and
        which are real `[B, n]`, as of the clock after the step. `sink_columns` and `sink_counts` are updated in
        place. Tensor arithmetic only, no host read."""
        kv_heads, query_length = new_states[0].shape[1:3]
        rank = self.sink_counts[:, None] + is_real.cumsum(1) - 1  # [B, T]: each real token's rank in its row
        arrives = is_real[:, :, None] & (rank[:, :, None] == self.sink_slots())  # [B, T, n]: token t is sink j
        arrived = arrives.any(1)  # [B, n]
        source = (arrives * torch.arange(query_length, device=self.device)[None, :, None]).sum(1)  # [B, n]
        sink_states = []
        for buffer, states in zip(self.slot_buffers(), new_states, strict=True):
            gathered = states.gather(2, source[:, None, :, None].expand(-1, kv_heads, -1, states.shape[-1]))
            sink_states.append(torch.where(arrived[:, None, :, None], gathered, buffer[:, :, : self.num_sink_tokens]))
        self.sink_columns.copy_(torch.where(arrived, self.cumulative_length + source, self.sink_columns))
        self.sink_counts.add_(arrived.sum(1))
        # The window holds the last N + 1 tokens: a sink has left it once N + 1 arrived after it.
        left_window = self.sinks_arrived_before(self.cumulative_length + query_length - self.window_slots)
        return sink_states, left_window

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
            for buffer in self.slot_buffers():
                buffer.index_copy_(2, newest, buffer.index_select(2, source))
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
        return [*self.slot_buffers(), self.slot_is_real, *self.sink_buffers()]

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
        scales = ["key_scales", "value_scales"] if self.kv_quantization else []
        return ["keys", "values", *scales, "slot_is_real", *self.sink_state_names(), "cumulative_length"]


class StaticCompressedLayer(CompressedBlocks, StaticRolledLayer):
    """Static cache of a `dynamic_attention` layer: the rolled window plus the block state of every block."""

    def __init__(
        self,
        max_positions: int,
        kept_length: int,
        compress_block_size: int,
        dynamic_length: bool = False,
        num_sink_tokens: int = 0,
        kv_quantization: str | None = None,
    ):
        super().__init__(max_positions, kept_length, dynamic_length, num_sink_tokens, kv_quantization)
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
