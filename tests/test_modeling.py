"""FastGPTForCausalLM as a Transformers model: Llama equivalence, Auto classes, save/load, errors, gradients."""

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM, FastGPTModel
from fastgpt_hf.cache_fastgpt import FastGPTStaticCache

from .conftest import left_padded_batch, tiny_model


def llama_twin(model: FastGPTForCausalLM) -> LlamaForCausalLM:
    """A LlamaForCausalLM of the same shape carrying `model`'s weights (all layers must be full attention)."""
    config = model.config
    llama_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=config.rope_parameters,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        attn_implementation="eager",
    )
    llama = LlamaForCausalLM(llama_config).to(model.dtype).eval()
    llama.load_state_dict(model.state_dict(), strict=True)
    return llama


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex_attention"])
def test_all_full_attention_fastgpt_is_llama(backend):
    model = tiny_model("full", backend, dtype=torch.float32)
    llama = llama_twin(model)
    input_ids, _ = left_padded_batch(45)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, llama(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_left_padded_full_attention_matches_llama_on_real_tokens():
    model = tiny_model("full", "sdpa", dtype=torch.float32)
    llama = llama_twin(model)
    input_ids, attention_mask = left_padded_batch(30)
    with torch.no_grad():
        ours = model(input_ids, attention_mask=attention_mask).logits
        theirs = llama(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-4, atol=1e-4)


def test_auto_classes_build_fastgpt(tiny_config):
    assert isinstance(AutoModel.from_config(tiny_config), FastGPTModel)
    assert isinstance(AutoModelForCausalLM.from_config(tiny_config), FastGPTForCausalLM)


def test_save_and_reload_through_auto_gives_identical_logits(tmp_path):
    model = tiny_model("mixed", dtype=torch.float32)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, FastGPTForCausalLM)
    input_ids, attention_mask = left_padded_batch(50)
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
        assert torch.equal(reloaded(input_ids, attention_mask=attention_mask).logits, expected)


def test_gradients_reach_every_parameter():
    model = tiny_model("mixed", dtype=torch.float32).train()
    input_ids, attention_mask = left_padded_batch(40)
    model(input_ids, attention_mask=attention_mask, labels=input_ids).loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    attention = model.model.layers[1].self_attn
    for parameter in (attention.memory_k, attention.memory_v, attention.mix_gate.weight):
        assert parameter.grad.abs().sum() > 0
    for compressor in (attention.compress_k, attention.compress_v):
        assert compressor.weight.grad.abs().sum() > 0


def test_global_branch_matters_at_initialisation():
    """Fresh init: the gate is near 0.5 and the global branch changes the output."""
    model = tiny_model("dynamic", dtype=torch.float32, initializer_range=0.02)
    input_ids, _ = left_padded_batch(40)
    with torch.no_grad():
        before = model(input_ids).logits
        for layer in model.model.layers:
            layer.self_attn.memory_v.mul_(2.0)
        assert not torch.allclose(model(input_ids).logits, before, atol=1e-4)
        gate = torch.sigmoid(model.model.layers[0].self_attn.mix_gate(torch.randn(5, 64)))
    assert 0.3 < gate.mean() < 0.7


def test_loss_logits_to_keep_and_outputs():
    model = tiny_model("mixed", "eager", dtype=torch.float32)
    input_ids, attention_mask = left_padded_batch(20)
    output = model(
        input_ids, attention_mask=attention_mask, labels=input_ids, output_hidden_states=True, output_attentions=True
    )
    predicted = output.logits[:, :-1].flatten(0, 1)
    torch.testing.assert_close(output.loss, torch.nn.functional.cross_entropy(predicted, input_ids[:, 1:].flatten()))
    assert len(output.hidden_states) == model.config.num_hidden_layers + 1
    assert len(output.attentions) == model.config.num_hidden_layers
    assert output.attentions[0].shape == (3, 4, 20, 20)
    last = model(input_ids, attention_mask=attention_mask, logits_to_keep=1).logits
    torch.testing.assert_close(last[:, 0], output.logits[:, -1])


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_input_longer_than_max_position_embeddings_is_refused(use_cache):
    model = tiny_model("mixed", dtype=torch.float32, max_position_embeddings=64)
    with pytest.raises(ValueError, match=r"reaches 65 positions .* more than max_position_embeddings=64"):
        model(torch.zeros(1, 65, dtype=torch.long), use_cache=use_cache)


@pytest.mark.parametrize(
    ("position_ids", "message"),
    [
        (torch.arange(3)[None], r"position_ids must have shape \(batch, new tokens\) = \(2, 5\); got \(1, 3\)"),
        (torch.arange(10, 15)[None], r"position_ids must be in \[0, 5\).* got values from 10 to 14"),
        (torch.arange(-1, 4)[None], r"position_ids must be in \[0, 5\).* got values from -1 to 3"),
    ],
    ids=["shape", "beyond-the-tokens", "negative"],
)
def test_position_ids_that_do_not_count_the_tokens_are_refused(position_ids, message):
    model = tiny_model("mixed", dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(2, 5, dtype=torch.long), position_ids=position_ids)


