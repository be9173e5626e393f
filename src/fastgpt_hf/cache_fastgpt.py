"""Generation state of FastGPT: what each layer kind keeps between decoding steps (DESIGN.md section 4).

- `full_attention`: Transformers' `DynamicLayer`, every key and value.
- `sliding_attention`: Transformers' `DynamicSlidingWindowLayer`, the last `sliding_window - 1` keys and values.
- `dynamic_attention`: `DynamicCompressedLayer`, the last `dynamic_window - 1` keys and values plus, per block of
  `compress_block_size` positions, the sum of its real tokens' pre-rotary keys and values and their count. The
  running sums of the incomplete block and the sums of complete blocks share one `[B, K, C, D]` tensor, so the
  state is O(window + length / b).
"""

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from .configuration_fastgpt import DYNAMIC, SLIDING, FastGPTConfig


class DynamicCompressedLayer(DynamicSlidingWindowLayer):
    """Cache of a `dynamic_attention` layer: a sliding window of keys/values plus per-block sums."""

    def __init__(self, sliding_window: int):
        super().__init__(sliding_window=sliding_window)
        self.block_key_sums: torch.Tensor | None = None  # [B, K, C, D]
        self.block_value_sums: torch.Tensor | None = None  # [B, K, C, D]
        self.block_counts: torch.Tensor | None = None  # [B, C]

    def accumulate_blocks(
        self, key_sums: torch.Tensor, value_sums: torch.Tensor, counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add the new tokens' block sums (covering blocks [0, C_new)) and return the totals."""
        if self.block_counts is not None:
            extra_blocks = key_sums.shape[2] - self.block_counts.shape[1]
            key_sums = key_sums + F.pad(self.block_key_sums, (0, 0, 0, extra_blocks))
            value_sums = value_sums + F.pad(self.block_value_sums, (0, 0, 0, extra_blocks))
            counts = counts + F.pad(self.block_counts, (0, extra_blocks))
        self.block_key_sums, self.block_value_sums, self.block_counts = key_sums, value_sums, counts
        return key_sums, value_sums, counts

    def num_blocks(self) -> int:
        """Blocks held (complete or not): one entry per `compress_block_size` positions seen."""
        return 0 if self.block_counts is None else self.block_counts.shape[1]

    def reset(self) -> None:
        super().reset()
        self.block_key_sums = self.block_value_sums = self.block_counts = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.block_counts is not None:
            self.block_key_sums = self.block_key_sums.index_select(0, beam_idx.to(self.block_key_sums.device))
            self.block_value_sums = self.block_value_sums.index_select(0, beam_idx.to(self.block_value_sums.device))
            self.block_counts = self.block_counts.index_select(0, beam_idx.to(self.block_counts.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.block_counts is not None:
            self.block_key_sums = self.block_key_sums.repeat_interleave(repeats, dim=0)
            self.block_value_sums = self.block_value_sums.repeat_interleave(repeats, dim=0)
            self.block_counts = self.block_counts.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.block_counts is not None:
            self.block_key_sums = self.block_key_sums[indices, ...]
            self.block_value_sums = self.block_value_sums[indices, ...]
            self.block_counts = self.block_counts[indices, ...]


class FastGPTDynamicCache(DynamicCache):
    """A `DynamicCache` whose layers follow `config.layer_types`; `generate()` builds it by itself."""

    def __init__(self, config: FastGPTConfig):
        layers = []
        for layer_type in config.layer_types:
            if layer_type == SLIDING:
                layers.append(DynamicSlidingWindowLayer(sliding_window=config.sliding_window))
            elif layer_type == DYNAMIC:
                layers.append(DynamicCompressedLayer(sliding_window=config.dynamic_window))
            else:
                layers.append(DynamicLayer())
        # DynamicCache's own constructor knows only Transformers' layer kinds: build the layers here instead.
        Cache.__init__(self, layers=layers)


__all__ = ["DynamicCompressedLayer", "FastGPTDynamicCache"]
