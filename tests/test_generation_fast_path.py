"""generate()'s default: FastGPT's compiled static cache on CUDA (bucketed, one compile for every length), the eager
dynamic cache everywhere else. Checked on the CPU: the selection (with the model's device reported as CUDA), the
bucketing, and that a length-dynamic static cache compiles one decode graph for caches of two lengths."""

import pytest
import torch
from transformers import CompileConfig, GenerationConfig
from transformers.generation import GenerationMode
from transformers.generation.utils import DeferredStopCheck

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM
from fastgpt_hf.cache_fastgpt import FastGPTDynamicCache, FastGPTStaticCache
from fastgpt_hf.generation_fast_path import bucketed_cache_length, fast_path_cache, release_fast_path_cache

from .conftest import left_padded_batch, tiny_model
from .test_multimodal import build_model, tiny_processor


@pytest.fixture(scope="module")
def model():
    model = tiny_model("mixed")
    model.generation_config.pad_token_id = 0
    return model


def default_cache(model, mode: GenerationMode = GenerationMode.GREEDY_SEARCH, **options) -> tuple[object, bool]:
    """The cache generate() builds for a 2,048-token prompt and 65 new tokens, and whether it would compile."""
    generation_config = GenerationConfig(max_length=2048 + 65, pad_token_id=0, use_cache=True, **options)
    model_kwargs = {}
    model._prepare_cache_for_generation(generation_config, model_kwargs, mode, 3, generation_config.max_length - 1)
    compiles = model._valid_auto_compile_criteria(model_kwargs, generation_config)
    release_fast_path_cache(model)  # what generate() does when it returns
    return model_kwargs.get("cache"), compiles


@pytest.fixture
def reported_on_cuda(monkeypatch):
    """The model reports a CUDA device (no tensor moves): what the selection reads."""
    monkeypatch.setattr(FastGPTForCausalLM, "device", property(lambda self: torch.device("cuda")))


def test_cuda_default_is_the_compiled_static_cache_of_a_bucketed_length(model, reported_on_cuda):
    cache, compiles = default_cache(model)
    assert isinstance(cache, FastGPTStaticCache)
    assert cache.max_cache_len == 2304  # 2,112 positions rounded up to a multiple of 2048 / 8
    assert all(layer.dynamic_length for layer in cache.layers)
    assert cache.defers_stop_check
    assert compiles
    for mode in (GenerationMode.SAMPLE, GenerationMode.BEAM_SEARCH):
        assert isinstance(default_cache(model, mode)[0], FastGPTStaticCache)


@pytest.mark.parametrize(
    "options, mode",
    [
        ({"cache_implementation": "dynamic"}, GenerationMode.GREEDY_SEARCH),
        ({"disable_compile": True}, GenerationMode.GREEDY_SEARCH),
        ({"return_dict_in_generate": True}, GenerationMode.GREEDY_SEARCH),
        ({}, GenerationMode.ASSISTED_GENERATION),
    ],
    ids=["asked-for-dynamic", "disable-compile", "returned-cache", "assisted"],
)
def test_cuda_default_stays_dynamic_where_the_user_chose_otherwise(model, reported_on_cuda, options, mode):
    cache, compiles = default_cache(model, mode, **options)
    assert isinstance(cache, FastGPTDynamicCache)
    assert not compiles


def test_the_vision_language_model_keeps_the_eager_default_on_cuda(monkeypatch):
    captioner = build_model(tiny_processor())
    monkeypatch.setattr(type(captioner), "device", property(lambda self: torch.device("cuda")))
    assert isinstance(default_cache(captioner)[0], FastGPTDynamicCache)


def test_a_model_with_attention_sinks_takes_the_compiled_static_cache_on_cuda(reported_on_cuda):
    """The static cache keeps the sinks in slots of their own: such a model takes the fast path too."""
    model = tiny_model("mixed", num_sink_tokens=4)
    model.generation_config.pad_token_id = 0
    cache, compiles = default_cache(model)
    assert isinstance(cache, FastGPTStaticCache)
    assert compiles
    sliding, dynamic, full, _ = cache.layers
    assert [layer.num_sink_tokens for layer in (sliding, dynamic, full)] == [4, 4, 0]


def test_cpu_default_is_the_eager_dynamic_cache(model):
    cache, compiles = default_cache(model)
    assert isinstance(cache, FastGPTDynamicCache)
    assert not compiles
    input_ids, attention_mask = left_padded_batch(10)
    options = {"attention_mask": attention_mask, "max_new_tokens": 12, "do_sample": False}
    dynamic = model.generate(input_ids, cache_implementation="dynamic", **options)
    assert torch.equal(model.generate(input_ids, **options), dynamic)


