"""Generation speed and state size at a given context: what `fastgpt bench` and the demo measure.

`generation_speed` times greedy `generate()` with the model's default (dynamic) cache from a random prompt:
the prefill (prompt in, first new token's logits out) and the decode rate of the following tokens, read off the
times at which generate() hands over each step's logits, and the bytes the cache holds at the end. Wall-clock
figures: run on an otherwise idle machine, and repeat them; `speed_statistics` summarises the repeats.
"""

import statistics
import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache
from transformers.generation import LogitsProcessor, LogitsProcessorList


@dataclass
class GenerationSpeed:
    """One measurement: prompt tokens, seconds to the first new token, decode tokens/s, cache MiB at the end."""

    prompt_length: int
    prefill_seconds: float
    decode_tokens_per_second: float
    cache_mib: float


SPEED_FIGURES = ("prefill_seconds", "decode_tokens_per_second", "cache_mib")


def speed_statistics(speeds: list[GenerationSpeed]) -> dict:
    """Repeated measurements at one prompt length: its length, the count and each figure's median, min, max, values.

    `{"prompt_length": 512, "repeats": 5, "decode_tokens_per_second": {"median": ..., "min": ..., "max": ...,
    "values": [...]}, ...}` for every figure of `SPEED_FIGURES`.
    """
    lengths = {speed.prompt_length for speed in speeds}
    if len(lengths) != 1:
        raise ValueError(f"speed_statistics takes measurements at one prompt length, got lengths {sorted(lengths)}.")
    summary: dict = {"prompt_length": lengths.pop(), "repeats": len(speeds)}
    for figure in SPEED_FIGURES:
        values = [getattr(speed, figure) for speed in speeds]
        summary[figure] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "values": values,
        }
    return summary


def cache_bytes(cache: Cache) -> int:
    """Bytes of every tensor held by the layers of a Transformers cache (keys, values, block sums, ...)."""
    total = 0
    for layer in cache.layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


class StepClock(LogitsProcessor):
    """Records the time at which `generate()` hands over each step's logits (after that step's forward)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.times.append(time.perf_counter())
        return scores


def timed_generate(model: PreTrainedModel, input_ids: torch.Tensor, new_tokens: int) -> tuple[list[float], Cache]:
    """Seconds from the call to each of `new_tokens` greedy steps after `input_ids` `[1, T]`, and the final cache."""
    clock = StepClock()
    start = time.perf_counter()
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        logits_processor=LogitsProcessorList([clock]),
        pad_token_id=model.config.pad_token_id or 0,
    )
    return [moment - start for moment in clock.times], output.cache


@torch.no_grad()
def generation_speed(
    model: PreTrainedModel, prompt_length: int, new_tokens: int = 32, seed: int = 0
) -> GenerationSpeed:
    """Prefill time and decode rate of greedy generation from a random `prompt_length`-token prompt (batch 1).

    One `generate()` call: the first step's time is the prefill, the later steps' spacing the decode rate.
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 to time decoding, got {new_tokens}.")
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    input_ids = torch.randint(0, model.config.vocab_size, (1, prompt_length), generator=generator).to(device)
    model.eval()
    timed_generate(model, input_ids[:, : min(prompt_length, 256)], 2)  # warm-up: first-call allocations
    step_seconds, cache = timed_generate(model, input_ids, new_tokens)
    return GenerationSpeed(
        prompt_length=prompt_length,
        prefill_seconds=step_seconds[0],
        decode_tokens_per_second=(new_tokens - 1) / (step_seconds[-1] - step_seconds[0]),
        cache_mib=cache_bytes(cache) / 2**20,
    )
