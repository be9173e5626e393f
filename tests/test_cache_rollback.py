"""Cache rollback (`crop`) and the generation modes built on it: assisted, prompt-lookup and speculative decoding.

Every layer kind rolls back exactly: feeding tokens, cropping them off and feeding the true ones gives the float64
reference's logits (within 1e-9, as tests/test_cache.py), across window and block boundaries, with left padding.
Through `generate()`, each mode gives greedy decoding's tokens.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from fastgpt_hf.attention_reference import reference_logits
from fastgpt_hf.benchmarking import cache_bytes
from fastgpt_hf.cache_dynamic_layers import DynamicCompressedLayer
from fastgpt_hf.cache_fastgpt import FastGPTDynamicCache, FastGPTStaticCache

from .conftest import STACKS, left_padded_batch, tiny_model

TOLERANCE = 1e-9
LENGTH = 40  # crosses the sliding window (8), the dynamic window (16) and ten blocks of 4
# (true tokens, rejected tokens, rejected fed one at a time?): verification chunks (the main model of assisted
# decoding) and one-token drafts (its assistant), rejecting 0 to 6 tokens, some chunks crossing a block.
ROLLBACK_SCHEDULE = [(5, 0, False), (1, 3, False), (0, 2, True), (3, 2, False), (2, 4, True), (4, 0, False)] * 3
ROLLBACK_SCHEDULE += [(1, 6, False)] * 5 + [(1, 1, True)] * 5


def logits_with_rollbacks(model, input_ids, attention_mask, cache, schedule) -> torch.Tensor:
    """Logits `[B, T, V]` of the true tokens, fed through `cache` by `schedule`: each entry feeds its true tokens and
    then rejected random ones (in one step with them, or one at a time) and crops the rejected ones off."""
    generator = torch.Generator().manual_seed(7)
    batch = input_ids.shape[0]
    cache.activate_past_recording()
    logits, start = [], 0
    with torch.no_grad():
        for true_tokens, rejected, one_at_a_time in schedule:
            end = min(start + true_tokens, input_ids.shape[1])
            junk = torch.randint(0, model.config.vocab_size, (batch, rejected), generator=generator)
            mask = torch.cat([attention_mask[:, :end], torch.ones(batch, rejected, dtype=torch.long)], dim=1)
            steps = [input_ids[:, start:end]]
            steps += list(junk.split(1, dim=1)) if one_at_a_time else [junk]
            if not one_at_a_time:
                steps = [torch.cat(steps, dim=1)]
            fed = start
            for step in (step for step in steps if step.shape[1]):
                fed += step.shape[1]
                output = model(step, attention_mask=mask[:, :fed], cache=cache, use_cache=True)
                logits.append(output.logits[:, : max(0, min(end, fed) - (fed - step.shape[1]))])
            cache.crop(-rejected)
            assert cache.get_seq_length() == end
            start = end
    return torch.cat(logits, dim=1)


def assert_matches_reference(model, cache):
    input_ids, attention_mask = left_padded_batch(LENGTH)
    reference = reference_logits(model, input_ids, attention_mask)
    logits = logits_with_rollbacks(model, input_ids, attention_mask, cache, ROLLBACK_SCHEDULE)
    assert logits.shape[1] == LENGTH
    error = (logits - reference).abs().amax(-1)[attention_mask.bool()].max().item()
    assert error < TOLERANCE


# "mixed" holds every layer kind; `make test` runs it, CI every stack (each a few seconds).
STACKS_MIXED_QUICK = [stack if stack == "mixed" else pytest.param(stack, marks=pytest.mark.slow) for stack in STACKS]


@pytest.mark.parametrize("stack", STACKS_MIXED_QUICK)
def test_dynamic_cache_rolls_back_exactly(stack):
    model = tiny_model(stack)
    assert_matches_reference(model, FastGPTDynamicCache(model.config))


@pytest.mark.parametrize(
    "stack",
    [
        ["sliding_attention", "dynamic_attention", "full_attention"],
        pytest.param(["selective_attention", "sliding_attention"], marks=pytest.mark.slow),
    ],
    ids=["mixed", "selective"],
)
def test_dynamic_cache_with_sinks_rolls_back_exactly(stack):
    """A crop moves the sinks among the tokens it drops from the window into the kept prefix (`SinkTokens`)."""
    model = tiny_model(stack, num_sink_tokens=3)
    assert_matches_reference(model, FastGPTDynamicCache(model.config))


@pytest.mark.parametrize("stack", STACKS_MIXED_QUICK)
def test_static_cache_holding_every_position_rolls_back_exactly(stack):
    """As Transformers' static sliding layers: croppable where the windows hold every position the cache sees."""
    model = tiny_model(stack, sliding_window=64, dynamic_window=64)
    cache = FastGPTStaticCache(model.config, max_cache_len=64)
    assert cache.is_croppable
    assert_matches_reference(model, cache)