IDS_ARE = r"input_ids must be token ids of shape \(batch, tokens\) and dtype torch.long or torch.int .*; got "
MASK_IS = r"attention_mask must have shape \(batch, cached \+ new tokens\) = \(2, 5\), .* got shape "
EMBEDS_ARE = r"inputs_embeds must have shape \(batch, tokens, hidden_size\) = \(batch, tokens, 64\); got "
# Each malformed input (beside `input_ids` of shape (2, 5) where it replaces another argument) and its error.
MALFORMED_INPUTS = {
    "ids-1d": ({"input_ids": torch.zeros(5, dtype=torch.long)}, IDS_ARE + r"shape \(5,\) and dtype torch.int64"),
    "ids-3d": ({"input_ids": torch.zeros(2, 5, 1, dtype=torch.long)}, IDS_ARE + r"shape \(2, 5, 1\)"),
    "ids-float": ({"input_ids": torch.zeros(2, 5)}, IDS_ARE + r"shape \(2, 5\) and dtype torch.float32"),
    "embeds-narrow": ({"inputs_embeds": torch.zeros(2, 5, 32)}, EMBEDS_ARE + r"\(2, 5, 32\)"),
    "embeds-2d": ({"inputs_embeds": torch.zeros(5, 64)}, EMBEDS_ARE + r"\(5, 64\)"),
    "mask-shorter": ({"attention_mask": torch.ones(2, 4)}, MASK_IS + r"\(2, 4\)"),
    "mask-more-rows": ({"attention_mask": torch.ones(3, 5)}, MASK_IS + r"\(3, 5\)"),
    "mask-1d": ({"attention_mask": torch.ones(5)}, MASK_IS + r"\(5,\)"),
    "mask-4d": ({"attention_mask": torch.ones(2, 1, 5, 5)}, MASK_IS + r"\(2, 1, 5, 5\)"),
    "zero-rows": ({"input_ids": torch.zeros(0, 5, dtype=torch.long)}, r"input_ids has shape \(0, 5\), an empty input"),
    "id-past-vocab": ({"input_ids": torch.tensor([[1, 2, 128]] * 2)}, r"token id 128, outside .* \[0, 128\)"),
    "id-negative": ({"input_ids": torch.tensor([[1, -3, 2]] * 2)}, r"token id -3, outside .* \[0, 128\)"),
}


@pytest.mark.parametrize("entry_point", ["forward", "generate"])
@pytest.mark.parametrize("malformed", list(MALFORMED_INPUTS))
def test_malformed_inputs_are_refused_naming_argument_and_shapes(malformed, entry_point):
    """A ValueError with the argument, the shape given and the shape expected, before any layer runs (Llama and
    generate() would fail deep inside with a RuntimeError or IndexError, or accept the input)."""
    model = tiny_model("mixed", dtype=torch.float32)
    arguments, message = MALFORMED_INPUTS[malformed]
    if "inputs_embeds" not in arguments:
        arguments = {"input_ids": torch.zeros(2, 5, dtype=torch.long), **arguments}
    with pytest.raises(ValueError, match=message):
        if entry_point == "forward":
            model(**arguments)
        else:
            model.generate(**arguments, max_new_tokens=2, do_sample=False)


def test_int32_ids_and_a_static_cache_mask_of_the_new_tokens_are_accepted():
    """What the checks let through: torch.int ids, and with a static cache the mask of the new tokens alone (beside
    position_ids), which is what generate()'s compiled decode passes."""
    model = tiny_model("mixed")
    input_ids, attention_mask = left_padded_batch(12)
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits[:, -1]
        cache = FastGPTStaticCache(model.config, max_cache_len=12)
        model(input_ids[:, :11].int(), attention_mask=attention_mask[:, :11], cache=cache)
        position_ids = attention_mask.cumsum(-1)[:, -1:] - 1
        last = model(input_ids[:, 11:], attention_mask=attention_mask[:, 11:], position_ids=position_ids, cache=cache)
    torch.testing.assert_close(last.logits[:, 0], expected, rtol=0, atol=1e-9)


def test_unsupported_attention_implementation_is_refused():
    model = tiny_model("mixed", dtype=torch.float32)
    model.config._attn_implementation = "paged|eager"
    with pytest.raises(ValueError, match=r"FastGPT has no 'paged\|eager' attention; use one of"):
        model(torch.zeros(1, 5, dtype=torch.long))


def test_attention_sparsity_at_4096_matches_the_design():
    config = FastGPTConfig.from_preset(
        "tiny", sliding_window=512, dynamic_window=1024, num_memory_tokens=8, compress_block_size=64
    )
    sliding, dynamic, full = FastGPTForCausalLM(config).attention_sparsity(4096)
    # Scored entries counted in integers: position p (1-based) scores min(p, window) keys, a dynamic layer adds the
    # 8 memory slots and its p // 64 complete blocks, a full layer scores p keys.
    n = 4096
    sliding_scored = 512 * 513 // 2 + (n - 512) * 512
    dynamic_scored = 1024 * 1025 // 2 + (n - 1024) * 1024 + 8 * n + sum(p // 64 for p in range(1, n + 1))
    assert sliding == pytest.approx(1 - sliding_scored / n**2, rel=1e-12)
    assert dynamic == pytest.approx(1 - dynamic_scored / n**2, rel=1e-12)
    assert full == pytest.approx(1 - n * (n + 1) // 2 / n**2, rel=1e-12)
    # DESIGN.md's figures: about 88% / 77% / 50% skipped.
    assert (round(sliding, 2), round(dynamic, 2), round(full, 2)) == (0.88, 0.77, 0.5)


def test_attention_sparsity_counts_the_sinks_beyond_the_window():
    """A sliding query at i (window 8) sees its window and the min(2, i + 1 - 8) sinks beyond it; full layers none."""
    with_sinks = tiny_model("mixed", num_sink_tokens=2).attention_sparsity(64)
    without = tiny_model("mixed").attention_sparsity(64)
    extra = sum(min(2, max(0, position + 1 - 8)) for position in range(64)) / 64**2
    assert with_sinks[0] == pytest.approx(without[0] - extra)
    assert with_sinks[2] == without[2]
