"""`generate()` with FastGPT's caches: every decoding mode against recomputation, static cache, compile, pipeline.

Float64 tiny models (windows 8 / 16, blocks of 4), so 30 new tokens after a 10-token prompt cross every window
and block boundary; greedy decoding is compared token for token with an argmax loop over `reference_logits`.
"""

import copy

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from torch._dynamo.backends.debugging import aot_eager
from transformers import CompileConfig, DynamicCache, PreTrainedTokenizerFast, pipeline

from fastgpt_hf.attention_reference import reference_logits
from fastgpt_hf.cache_fastgpt import FastGPTDynamicCache, FastGPTStaticCache

from .conftest import STACKS, left_padded_batch, tiny_model

NEW_TOKENS = 30


@pytest.fixture(scope="module")
def model():
    model = tiny_model("mixed")
    model.generation_config.pad_token_id = 0
    return model


def argmax_loop(model, input_ids, attention_mask, new_tokens: int) -> torch.Tensor:
    """Greedy decoding that recomputes every step from scratch with the float64 reference."""
    for _ in range(new_tokens):
        next_tokens = reference_logits(model, input_ids, attention_mask)[:, -1].argmax(-1, keepdim=True)
        input_ids = torch.cat([input_ids, next_tokens], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_tokens)], dim=1)
    return input_ids


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_greedy_generate_equals_an_argmax_loop_over_full_recomputation(model, cache_implementation):
    input_ids, attention_mask = left_padded_batch(10)
    generated = model.generate(
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        cache_implementation=cache_implementation,
    )
    assert torch.equal(generated, argmax_loop(model, input_ids, attention_mask, NEW_TOKENS))


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_greedy_generate_with_a_chunked_prefill_equals_an_argmax_loop(model, cache_implementation):
    """generate()'s `prefill_chunk_size` (a lower peak for long prompts): chunks of 6 through windows of 8 and 16 and
    blocks of 4, left-padded, give the tokens of full recomputation."""
    input_ids, attention_mask = left_padded_batch(40)
    generated = model.generate(
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=8,
        do_sample=False,
        cache_implementation=cache_implementation,
        prefill_chunk_size=6,
    )
    assert torch.equal(generated, argmax_loop(model, input_ids, attention_mask, 8))


def test_greedy_generate_with_attention_sinks_equals_an_argmax_loop():
    """Past every window (10 + 14 tokens, windows 8 / 16): the dynamic cache keeps the sinks the reference sees."""
    model = tiny_model("mixed", num_sink_tokens=3)
    model.generation_config.pad_token_id = 0
    input_ids, attention_mask = left_padded_batch(10)
    generated = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=14, do_sample=False)
    assert torch.equal(generated, argmax_loop(model, input_ids, attention_mask, 14))


def test_greedy_generate_with_sinks_and_the_static_cache_equals_the_dynamic_cache():
    """10 + 20 tokens, left-padded: the static cache's sink slots give the dynamic cache's tokens once every row's
    sinks have left both windows (8, 16)."""
    model = tiny_model("mixed", num_sink_tokens=3)
    model.generation_config.pad_token_id = 0
    input_ids, attention_mask = left_padded_batch(10)
    options = {"attention_mask": attention_mask, "max_new_tokens": 20, "do_sample": False}
    static = model.generate(input_ids, cache_implementation="static", **options)
    assert torch.equal(static, model.generate(input_ids, cache_implementation="dynamic", **options))


def test_left_padded_batch_equals_each_prompt_generated_alone(model):
    input_ids, attention_mask = left_padded_batch(20)  # prompts longer than the sliding window
    batched = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    for row in range(input_ids.shape[0]):
        prompt = input_ids[row : row + 1, attention_mask[row].bool()]
        alone = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(alone[0, prompt.shape[1] :], batched[row, input_ids.shape[1] :])