def test_static_cache_with_sinks_forgets_the_sinks_it_crops():
    """The rejected tokens that took a row's first sink slots (row 2's real tokens start at column 7) leave them at
    the crop: the row's true first real tokens hold them at the end."""
    model = tiny_model("mixed", sliding_window=64, dynamic_window=64, num_sink_tokens=3)
    cache = FastGPTStaticCache(model.config, max_cache_len=64)
    input_ids, attention_mask = left_padded_batch(15)
    logits = logits_with_rollbacks(model, input_ids, attention_mask, cache, ROLLBACK_SCHEDULE[:6])
    reference = reference_logits(model, input_ids, attention_mask)
    assert (logits - reference).abs().amax(-1)[attention_mask.bool()].max().item() < TOLERANCE
    for layer in cache.layers[:2]:
        assert layer.sink_counts.tolist() == [3, 3, 3]
        assert layer.sink_columns.tolist() == [[0, 1, 2], [3, 4, 5], [7, 8, 9]]


def test_rollback_keeps_what_the_design_keeps():
    """DESIGN.md section 4 after rollbacks: the window, one entry and count per block, the open block's sums."""
    model = tiny_model("dynamic", dtype=torch.float32)
    input_ids, attention_mask = left_padded_batch(LENGTH)
    cache = FastGPTDynamicCache(model.config)
    logits_with_rollbacks(model, input_ids, attention_mask, cache, ROLLBACK_SCHEDULE)
    config, layer = model.config, cache.layers[0]
    batch, kv_heads, head_dim = 3, config.num_key_value_heads, config.head_dim
    assert layer.keys.shape == (batch, kv_heads, config.dynamic_window - 1, head_dim)
    assert layer.recorded_tokens == []  # nothing kept past the last crop
    blocks = layer.num_blocks()
    window_bytes = 2 * batch * kv_heads * (config.dynamic_window - 1) * head_dim * 4
    entries_bytes = 2 * batch * kv_heads * blocks * head_dim * 4 + batch * blocks * 4
    open_block_bytes = 2 * batch * kv_heads * head_dim * 4 + batch * 8
    window_tensor_bytes = 8  # Transformers' DynamicSlidingWindowLayer keeps its window as a 0-d tensor
    expected = window_bytes + entries_bytes + open_block_bytes + window_tensor_bytes
    assert cache_bytes(cache) == 2 * expected  # two dynamic layers


def test_crop_without_recording_is_refused():
    model = tiny_model("dynamic")
    cache = FastGPTDynamicCache(model.config)
    with torch.no_grad():
        model(torch.arange(20)[None], cache=cache)
    with pytest.raises(ValueError, match="activate_past_recording"):
        cache.crop(-2)


def test_static_cache_whose_windows_drop_tokens_refuses_crop_and_assisted_decoding():
    model = tiny_model("mixed")
    cache = FastGPTStaticCache(model.config, max_cache_len=40)
    with torch.no_grad():
        model(torch.arange(20)[None], cache=cache)
    assert not cache.is_croppable
    with pytest.raises(ValueError, match="tokens that left its window are gone"):
        cache.crop(-2)
    with pytest.raises(ValueError, match="Use the dynamic cache"):
        model.generate(
            torch.arange(10)[None], max_new_tokens=5, prompt_lookup_num_tokens=2, cache_implementation="static"
        )


# Generation through Transformers: prompt 10 + 30 new tokens cross both windows and several blocks.
PROMPT_LENGTH, NEW_TOKENS = 10, 30


def prompt(vocab_size: int = 128) -> torch.Tensor:
    """A prompt with repeated n-grams, so that prompt lookup has candidates to propose (and to reject)."""
    pattern = torch.randint(0, vocab_size, (4,), generator=torch.Generator().manual_seed(5))
    return torch.cat([pattern, pattern, pattern[:2]])[None]


def greedy(model, **kwargs) -> torch.Tensor:
    return model.generate(prompt(), max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)