def test_stop_checks_are_deferred_for_fast_path_caches_on_cuda_only(model):
    """Transformers' answer (deferred on MPS only) stays for every other cache and device."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    fast = fast_path_cache(model, model.config, 100, rows=3)
    assert DeferredStopCheck.is_supported(cuda, fast, cache_is_returned=False, is_assistant=False)
    assert not DeferredStopCheck.is_supported(cuda, fast, cache_is_returned=True, is_assistant=False)
    assert not DeferredStopCheck.is_supported(cuda, fast, cache_is_returned=False, is_assistant=True)
    assert not DeferredStopCheck.is_supported(cpu, fast, cache_is_returned=False, is_assistant=False)
    for other in (FastGPTStaticCache(model.config, 100), FastGPTDynamicCache(model.config)):
        assert not DeferredStopCheck.is_supported(cuda, other, cache_is_returned=False, is_assistant=False)
    assert DeferredStopCheck.is_supported(torch.device("mps"), None, cache_is_returned=False, is_assistant=False)
    release_fast_path_cache(model)


def test_the_fast_path_cache_is_kept_zeroed_for_the_next_call_and_never_shared(model):
    """Same bucket and rows: the same buffers, zeroed (their CUDA graphs replay); a call while another holds it, or
    another bucket or row count, gets new ones."""
    cache = fast_path_cache(model, model.config, 100, rows=3)
    keys = torch.randn(3, model.config.num_key_value_heads, 5, model.config.head_dim, dtype=model.dtype)
    cache.update(keys, keys, 0)
    assert fast_path_cache(model, model.config, 100, rows=3) is not cache  # held by the first call
    release_fast_path_cache(model)
    assert fast_path_cache(model, model.config, 103, rows=3) is cache  # the same bucket (104 positions)
    assert int(cache.get_seq_length()) == 0
    assert not cache.layers[0].keys.any()
    release_fast_path_cache(model)
    assert fast_path_cache(model, model.config, 100, rows=2) is not cache
    release_fast_path_cache(model)
    assert fast_path_cache(model, model.config, 5000, rows=3) is not cache
    release_fast_path_cache(model)


def test_bucketed_cache_lengths():
    config = FastGPTConfig.from_preset("1b")
    lengths = range(1, config.max_position_embeddings + 1, 7)
    buckets = [bucketed_cache_length(length, config) for length in lengths]
    assert all(bucket >= max(length, config.dynamic_window) for length, bucket in zip(lengths, buckets, strict=True))
    assert all(bucket <= config.max_position_embeddings for bucket in buckets)
    assert all(bucket - length <= length // 8 for length, bucket in zip(lengths, buckets, strict=True) if length > 1024)
    assert buckets == sorted(buckets)
    assert len(set(buckets)) == 41  # 1,024 and 8 steps in each of the 5 octaves up to 32,768
    assert [bucketed_cache_length(length, config) for length in (2112, 8256, 32704)] == [2304, 9216, 32768]


@pytest.fixture
def fresh_dynamo():
    """Dynamo's compiled code and the sizes it saw changing (which make later compiles dynamic), cleared before and
    after."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("dynamic_length", [True, False], ids=["dynamic-length", "fixed-length"])
def test_one_compiled_decode_step_serves_caches_of_two_lengths(model, dynamic_length, fresh_dynamo):
    """generate()'s compile (dynamo; its graphs run as traced, to stay fast) of the static-cache decode step, for two
    prompts whose caches differ in length: one graph with `dynamic_length`, a second compile without; the dynamic
    cache's tokens."""
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compile_config = CompileConfig(fullgraph=True, backend=counting_backend, mode=None)
    compile_config._compile_all_devices = True  # generate() compiles only on accelerators otherwise
    for length, cache_length in ((10, 40), (26, 64)):
        input_ids, attention_mask = left_padded_batch(length)
        options = {"attention_mask": attention_mask, "max_new_tokens": 4, "do_sample": False}
        cache = FastGPTStaticCache(model.config, cache_length, dynamic_length=dynamic_length)
        compiled = model.generate(input_ids, cache=cache, compile_config=compile_config, **options)
        assert torch.equal(compiled, model.generate(input_ids, cache_implementation="dynamic", **options))
    assert len(graphs) == (1 if dynamic_length else 2)
