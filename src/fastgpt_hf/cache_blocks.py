"""Block state of the `dynamic_attention` and `selective_attention` layers, shared by both caches (DESIGN.md
section 4; `cache_fastgpt` says how the caches use it): `CompressedBlocks`, one compressed entry per block and the
open block's running sums, `BlockTokens`, the selective layer's tokens by position, their one-pass variants for a
cacheless forward, and `BlockMeans`, the block means a step changed.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .attention_compressed import add_block_statistics


class BlockMeans(NamedTuple):
    """The block means a step changed (`CompressedBlocks.add_to_blocks`), which the attention compresses and hands
    back to `write_entries`: key and value means `[B, K, N, D]` in float32 (float64), and `written`, where their
    entries go: `[B]` (N = 1, a one-token step: each row's open block) or `[B, C]` bool (N = C, every block; True
    where the entry is recomputed)."""

    key_means: torch.Tensor
    value_means: torch.Tensor
    written: torch.Tensor


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
