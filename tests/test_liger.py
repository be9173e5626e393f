"""FastGPT with Liger-Kernel (`fastgpt_hf.liger`): registration, what the patch replaces, and the numbers.

On the CPU, Liger's rotary and fused linear cross-entropy kernels run under Triton's interpreter in a process of
their own (`tests/liger_runs.py`); its RMSNorm and SwiGLU kernels do not run there, so the tests marked `gpu` check
all four against the plain model and the float64 reference.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("liger_kernel", reason="the `liger` extra (liger-kernel, triton) is not installed")

from liger_kernel.transformers import _apply_liger_kernel_to_instance  # noqa: E402
from liger_kernel.transformers.rms_norm import LigerRMSNorm  # noqa: E402
from liger_kernel.transformers.swiglu import LigerSwiGLUMLP  # noqa: E402

from fastgpt_hf import FastGPTForCausalLM, FastGPTForConditionalGeneration, modeling_fastgpt  # noqa: E402
from fastgpt_hf.liger import (  # noqa: E402
    apply_liger_kernel_to_fastgpt,
    fused_linear_cross_entropy_logits_and_loss,
    liger_rotary_pos_emb_on_copies,
)
from fastgpt_hf.modeling_fastgpt import FastGPTLanguageModelingHead  # noqa: E402

from .conftest import tiny_model  # noqa: E402
from .liger_runs import compare_models, compare_trainers  # noqa: E402
from .test_gpu import relative_error  # noqa: E402
from .test_multimodal import build_model, tiny_processor  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_modeling_module(monkeypatch):
    """Liger's patches of module attributes (rotary, and the classes without a model) undone after the test."""
    for name in ("apply_rotary_pos_emb", "FastGPTRMSNorm", "FastGPTMLP"):
        monkeypatch.setattr(modeling_fastgpt, name, getattr(modeling_fastgpt, name))
    yield
    for model_class in (FastGPTForCausalLM, FastGPTForConditionalGeneration):
        if "logits_and_loss" in vars(model_class):  # set there by the patch without a model; else inherited
            delattr(model_class, "logits_and_loss")


def run_python(code: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_import_leaves_liger_unloaded_and_registers_fastgpt_when_liger_loads():
    output = run_python(
        "import sys, fastgpt_hf\n"
        "print('loaded' if 'liger_kernel.transformers.monkey_patch' in sys.modules else 'unloaded')\n"
        "from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN as table\n"
        "print(table['fastgpt'].__name__, table['fastgpt_vl'].__name__)\n"
    ).stdout
    assert output.split() == ["unloaded", "apply_liger_kernel_to_fastgpt", "apply_liger_kernel_to_fastgpt"]


@pytest.mark.slow
def test_import_after_liger_registers_fastgpt_at_once():
    output = run_python(
        "from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN as table\n"
        "print('fastgpt' in table)\n"
        "import fastgpt_hf\n"
        "print(table['fastgpt'].__name__)\n"
    ).stdout
    assert output.split() == ["False", "apply_liger_kernel_to_fastgpt"]


@pytest.mark.slow
def test_glue_that_cannot_import_leaves_liger_working_and_says_so():
    """A Liger whose helpers moved must not break Liger for other models in a process that imported FastGPT."""
    result = run_python(
        "import sys, fastgpt_hf\n"
        "sys.modules['fastgpt_hf.liger'] = None  # importing it now raises ImportError\n"
        "from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN as table\n"
        "print('llama' in table, 'fastgpt' in table)\n"
    )
    assert result.stdout.split() == ["True", "False"]
    assert "FastGPT is not registered with Liger: fastgpt_hf.liger could not import" in result.stderr


def replaced_forwards(model: torch.nn.Module) -> dict[str, str]:
    """Submodule name -> the class whose forward the instance now runs, for the instances patched one by one."""
    return {name: module._get_name() for name, module in model.named_modules() if "forward" in vars(module)}


def expected_forwards(prefix: str, num_layers: int) -> dict[str, str]:
    expected = {f"{prefix}norm": "LigerRMSNorm"}
    for layer in range(num_layers):
        expected[f"{prefix}layers.{layer}.input_layernorm"] = "LigerRMSNorm"
        expected[f"{prefix}layers.{layer}.post_attention_layernorm"] = "LigerRMSNorm"
        expected[f"{prefix}layers.{layer}.mlp"] = "LigerSwiGLUMLP"
    return expected


def test_trainer_entry_point_patches_norms_mlps_rotary_and_head_only(restore_modeling_module):
    """Trainer's call, `_apply_liger_kernel_to_instance(model=...)`: Liger's forwards in every RMSNorm and MLP and
    nowhere else (attention, the dynamic layers' gate and compressors keep theirs), weights untouched."""
    model = tiny_model("mixed", dtype=torch.float32)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    _apply_liger_kernel_to_instance(model=model)
    assert replaced_forwards(model) == expected_forwards("model.", model.config.num_hidden_layers)
    layer = model.model.layers[1]
    assert layer.self_attn.layer_type == "dynamic_attention"
    assert vars(layer.input_layernorm)["forward"].__func__ is LigerRMSNorm.forward
    assert vars(layer.mlp)["forward"].__func__ is LigerSwiGLUMLP.forward
    assert model.logits_and_loss.__func__ is fused_linear_cross_entropy_logits_and_loss
    assert modeling_fastgpt.apply_rotary_pos_emb is liger_rotary_pos_emb_on_copies
    assert model.state_dict().keys() == state.keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]) and tensor.dtype == state[name].dtype, name


