"""What `generate()` does when it is given no cache and no compile arguments: the fast path on CUDA.

On a CUDA device, `model.generate(input_ids)` (greedy, sampling, beam search; also through `pipeline` and with a
streamer) decodes with FastGPT's static cache, which `generate()` compiles (inductor, CUDA graphs; Transformers'
default `CompileConfig` unless the generation config names one), as `cache_implementation="static"` would, with
two differences that make the compiled step serve every call:

- the cache holds a bucketed number of positions (`bucketed_cache_length`): the positions the call needs rounded up
  to eight steps per octave (at most 1/8 more slots than needed), at least the layers' windows;
- its length dimensions are marked dynamic (`FastGPTStaticCache(..., dynamic_length=True)`), so the first call
  compiles a graph whose cache length is symbolic and later calls of any length reuse it (a new length records a
  CUDA graph, it does not compile). A new batch size compiles once more (dynamo specializes sizes 0 and 1).

The fast path's decoding loop also reads its stop condition one step late (Transformers' `DeferredStopCheck`, which
it uses on Apple's MPS only): reading `unfinished_sequences` every step makes the host wait for the device, so the
host's work around each compiled step (input preparation, guards, CUDA graph replay) adds to the device's instead
of overlapping it (measured on an H200, `1b` at 1 x 2K: 4.09 ms per token against 1.73 deferred). A stop at an
end-of-sequence token is then seen one step late, and that step is undone (its token dropped, never streamed);
Transformers does this only for a cache that is not returned, which the fast path never is.
`defer_stop_checks_of_fast_path_caches` extends `DeferredStopCheck.is_supported` to caches built here (flagged
`defers_stop_check`), on CUDA, and leaves every other model's and cache's answer as it was.

`cache_config={"kv_quantization": "int8"}` gives that cache int8 keys and values (`cache_quantization`).

Everywhere else (CPU, `cache_implementation` set, a cache passed in, `disable_compile=True`, a quantizer or device
map that cannot compile, `return_dict_in_generate=True`, whose returned cache a later turn may grow, other
decoding modes, the vision-language model, a model with `selective_attention` layers, which the static cache does
not hold) the default stays `FastGPTDynamicCache`, eager: nothing is compiled that the user did not ask for. Attention
sinks (`num_sink_tokens` > 0) take the fast path: the static cache keeps them in slots of their own.
"""

import threading

import torch
from transformers import GenerationConfig
from transformers.cache_utils import Cache
from transformers.generation import GenerationMode
from transformers.generation.utils import DeferredStopCheck

from .cache_fastgpt import FastGPTStaticCache
from .configuration_fastgpt import SELECTIVE, FastGPTConfig

# Decoding modes whose loop calls generate()'s compiled forward and never rolls the cache back.
FAST_PATH_MODES = (
    GenerationMode.GREEDY_SEARCH,
    GenerationMode.SAMPLE,
    GenerationMode.BEAM_SEARCH,
    GenerationMode.BEAM_SAMPLE,
)
# Buckets per doubling of the length: the cache holds at most 1 / STEPS_PER_OCTAVE more slots than needed.
STEPS_PER_OCTAVE = 8


