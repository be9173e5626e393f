"""The `selective_attention` layer (issue 26's proposal): the dynamic layer whose global branch also attends to the
exact tokens of each query's top-k blocks.

Every fast path against the float64 reference (outputs and gradients; lengths 1 to 131 with windows of 8 / 16 and
blocks of 4 that they are not multiples of; left padding; grouped-query ratios), the selection rule itself (ties,
fewer blocks than k), the dynamic cache (chunked prefill, token-by-token decode, rollback) against the reference,
and a refusal, naming what to change, from every path that has no selective layer.
"""

import types

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation import GenerationMode

from fastgpt_hf import FastGPTConfig
from fastgpt_hf.attention_reference import reference_logits, top_blocks
from fastgpt_hf.attention_selective import select_blocks, selective_global_branch_attention
from fastgpt_hf.cache_dynamic_layers import DynamicSelectiveLayer
from fastgpt_hf.cache_fastgpt import FastGPTDynamicCache, FastGPTRowCache, FastGPTStaticCache
from fastgpt_hf.export_executorch import FastGPTWithStaticCache
from fastgpt_hf.generation_fast_path import uses_cuda_fast_path
from fastgpt_hf.serving import ContinuousBatchingEngine

from .conftest import left_padded_batch, tiny_model
from .test_attention import FLOAT64_TOLERANCE, assert_gradients_match_reference, reference_error
from .test_cache import incremental_logits, max_error_on_real_tokens
from .test_cache_rollback import ROLLBACK_SCHEDULE, logits_with_rollbacks

SELECTIVE_STACKS = {
    "selective": ["selective_attention"] * 2,
    "mixed-selective": ["sliding_attention", "selective_attention", "full_attention", "dynamic_attention",
                        "selective_attention"],
}  # fmt: skip
# The mixed stack holds every layer kind and runs in the quick suite; the all-selective one in the full suite.
STACKS_MIXED_QUICK = [stack if stack == "mixed-selective" else pytest.param(stack, marks=pytest.mark.slow)
                      for stack in SELECTIVE_STACKS]  # fmt: skip
BACKENDS = ["eager", "sdpa", "flex_attention"]
CACHE_TOLERANCE = 1e-9


def selective_model(stack: str = "mixed-selective", backend: str = "sdpa", **overrides):
    """`tiny_model` (windows 8 / 16, blocks of 4, 2 memory slots, random weights at a large init) with selective
    layers; 2 blocks selected unless overridden, so that a query past 12 positions must choose."""
    return tiny_model(SELECTIVE_STACKS[stack], backend, **{"num_selected_blocks": 2, **overrides})


def test_configuration_alias_default_and_validation():
    config = FastGPTConfig.from_preset("tiny", layer_types=["local", "selective", "global"])
    assert config.layer_types == ["sliding_attention", "selective_attention", "full_attention"]
    assert config.num_selected_blocks == 4 and config.attention_window("selective_attention") == config.dynamic_window
    assert "selective_attention" not in FastGPTConfig(num_hidden_layers=9).layer_types  # opt-in, never a default
    for bad in (0, -2):
        with pytest.raises(ValueError, match=rf"num_selected_blocks must be a positive integer, got {bad!r}"):
            FastGPTConfig.from_preset("tiny", num_selected_blocks=bad)


def test_a_selective_layer_has_the_dynamic_layers_parameters():
    """Same state-dict keys and shapes as the dynamic layer: a dynamic checkpoint loads into a selective layout."""
    dynamic = tiny_model("dynamic")
    selective = selective_model("selective")
    shapes = {name: tensor.shape for name, tensor in dynamic.state_dict().items()}
    assert {name: tensor.shape for name, tensor in selective.state_dict().items()} == shapes
    selective.load_state_dict(dynamic.state_dict(), strict=True)


def test_the_selection_changes_the_output():
    """Same weights, past the windows: the selected tokens make the selective layer differ from the dynamic one,
    and both fast paths still agree with their own reference (so the test of the rule can fail)."""
    dynamic = tiny_model("dynamic")
    selective = selective_model("selective")
    selective.load_state_dict(dynamic.state_dict())
    input_ids, _ = left_padded_batch(40)
    with torch.no_grad():
        difference = (selective(input_ids).logits - dynamic(input_ids).logits)[:, 12:].abs().max().item()
        short = (selective(input_ids[:, :7]).logits - dynamic(input_ids[:, :7]).logits).abs().max().item()
    assert difference > 1e-3
    assert short > 1e-3  # one complete block is visible at position 3: its tokens join the softmax


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize(
    "length", [1, 6, 37, pytest.param(131, marks=pytest.mark.slow)], ids=lambda length: f"T{length}"
)
@pytest.mark.parametrize("stack", STACKS_MIXED_QUICK)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference_in_float64(backend, stack, length, padded):
    assert reference_error(selective_model(stack, backend), length, padded) < FLOAT64_TOLERANCE