def assistant_model():
    """A FastGPT of the same shape and other weights, drafting 3 tokens a round (the main model rejects most)."""
    assistant = tiny_model("mixed", dtype=torch.float32, seed=1)
    assistant.generation_config.num_assistant_tokens = 3
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    return assistant


@pytest.fixture
def crops(monkeypatch) -> list[int]:
    """The token counts every dynamic layer's crop removed during the test."""
    removed: list[int] = []
    original = DynamicCompressedLayer.crop

    def recording_crop(layer, tokens_to_remove: int) -> None:
        removed.append(-tokens_to_remove)
        original(layer, tokens_to_remove)

    monkeypatch.setattr(DynamicCompressedLayer, "crop", recording_crop)
    return removed


def test_assisted_decoding_with_a_fastgpt_assistant_gives_greedy_tokens(crops):
    model = tiny_model("mixed", dtype=torch.float32)
    assistant = assistant_model()
    expected = greedy(model)
    assert torch.equal(greedy(model, assistant_model=assistant), expected)
    assert max(crops) > 0  # drafts were rejected and rolled back, in the assistant's cache and the model's


def test_prompt_lookup_decoding_gives_greedy_tokens(crops):
    model = tiny_model("mixed", dtype=torch.float32)
    assert torch.equal(greedy(model, prompt_lookup_num_tokens=3), greedy(model))
    assert max(crops) > 0


@pytest.mark.slow  # about 10 s on 2 busy cores; the quick suite has assisted and prompt-lookup decoding
def test_speculative_sampling_gives_greedy_tokens_at_top_k_1(crops):
    """Speculative sampling (the assistant's logits, `_speculative_sampling`) with top_k=1 must pick greedy's tokens."""
    model = tiny_model("mixed", dtype=torch.float32)
    assistant = assistant_model()
    sampled = model.generate(prompt(), max_new_tokens=NEW_TOKENS, do_sample=True, top_k=1, assistant_model=assistant)
    assert torch.equal(sampled, greedy(model))
    assert max(crops) > 0


@pytest.mark.slow  # about 10 s on 2 busy cores; the quick suite has assisted and prompt-lookup decoding
def test_static_cache_holding_every_position_decodes_assisted_as_greedy():
    model = tiny_model("mixed", dtype=torch.float32, sliding_window=64, dynamic_window=64)
    expected = greedy(model, cache_implementation="static")
    assert torch.equal(greedy(model, prompt_lookup_num_tokens=3, cache_implementation="static"), expected)
    assert torch.equal(expected, greedy(model))


def test_fastgpt_assists_another_model_as_greedy(crops):
    """Transformers records past states only in the caches it builds; FastGPT builds its own, and records too."""
    fastgpt = assistant_model()
    torch.manual_seed(0)
    llama_config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
    )
    llama = LlamaForCausalLM(llama_config).eval()
    for token_id in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(llama.generation_config, token_id, getattr(fastgpt.generation_config, token_id))
    assert torch.equal(greedy(llama, assistant_model=fastgpt), greedy(llama))
    assert max(crops) > 0


def test_positions_that_go_back_to_a_closed_block_are_refused():
    """A closed block keeps its entry only (DESIGN.md section 4): a token cannot join it afterwards."""
    model = tiny_model("dynamic")
    cache = FastGPTDynamicCache(model.config)
    with torch.no_grad():
        model(torch.arange(10)[None], cache=cache)
        with pytest.raises(ValueError, match=r"position_ids\[0, 0\] = 2 falls in block 0 of 4 positions"):
            model(torch.tensor([[5]]), position_ids=torch.tensor([[2]]), cache=cache)
        model(torch.tensor([[5]]), position_ids=torch.tensor([[8]]), cache=cache)  # the open block takes it
    rows = FastGPTDynamicCache(model.config)
    mask = torch.tensor([[0] * 6 + [1] * 4, [1] * 10])
    with torch.no_grad():  # row 1 (10 real tokens) is ahead of row 0 (4); shared [1, T] positions go back for row 1
        model(torch.arange(20).view(2, 10), attention_mask=mask, cache=rows)
        message = r"position_ids\[0, 0\] = 5 falls in block 1 of 4 positions, but row 1 of the cache"
        with pytest.raises(ValueError, match=message):
            model(
                torch.tensor([[5], [5]]),
                attention_mask=F.pad(mask, (0, 1), value=1),
                position_ids=torch.tensor([[5]]),
                cache=rows,
            )
