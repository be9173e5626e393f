"""Generation speed and state size at a given context: what `fastgpt bench` and the demo measure.

`generation_speed` times greedy `generate()` with the model's default (dynamic) cache from a random prompt:
the prefill (prompt in, first new token out) and the decode rate of the following tokens, and reads the
bytes the cache holds at the end. Wall-clock figures: run on an otherwise idle machine.
"""

import time
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache


@dataclass
class GenerationSpeed:
    """One measurement: prompt tokens, seconds to the first new token, decode tokens/s, cache MiB at the end."""

    prompt_length: int
    prefill_seconds: float
    decode_tokens_per_second: float
    cache_mib: float

    def as_dict(self) -> dict:
        return asdict(self)


def cache_bytes(cache: Cache) -> int:
    """Bytes of every tensor held by the layers of a Transformers cache (keys, values, block sums, ...)."""
    total = 0
    for layer in cache.layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def timed_generate(model: PreTrainedModel, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, Cache]:
    """Seconds for greedy generation of exactly `new_tokens` after `input_ids` `[1, T]`, and the final cache."""
    start = time.perf_counter()
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        pad_token_id=model.config.pad_token_id or 0,
    )
    return time.perf_counter() - start, output.cache


@torch.no_grad()
def generation_speed(
    model: PreTrainedModel, prompt_length: int, new_tokens: int = 32, seed: int = 0
) -> GenerationSpeed:
    """Prefill time and decode rate of greedy generation from a random `prompt_length`-token prompt (batch 1)."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 to time decoding, got {new_tokens}.")
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    input_ids = torch.randint(0, model.config.vocab_size, (1, prompt_length), generator=generator).to(device)
    model.eval()
    timed_generate(model, input_ids[:, :8], 2)  # warm-up: first-call allocations and lazy initialisation
    prefill_seconds, _ = timed_generate(model, input_ids, 1)
    total_seconds, cache = timed_generate(model, input_ids, new_tokens)
    decode_seconds = max(total_seconds - prefill_seconds, 1e-9)
    return GenerationSpeed(
        prompt_length=prompt_length,
        prefill_seconds=prefill_seconds,
        decode_tokens_per_second=(new_tokens - 1) / decode_seconds,
        cache_mib=cache_bytes(cache) / 2**20,
    )