def test_flags_leave_their_part_alone(restore_modeling_module):
    model = tiny_model("mixed", dtype=torch.float32)
    original_rotary = modeling_fastgpt.apply_rotary_pos_emb
    apply_liger_kernel_to_fastgpt(rope=False, rms_norm=False, fused_linear_cross_entropy=False, model=model)
    assert set(replaced_forwards(model).values()) == {"LigerSwiGLUMLP"}
    assert modeling_fastgpt.apply_rotary_pos_emb is original_rotary
    assert "logits_and_loss" not in vars(model)


def test_captioning_model_gets_the_kernels_in_its_language_model_only(restore_modeling_module):
    model = build_model(tiny_processor())
    _apply_liger_kernel_to_instance(model=model)
    num_layers = model.config.text_config.num_hidden_layers
    assert replaced_forwards(model) == expected_forwards("model.language_model.", num_layers)
    assert model.logits_and_loss.__func__ is fused_linear_cross_entropy_logits_and_loss


def test_without_a_model_the_classes_are_patched_and_checkpoints_still_load(restore_modeling_module):
    plain = tiny_model("mixed", dtype=torch.float32)
    apply_liger_kernel_to_fastgpt()
    model = tiny_model("mixed", dtype=torch.float32)
    assert isinstance(model.model.norm, LigerRMSNorm)
    assert all(isinstance(layer.mlp, LigerSwiGLUMLP) for layer in model.model.layers)
    assert FastGPTForCausalLM.logits_and_loss is fused_linear_cross_entropy_logits_and_loss
    assert FastGPTForConditionalGeneration.logits_and_loss is fused_linear_cross_entropy_logits_and_loss
    model.load_state_dict(plain.state_dict())  # strict: the same parameter names and shapes


def test_swiglu_on_another_activation_is_a_clear_error(restore_modeling_module):
    model = tiny_model("mixed", dtype=torch.float32, hidden_act="gelu")
    with pytest.raises(ValueError, match=r"hidden_act is 'gelu': pass swiglu=False"):
        apply_liger_kernel_to_fastgpt(model=model)