@pytest.mark.parametrize("num_selected_blocks", [1, 3, pytest.param(40, marks=pytest.mark.slow)])
@pytest.mark.parametrize("kv_heads", [1, 2, 4], ids=["mqa", "gqa2", "mha"])
def test_grouped_query_ratios_and_selection_sizes(kv_heads, num_selected_blocks):
    """One selection per key/value-head group, for every group size; k from one block to more than there are."""
    model = selective_model(num_key_value_heads=kv_heads, num_selected_blocks=num_selected_blocks)
    input_ids, attention_mask = left_padded_batch(61)
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask).logits
        reference = reference_logits(model, input_ids, attention_mask)
    assert max_error_on_real_tokens(logits, reference, attention_mask) < FLOAT64_TOLERANCE


def test_float32_matches_reference():
    model = selective_model(dtype=torch.float32)
    input_ids, attention_mask = left_padded_batch(131)
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask).logits
        reference = reference_logits(model, input_ids, attention_mask)
    assert max_error_on_real_tokens(logits, reference, attention_mask) < 2e-4


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("length", [9, pytest.param(70, marks=pytest.mark.slow)], ids=lambda length: f"T{length}")
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_gradients_match_reference(backend, length, padded):
    """Through the selected tokens' weights and the compressed entries; the choice itself carries none."""
    assert_gradients_match_reference(selective_model(backend=backend), length, padded)


def test_selection_ties_go_to_the_lower_block_and_fewer_blocks_select_all():
    """Scores per block (one head per group): blocks 1, 2 and 4 tie for first place; block 3 is not visible."""
    scores = torch.tensor([0.0, 5.0, 5.0, 9.0, 5.0, -1.0], dtype=torch.float64)
    visible = torch.tensor([True, True, True, False, True, True])
    logits = scores.expand(1, 1, 1, 1, -1)  # [B, K, G, T, C]
    selected, chosen = select_blocks(logits, visible.expand(1, 1, 1, -1), 2)
    assert selected.flatten().tolist() == [1, 2] and chosen.all()
    assert top_blocks(scores[None], visible[None], 2).flatten().tolist() == [False, True, True, False, False, False]
    selected, chosen = select_blocks(logits, visible.expand(1, 1, 1, -1), 6)  # 5 visible blocks for k = 6
    assert sorted(selected[chosen].tolist()) == [0, 1, 2, 4, 5]
    assert top_blocks(scores[None], visible[None], 6).flatten().tolist() == visible.tolist()


def test_group_heads_sum_their_scores_to_choose():
    """Two heads share a key/value head: block 0 wins for head 0 alone, block 1 for the pair's sum."""
    logits = torch.tensor([[3.0, 0.0], [-4.0, 2.0]], dtype=torch.float64)[None, None, :, None, :]  # [1, 1, G2, 1, C2]
    selected, _ = select_blocks(logits, torch.ones(1, 1, 1, 2, dtype=torch.bool), 1)
    assert selected.flatten().tolist() == [1]