def bucketed_cache_length(positions: int, config: FastGPTConfig) -> int:
    """The static cache length for `positions` positions: at least the windows (so that the sliding and dynamic
    layers' buffers never change size), then rounded up to the next multiple of 2^(floor(log2(n)) - 3), at most
    `max_position_embeddings` (but never below `positions`)."""
    positions = max(positions, config.sliding_window, config.dynamic_window)
    step = max(1, 2 ** (positions.bit_length() - 1) // STEPS_PER_OCTAVE)
    bucket = -(-positions // step) * step
    return max(positions, min(bucket, config.max_position_embeddings))


def uses_cuda_fast_path(model, generation_config: GenerationConfig, generation_mode, model_kwargs: dict) -> bool:
    """Whether `generate()` takes the compiled static cache by default (module docstring): on CUDA, with no cache
    or compile choice of the user's, in a decoding mode that suits it, where generate() can compile."""
    if model.device.type != "cuda" or generation_mode not in FAST_PATH_MODES:
        return False
    if not isinstance(model.config, FastGPTConfig):  # the vision-language model: its compiled decode is not measured
        return False
    if SELECTIVE in model.config.layer_types:  # the static cache has no selective layer: the dynamic cache, eager
        return False
    if generation_config.cache_implementation is not None or model_kwargs.get("cache") is not None:
        return False
    if not generation_config.use_cache or generation_config.disable_compile:
        return False
    if generation_config.return_dict_in_generate:
        return False
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not quantizer.is_compileable:
        return False
    devices = set(getattr(model, "hf_device_map", {"": "cuda"}).values())
    return "cpu" not in devices and "disk" not in devices and (getattr(model, "_tp_size", None) or 1) == 1


def fast_path_cache(
    model, config: FastGPTConfig, positions: int, rows: int, kv_quantization: str | None = None
) -> FastGPTStaticCache:
    """The fast path's cache for `positions` positions and `rows` rows: bucketed, length-dynamic, its stop checks
    deferred, its keys and values quantized as `kv_quantization` says. The model keeps the last one it built and hands
    it out again, zeroed in place, to the next call of the same bucket, rows, dtype, device and quantization: its
    buffers keep their addresses, so the CUDA graphs recorded for them
    replay (a new cache is recorded anew, and every recording stays in inductor's tree of graphs). One call at a time
    holds it (`release_fast_path_cache` when generate() returns); a concurrent call gets a cache of its own."""
    length = bucketed_cache_length(positions, config)
    lock = model.__dict__.setdefault("_fast_path_lock", threading.Lock())
    if not lock.acquire(blocking=False):
        return new_fast_path_cache(config, length, kv_quantization)
    model._fast_path_owner = threading.get_ident()
    kept = model.__dict__.get("_fast_path_cache")
    if (
        kept is not None
        and kept.max_cache_len == length
        and kept.kv_quantization == kv_quantization
        and holds_rows(kept, rows, model.dtype, model.device)
    ):
        kept.reset()
        return kept
    model._fast_path_cache = None  # freed before the new one is allocated
    model._fast_path_cache = new_fast_path_cache(config, length, kv_quantization)
    return model._fast_path_cache


def new_fast_path_cache(config: FastGPTConfig, length: int, kv_quantization: str | None = None) -> FastGPTStaticCache:
    cache = FastGPTStaticCache(config, length, dynamic_length=True, kv_quantization=kv_quantization)
    cache.defers_stop_check = True
    return cache


def holds_rows(cache: FastGPTStaticCache, rows: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the cache's buffers (once allocated) have `rows` rows for states of that dtype on that device."""
    layer = cache.layers[0]
    if not layer.is_initialized:
        return True
    return layer.keys.shape[0] == rows and layer.states_dtype == dtype and layer.keys.device == device


def release_fast_path_cache(model) -> None:
    """Let the next generate() call take the kept cache, if this thread's call held it."""
    if model.__dict__.get("_fast_path_owner") == threading.get_ident():
        model._fast_path_owner = None
        model._fast_path_lock.release()


def defer_stop_checks_of_fast_path_caches() -> None:
    """Make `DeferredStopCheck.is_supported` answer True for a fast-path cache on CUDA that generate() does not return
    (module docstring); every other call gets Transformers' own answer. Idempotent."""
    transformers_answer = DeferredStopCheck.is_supported
    if getattr(transformers_answer, "covers_fastgpt_fast_path", False):
        return

    def is_supported(device: torch.device, cache: Cache | None, cache_is_returned: bool, is_assistant: bool) -> bool:
        if getattr(cache, "defers_stop_check", False) and device.type == "cuda":
            return not cache_is_returned and not is_assistant
        return transformers_answer(device, cache, cache_is_returned, is_assistant)

    is_supported.covers_fastgpt_fast_path = True
    DeferredStopCheck.is_supported = staticmethod(is_supported)


defer_stop_checks_of_fast_path_caches()