def test_fused_head_is_the_model_head_outside_training(restore_modeling_module):
    """Eval, generate and label-free calls keep the logits: no Liger kernel runs (so this holds on the CPU)."""
    model = tiny_model("mixed", dtype=torch.float32)
    apply_liger_kernel_to_fastgpt(rope=False, swiglu=False, rms_norm=False, model=model)
    hidden_states = torch.randn(2, 5, model.config.hidden_size)
    labels = torch.randint(0, model.config.vocab_size, (2, 5))
    for call_labels in (None, labels):
        logits, loss = model.logits_and_loss(hidden_states, call_labels, logits_to_keep=0)
        plain_logits, plain_loss = FastGPTLanguageModelingHead.logits_and_loss(model, hidden_states, call_labels)
        torch.testing.assert_close(logits, plain_logits)
        assert (loss is None) == (call_labels is None)
        if loss is not None:
            torch.testing.assert_close(loss, plain_loss)
    with pytest.raises(ValueError, match="skip_logits=True computes the loss alone: pass labels"):
        model.logits_and_loss(hidden_states, None, skip_logits=True)


def interpreted_run(comparison: str, tmp_path: Path) -> dict:
    output_file = tmp_path / f"{comparison}.pt"
    result = subprocess.run(
        [sys.executable, "-m", "tests.liger_runs", comparison, str(output_file)],
        cwd=REPOSITORY,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(output_file, weights_only=False)


def assert_same_training_and_logits(results: dict, reference_tolerance: float) -> None:
    plain, liger = results["plain"], results["liger"]
    assert liger["training_logits"] is None  # the fused loss never built them
    torch.testing.assert_close(liger["loss"], plain["loss"], rtol=1e-5, atol=1e-6)
    for name, gradient in liger["gradients"].items():
        torch.testing.assert_close(gradient, plain["gradients"][name], rtol=1e-4, atol=1e-6, msg=name)
    attention_mask = liger["attention_mask"]
    assert relative_error(liger["logits"], liger["reference"], attention_mask) < reference_tolerance
    torch.testing.assert_close(liger["logits"], plain["logits"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_interpreted_rotary_and_fused_cross_entropy_match_the_plain_model(tmp_path):
    """Liger's kernels under Triton's interpreter (rotary, fused linear cross-entropy) on a left-padded batch
    through sliding, dynamic and full layers: the plain model's loss, gradients and logits, the reference's logits."""
    results = interpreted_run("model", tmp_path)
    assert results["rotary_module"] == "fastgpt_hf.liger"
    assert_same_training_and_logits(results, reference_tolerance=1e-4)


@pytest.mark.slow
def test_interpreted_trainer_with_use_liger_kernel_follows_the_plain_losses(tmp_path):
    results = interpreted_run("trainer", tmp_path)
    plain, liger = results["plain"], results["liger"]
    assert liger["fused_head"] and not plain["fused_head"]
    assert len(liger["losses"]) == 3
    torch.testing.assert_close(liger["losses"], plain["losses"], rtol=1e-5, atol=1e-6)
    assert liger["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-5)


@pytest.mark.usefixtures("restore_modeling_module")
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; CI machines have none")
def test_cuda_all_kernels_match_the_plain_model_in_float32():
    """RMSNorm, SwiGLU, rotary and fused linear cross-entropy on the GPU, TF32 off."""
    torch.backends.cuda.matmul.allow_tf32 = False
    assert_same_training_and_logits(compare_models({}, "cuda", torch.float32), reference_tolerance=1e-4)


@pytest.mark.usefixtures("restore_modeling_module")
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; CI machines have none")
def test_cuda_bf16_logits_with_all_kernels_match_the_reference():
    results = compare_models({}, "cuda", torch.bfloat16)
    liger = results["liger"]
    assert liger["training_logits"] is None
    assert relative_error(liger["logits"], liger["reference"], liger["attention_mask"]) < 2e-2


@pytest.mark.usefixtures("restore_modeling_module")
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; CI machines have none")
def test_cuda_trainer_with_use_liger_kernel_follows_the_plain_losses():
    results = compare_trainers({}, "cuda")
    plain, liger = results["plain"], results["liger"]
    assert liger["fused_head"]
    torch.testing.assert_close(liger["losses"], plain["losses"], rtol=1e-4, atol=1e-5)
    assert liger["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-4)