@pytest.mark.parametrize("tokens_per_call", [1, 37])
def test_global_branch_is_the_same_in_any_number_of_chunks(tokens_per_call):
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, head_dim, memory, block_size = 2, 4, 2, 30, 8, 3, 4
    blocks = -(-length // block_size)

    def random(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    arguments = (
        random(batch, heads, length, head_dim),
        torch.arange(length).expand(batch, -1),
        random(memory, kv_heads, head_dim),
        random(memory, kv_heads, head_dim),
        random(batch, kv_heads, blocks, head_dim),
        random(batch, kv_heads, blocks, head_dim),
        torch.full((batch, blocks), float(block_size), dtype=torch.float64),
        random(batch, kv_heads, blocks * block_size, head_dim),
        random(batch, kv_heads, blocks * block_size, head_dim),
        torch.ones(batch, blocks * block_size, dtype=torch.bool),
        block_size,
        2,
        head_dim**-0.5,
    )
    one_call = selective_global_branch_attention(*arguments)
    chunked = selective_global_branch_attention(*arguments, token_entries_per_call=tokens_per_call)
    torch.testing.assert_close(chunked, one_call, rtol=1e-12, atol=1e-12)


# Prefill 13, a chunk of 19 (longer than every window, with a past), then one token at a time, over 40 tokens: ten
# blocks of 4; and every token one at a time.
@pytest.mark.parametrize(
    "schedule",
    [[13, 19] + [1] * 8, pytest.param([1] * 40, marks=pytest.mark.slow)],
    ids=["chunked-prefill", "token-by-token"],
)
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_dynamic_cache_decode_matches_the_reference(backend, schedule):
    model = selective_model(backend=backend)
    input_ids, attention_mask = left_padded_batch(40)
    reference = reference_logits(model, input_ids, attention_mask)
    cache = FastGPTDynamicCache(model.config)
    logits = incremental_logits(model, input_ids, attention_mask, cache, schedule)
    assert max_error_on_real_tokens(logits, reference, attention_mask) < CACHE_TOLERANCE
    layer = cache.layers[1]
    assert isinstance(layer, DynamicSelectiveLayer)
    assert layer.token_keys.shape == (3, model.config.num_key_value_heads, 40, model.config.head_dim)
    assert layer.block_tokens()[2].sum(1).tolist() == attention_mask.sum(1).tolist()  # every real token, once


@pytest.mark.slow
def test_dynamic_cache_rolls_back_exactly():
    """Assisted and prompt-lookup decoding's crop: the removed tokens leave the block tokens too."""
    model = selective_model()
    input_ids, attention_mask = left_padded_batch(40)
    reference = reference_logits(model, input_ids, attention_mask)
    logits = logits_with_rollbacks(
        model, input_ids, attention_mask, FastGPTDynamicCache(model.config), ROLLBACK_SCHEDULE
    )
    assert max_error_on_real_tokens(logits, reference, attention_mask) < CACHE_TOLERANCE


@pytest.mark.slow
def test_generate_left_padded_batch_equals_each_prompt_alone():
    model = selective_model()
    input_ids, attention_mask = left_padded_batch(11)
    settings = {"max_new_tokens": 20, "do_sample": False, "pad_token_id": 0}
    batched = model.generate(input_ids, attention_mask=attention_mask, **settings)[:, 11:]
    for row in range(3):
        real = attention_mask[row].bool()
        alone = model.generate(input_ids[row : row + 1, real], **settings)[:, int(real.sum()) :]
        assert torch.equal(batched[row : row + 1], alone)


def test_attention_sparsity_counts_the_selected_tokens():
    model = selective_model("selective", num_selected_blocks=2)
    dynamic = tiny_model("dynamic")
    length = 64
    extra = sum(min(2, (position + 1) // 4) * 4 for position in range(length)) / length**2
    assert model.attention_sparsity(length)[0] == pytest.approx(dynamic.attention_sparsity(length)[0] - extra)


def test_two_tokens_at_one_position_are_refused():
    """A selective layer keeps one token per position: repeated positions in a call, or a position the cache holds
    a token at, are refused."""
    model = selective_model()
    message = r"Row 0 has two real tokens at position 1: a selective_attention layer keeps one token per position"
    with pytest.raises(ValueError, match=message):
        model(torch.arange(4)[None], position_ids=torch.tensor([[0, 1, 1, 2]]))
    cache = FastGPTDynamicCache(model.config)
    with torch.no_grad():
        model(torch.arange(6)[None], cache=cache)
        with pytest.raises(ValueError, match=r"Row 0 has two real tokens at position 5"):
            model(torch.arange(2)[None], position_ids=torch.tensor([[5, 6]]), cache=cache)
        model(torch.arange(2)[None], position_ids=torch.tensor([[6, 7]]), cache=cache)  # the next positions: fine


STATIC_REFUSAL = r"FastGPTStaticCache has no selective_attention layer.*Use FastGPTDynamicCache"


def test_static_cache_refuses_selective_layers():
    with pytest.raises(ValueError, match=STATIC_REFUSAL):
        FastGPTStaticCache(selective_model().config, max_cache_len=32)


def test_generate_with_a_static_cache_refuses_selective_layers():
    with pytest.raises(ValueError, match=STATIC_REFUSAL):
        selective_model().generate(torch.arange(6)[None], max_new_tokens=3, cache_implementation="static")


def test_executorch_export_refuses_selective_layers():
    with pytest.raises(ValueError, match=STATIC_REFUSAL):
        FastGPTWithStaticCache(selective_model(), max_cache_len=32)


def test_serving_refuses_selective_layers():
    with pytest.raises(ValueError, match=STATIC_REFUSAL):
        FastGPTRowCache(selective_model().config, max_cache_len=32, max_rows=2)
    with pytest.raises(ValueError, match=STATIC_REFUSAL):
        ContinuousBatchingEngine(selective_model(), max_rows=2, max_cache_len=32)


def test_cuda_fast_path_leaves_selective_models_on_the_dynamic_cache():
    """generate()'s compiled static cache on CUDA: a selective model keeps the dynamic cache (checked with a stand-in
    for a CUDA model; the condition reads the config before the device's capabilities)."""
    stand_in = types.SimpleNamespace(device=torch.device("cuda"), config=selective_model().config)
    assert not uses_cuda_fast_path(stand_in, GenerationConfig(use_cache=True), GenerationMode.GREEDY_SEARCH, {})
    stand_in.config = tiny_model("mixed").config
    assert uses_cuda_fast_path(stand_in, GenerationConfig(use_cache=True), GenerationMode.GREEDY_SEARCH, {})


def test_tensor_parallel_refuses_selective_layers():
    model = selective_model()
    model.config.distributed_config = types.SimpleNamespace(tp_size=2)  # as Transformers sets it under a tp_plan
    with pytest.raises(ValueError, match=r"selective_attention layers do not run tensor-parallel yet \(tp_size 2\)"):
        model(torch.arange(6)[None])
