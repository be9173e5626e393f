"""The one way every subcommand times work: warm-up calls, the device synchronised around each timed call, the
median of the repeats, and a first call (compilation and first allocations included) timed on its own.

Wall-clock milliseconds between two synchronisations of the device: on a GPU the queued kernels are waited for, so a
call's time is what its caller waits, host work included.
"""

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on `device` (nothing to wait for on a CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def call_ms(function: Callable[[], object], device: torch.device | str) -> float:
    """Milliseconds of one `function()` call, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def times_ms(function: Callable[[], object], device: torch.device | str, repeats: int, warmup: int = 0) -> list[float]:
    """Milliseconds of `repeats` calls after `warmup` untimed ones."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}.")
    for _ in range(warmup):
        function()
    return [call_ms(function, device) for _ in range(repeats)]


def median_ms(function: Callable[[], object], device: torch.device | str, repeats: int = 7, warmup: int = 2) -> float:
    """Median milliseconds of `repeats` calls after `warmup` untimed ones."""
    return statistics.median(times_ms(function, device, repeats, warmup))


def first_call_seconds(function: Callable[[], object], device: torch.device | str) -> float:
    """Seconds of one call timed on its own: a first call, with whatever it compiles or allocates."""
    return call_ms(function, device) / 1e3