@pytest.mark.parametrize(
    "options",
    [
        {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9},
        {"num_beams": 3, "num_return_sequences": 2, "do_sample": False},
    ],
    ids=["sampling", "beam-search"],
)
@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_cached_generation_equals_generation_without_cache(model, cache_implementation, options):
    """Same seed, same tokens: the cache (beam search: with its reordering) changes nothing but speed."""
    input_ids, attention_mask = left_padded_batch(10)
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        outputs.append(
            model.generate(
                input_ids,
                attention_mask=attention_mask,
                max_new_tokens=20,
                use_cache=use_cache,
                cache_implementation=cache_implementation if use_cache else None,
                **options,
            )
        )
    assert torch.equal(*outputs)


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_beam_search_with_sinks_equals_beam_search_without_cache(cache_implementation):
    """10 + 20 tokens, left-padded, past both windows (8, 16): each cache's beam operations keep its sinks. (The
    beams that survive share their first tokens, so this cannot tell whether the sinks themselves are reordered;
    tests/test_cache.py holds each cache's row operations to the reference.)"""
    model = tiny_model("mixed", num_sink_tokens=3)
    model.generation_config.pad_token_id = 0
    input_ids, attention_mask = left_padded_batch(10)
    options = {"attention_mask": attention_mask, "max_new_tokens": 20, "num_beams": 3, "num_return_sequences": 2}
    cached = model.generate(input_ids, cache_implementation=cache_implementation, do_sample=False, **options)
    assert torch.equal(cached, model.generate(input_ids, use_cache=False, do_sample=False, **options))


def test_generation_continues_from_a_returned_cache(model):
    """Multi-turn chat: turn two reuses `out.cache` and equals generating the whole conversation afresh."""
    input_ids, attention_mask = left_padded_batch(10)
    first = model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=12, do_sample=False, return_dict_in_generate=True
    )
    assert isinstance(first.cache, FastGPTDynamicCache)
    user_turn = torch.randint(1, 128, (3, 5), generator=torch.Generator().manual_seed(2))
    conversation = torch.cat([first.sequences, user_turn], dim=1)
    conversation_mask = torch.cat([attention_mask, torch.ones(3, 12 + 5, dtype=attention_mask.dtype)], dim=1)
    continued = model.generate(
        conversation, attention_mask=conversation_mask, cache=first.cache, max_new_tokens=10, do_sample=False
    )
    afresh = model.generate(conversation, attention_mask=conversation_mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(continued, afresh)


def test_static_cache_compiled_gives_the_dynamic_cache_tokens(model):
    """`torch.compile` of the decode step with the static cache, as generate() sets it up on a GPU: fullgraph (no host
    sync or graph break), and one graph without int inputs for every step, which is what one CUDA graph needs.

    The CPU run traces with dynamo and runs through aot_eager (functionalization) to stay fast.
    """
    input_ids, attention_mask = left_padded_batch(10)
    graph_inputs = []

    def recording_backend(graph_module, example_inputs):
        graph_inputs.append(example_inputs)
        return aot_eager(graph_module, example_inputs)

    compile_config = CompileConfig(fullgraph=True, backend=recording_backend, mode=None)
    compile_config._compile_all_devices = True  # generate() compiles only on accelerators otherwise
    expected = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=12, do_sample=False)
    compiled = model.generate(
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=12,
        do_sample=False,
        cache_implementation="static",
        compile_config=compile_config,
    )
    assert torch.equal(compiled, expected)
    assert len(graph_inputs) == 1
    assert all(isinstance(value, torch.Tensor) for value in graph_inputs[0])


def tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on a few sentences, built locally."""
    sentences = [
        "the quick brown fox jumps over the lazy dog",
        "a small model reads a long story one word at a time",
        "windows slide while blocks remember the distant past",
    ]
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(sentences, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    assert tokenizer.get_vocab_size() <= vocab_size
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")


def test_text_generation_pipeline(model):
    tokenizer = tiny_tokenizer(model.config.vocab_size)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompt = "the quick brown fox"
    text = generator(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    token_ids = generator(prompt, max_new_tokens=12, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected_ids = model.generate(prompt_ids, max_new_tokens=12, do_sample=False)[0]
    assert list(token_ids) == expected_ids.tolist()
    assert text == prompt + tokenizer.decode(expected_ids[prompt_ids.shape[1] :])


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"input_ids": torch.zeros(1, 0, dtype=torch.long)}, "empty input"),
        ({"max_new_tokens": 32768}, "more than max_position_embeddings=32768"),
        ({"cache": DynamicCache()}, "needs a cache whose layers follow config.layer_types"),
        ({"cache_implementation": "quantized"}, "FastGPT has no 'quantized' cache"),
    ],
    ids=["empty-prompt", "beyond-max-positions", "plain-dynamic-cache", "quantized-cache"],
)
def test_bad_generate_arguments_are_refused(model, arguments, message):
    arguments = {"input_ids": torch.ones(1, 4, dtype=torch.long), "max_new_tokens": 3, **arguments}
    with pytest.raises(ValueError, match=message):
        model.generate(**arguments)


def test_cache_from_another_batch_size_is_refused_by_generate(model):
    input_ids, attention_mask = left_padded_batch(6)
    first = model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=2, do_sample=False, return_dict_in_generate=True
    )
    with pytest.raises(ValueError, match="continue a cache only with the rows"):
        model.generate(first.sequences[:1], cache=first.cache, max_new_tokens=2)


def test_static_cache_from_another_model_is_refused_by_generate(model):
    other = FastGPTStaticCache(tiny_model("sliding").config, max_cache_len=16)
    with pytest.raises(ValueError, match="build the cache from this model's config"):
        model.generate(torch.ones(1, 4, dtype=torch.long), cache=other, max_new_tokens=2)


def prefilled_cache(model, input_ids, attention_mask, cache_kind: str):
    """A cache of either kind (static: 64 positions) holding the given prompt, filled by one forward pass."""
    if cache_kind == "dynamic":
        cache = FastGPTDynamicCache(model.config)
    else:
        cache = FastGPTStaticCache(model.config, max_cache_len=64)
    with torch.no_grad():
        model(input_ids, attention_mask=attention_mask, cache=cache)
    return cache


@pytest.mark.parametrize("prompt_length", [10, 20], ids=["shorter", "as-long"])
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_cache_holding_as_many_tokens_as_the_prompt_is_refused(model, cache_kind, prompt_length):
    """A cache from an earlier, longer generation would otherwise meet an empty or wrong slice of the prompt."""
    input_ids, attention_mask = left_padded_batch(20)
    cache = prefilled_cache(model, input_ids, attention_mask, cache_kind)
    message = rf"The cache already holds 20 tokens and the prompt has only {prompt_length}: .*\(copy\.deepcopy\)"
    with pytest.raises(ValueError, match=message):
        model.generate(
            input_ids[:, :prompt_length],
            attention_mask=attention_mask[:, :prompt_length],
            past_key_values=cache,
            max_new_tokens=2,
            do_sample=False,
        )


@pytest.mark.parametrize("prefix_length", [13, 21])  # neither a multiple of the windows (8, 16) nor of the blocks (4)
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("stack", list(STACKS))
def test_deep_copies_of_a_prefix_cache_give_the_tokens_of_a_fresh_run(stack, cache_kind, prefix_length):
    """Transformers' prefix caching: a cache of a shared prefix, deep-copied for each prompt that extends it (here two,
    so the first run must leave the prefix's cache as it was), generates what the prompts give without it."""
    model = tiny_model(stack)
    model.generation_config.pad_token_id = 0
    input_ids, attention_mask = left_padded_batch(24)
    prefix_cache = prefilled_cache(model, input_ids[:, :prefix_length], attention_mask[:, :prefix_length], cache_kind)
    for prompt_length in (prefix_length + 1, 24):
        prompt = {"input_ids": input_ids[:, :prompt_length], "attention_mask": attention_mask[:, :prompt_length]}
        options = {"max_new_tokens": 12, "do_sample": False}
        reused = model.generate(**prompt, cache=copy.deepcopy(prefix_cache), **options)
        fresh = model.generate(**prompt, cache_implementation=cache_kind, **options)
        assert torch.equal(reused, fresh)
