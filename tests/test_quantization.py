"""INT8 schemes: logits near float32, precise modules untouched, save and reload, QAT through Trainer, errors."""

import importlib.util
import json
import pickle
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM, quantization

# Relative logit error ||int8 - fp32|| / ||fp32|| allowed on a random model with 256-wide layers.
RELATIVE_TOLERANCE = 0.05
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None or importlib.util.find_spec("bitsandbytes") is None,
    reason="needs the quant extra (torchao, bitsandbytes)",
)


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = FastGPTConfig.from_preset("tiny", hidden_size=256, intermediate_size=512, head_dim=64)
    model = FastGPTForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("float")
    model.save_pretrained(folder)
    input_ids = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids).logits
    return folder, input_ids, logits


def relative_error(model, input_ids, reference) -> float:
    with torch.no_grad():
        logits = model(input_ids).logits.float()
    return ((logits - reference).norm() / reference.norm()).item()


def assert_precise_modules_untouched(model):
    attention = model.model.layers[1].self_attn  # the tiny preset's dynamic layer
    for module in (model.lm_head, attention.mix_gate, attention.compress_k, attention.compress_v):
        assert type(module) is nn.Linear and type(module.weight) is nn.Parameter
        assert module.weight.dtype == torch.float32
    assert attention.memory_k.dtype == torch.float32


@pytest.mark.parametrize("scheme", quantization.SCHEMES)
def test_scheme_is_close_to_float_and_keeps_precise_parts(float_checkpoint, scheme):
    folder, input_ids, reference = float_checkpoint
    model = quantization.load_quantized(folder, scheme)
    assert relative_error(model, input_ids, reference) < RELATIVE_TOLERANCE
    assert_precise_modules_untouched(model)
    assert quantization.weight_bytes(model) < 0.5 * quantization.weight_bytes(
        AutoModelForCausalLM.from_pretrained(folder)
    )
    generated = model.generate(input_ids[:, :5], max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, 9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; CI machines have none")
@pytest.mark.parametrize("scheme", quantization.LOAD_TIME_SCHEMES)
def test_load_time_scheme_on_cuda(float_checkpoint, scheme):
    folder, input_ids, reference = float_checkpoint
    model = quantization.load_quantized(folder, scheme, device_map="cuda")
    with torch.no_grad():
        logits = model(input_ids.cuda()).logits.float().cpu()
    assert ((logits - reference).norm() / reference.norm()).item() < RELATIVE_TOLERANCE
    generated = model.generate(input_ids[:, :5].cuda(), max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, 9)


@pytest.mark.parametrize("scheme", ["torchao-int8-weight", "torchao-int8-dynamic", "bnb-int8", "dynamic-range"])
def test_quantized_checkpoint_saves_and_reloads(float_checkpoint, tmp_path, scheme):
    folder, input_ids, _ = float_checkpoint
    quantization.quantize_main([str(folder), str(tmp_path / "int8"), "--scheme", scheme])
    if scheme == "dynamic-range":
        reloaded, again = (
            quantization.load_dynamic_range(tmp_path / "int8"),
            quantization.load_quantized(folder, scheme),
        )
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "int8", device_map="cpu")
        again = quantization.load_quantized(folder, scheme)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, again(input_ids).logits)


def test_dynamic_range_round_trip_is_exact_through_safetensors_and_json(float_checkpoint, tmp_path):
    folder, input_ids, _ = float_checkpoint
    model = quantization.load_quantized(folder, "dynamic-range")
    quantization.save_dynamic_range(model, tmp_path)
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.bin"))
    description = json.loads((tmp_path / quantization.DYNAMIC_RANGE_CONFIG).read_text())
    quantized = {
        name for name, module in model.named_modules() if isinstance(module, quantization.DynamicQuantizedLinear)
    }
    assert description["scheme"] == "dynamic-range" and description["quantized_modules"].keys() == quantized
    tensors = load_file(tmp_path / quantization.DYNAMIC_RANGE_WEIGHTS)
    q_proj = model.model.layers[0].self_attn.q_proj.weight()
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.weight"], q_proj.int_repr())
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.weight_scales"], q_proj.q_per_channel_scales())
    reloaded = quantization.load_checkpoint_model(tmp_path)
    assert_precise_modules_untouched(reloaded)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, model(input_ids).logits)


class RunsCodeWhenUnpickled:
    """What a tampered pickle can hold: unpickling it writes the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "unpickled")


def test_dynamic_range_pickle_of_older_versions_is_refused_unopened(float_checkpoint, tmp_path):
    folder, _, _ = float_checkpoint
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    marker = tmp_path / "code_ran"
    (tmp_path / quantization.PICKLED_DYNAMIC_RANGE_WEIGHTS).write_bytes(pickle.dumps(RunsCodeWhenUnpickled(marker)))
    with pytest.raises(ValueError, match=r"dynamic_range_int8.pt is a pickle .* re-quantize the float checkpoint"):
        quantization.load_checkpoint_model(tmp_path)
    assert not marker.exists()


@pytest.fixture(scope="module")
def dynamic_range_folder(float_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dynamic_range")
    quantization.save_dynamic_range(quantization.load_quantized(float_checkpoint[0], "dynamic-range"), folder)
    return folder


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda folder: (folder / "dynamic_range_int8.safetensors").unlink(),
            r"dynamic_range_int8.safetensors is missing",
        ),
        (
            lambda folder: truncate(folder / "dynamic_range_int8.safetensors"),
            r"dynamic_range_int8.safetensors is missing or",
        ),
        (lambda folder: truncate(folder / "dynamic_range_int8.json"), r"dynamic_range_int8.json is missing or corrupt"),
        (
            lambda folder: (folder / "config.json").write_text(
                (folder / "config.json").read_text().replace('"intermediate_size": 512', '"intermediate_size": 256')
            ),
            r"dynamic_range_int8.safetensors does not fit config.json's model: .*mlp.up_proj.weight: \(512, 256\)",
        ),
    ],
    ids=["missing-weights", "truncated-weights", "truncated-json", "other-config"],
)
def test_damaged_dynamic_range_folder_is_a_clear_error(dynamic_range_folder, tmp_path, damage, message):
    for path in dynamic_range_folder.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    damage(tmp_path)
    with pytest.raises(ValueError, match=message):
        quantization.load_checkpoint_model(tmp_path)


def test_quantization_aware_training_through_trainer_then_int8(float_checkpoint, tmp_path):
    folder, input_ids, _ = float_checkpoint
    model = quantization.prepare_qat(AutoModelForCausalLM.from_pretrained(folder))
    batch = input_ids.repeat(4, 1)
    dataset = Dataset.from_dict({"input_ids": batch.tolist(), "labels": batch.tolist()})
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.8 * losses[0]
    model.eval()
    with torch.no_grad():
        fake_quantized = model(input_ids).logits
    quantization.convert_qat(model)
    assert "Int8" in type(model.model.layers[0].self_attn.q_proj.weight).__name__
    assert_precise_modules_untouched(model)
    assert relative_error(model, input_ids, fake_quantized) < RELATIVE_TOLERANCE


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match=r"Unknown quantization scheme 'int3'; choose one of"):
        quantization.quantization_config("int3")


def test_missing_package_is_named(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    with pytest.raises(ValueError, match=r"Scheme 'bnb-int8' needs bitsandbytes: pip install 'fastgpt_hf\[quant\]'"):
        quantization.quantization_config("bnb-int8")


def test_weight_bytes_count_tied_weights_once(float_checkpoint):
    folder, _, _ = float_checkpoint
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert quantization.weight_bytes(model) == sum(p.numel() * p.element_size() for p in model.parameters())
