"""Data, fully sharded, tensor and pipeline parallelism on 2 CPU processes (gloo) against one unsplit process.

Each test launches `torchrun --nproc_per_node 2` on an example script (or the FSDP2 worker beside this file) with a
hard timeout, so a hung collective fails the test instead of stalling CI. Models are the float64 `tiny_model`
mixed stack (sliding, dynamic, full, dynamic), so sharded and unsharded results agree to rounding.

Tolerances: float64 logits and gradients within 1e-10; losses within 1e-6, because Transformers' causal LM
loss computes in float32 whatever the model's dtype; Trainer (float32 training) losses within 1e-5 relative.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers.integrations.tensor_parallel import replace_layer_number_by_wildcard

from fastgpt_hf import FastGPTForCausalLM

from .conftest import tiny_model

REPOSITORY = Path(__file__).resolve().parent.parent
LAUNCH_TIMEOUT_S = 150

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with the gloo backend"
)


def start(script: Path, *args: str, processes: int = 2) -> subprocess.Popen:
    """Start `script` on `processes` CPU processes (torchrun when more than one), in a session of its own."""
    command = [sys.executable, str(script), *args]
    if processes > 1:
        # --standalone: a free port of its own, so concurrent launches on one machine do not collide.
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        command = [*torchrun, *command[1:]]
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    environment["PYTHONPATH"] = os.pathsep.join([str(REPOSITORY / "src"), environment.get("PYTHONPATH", "")])
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment, start_new_session=True
    )


def finish(process: subprocess.Popen) -> None:
    """Wait for a started launch; on failure or after LAUNCH_TIMEOUT_S, kill its process group and fail."""
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{process.args} did not finish in {LAUNCH_TIMEOUT_S} s:\n{output[-8000:]}")
    assert process.returncode == 0, f"{process.args} failed:\n{output[-8000:]}"


def finish_all(processes: list[subprocess.Popen]) -> None:
    """`finish` each launch; if one fails, kill the others' process groups before failing."""
    try:
        for process in processes:
            finish(process)
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()


def launch(script: Path, *args: str) -> None:
    """Run `script` on 2 CPU processes under torchrun; fail with its output if it fails or hangs."""
    finish(start(script, *args))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The float64 mixed-stack tiny model (tied embeddings, 2 key/value heads), saved."""
    folder = tmp_path_factory.mktemp("tiny-fastgpt")
    tiny_model("mixed").save_pretrained(folder)
    return folder


def reference_step(model_dir: Path, input_ids: torch.Tensor) -> tuple[torch.Tensor, float, dict[str, torch.Tensor]]:
    """Logits (eval), loss and gradients (train) of the unsplit model on one process."""
    model = FastGPTForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids, use_cache=False).logits
    model.train()
    loss = model(input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()
    return logits, loss.item(), {name: param.grad for name, param in model.named_parameters()}


def assert_gradients_match(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert set(grads) >= set(reference)
    for name, reference_grad in reference.items():
        torch.testing.assert_close(grads[name], reference_grad, rtol=0, atol=1e-10, msg=name)


def test_tensor_parallel_plan_names_every_parameter_but_the_norms():
    """A parameter without a rule stays whole and unsynchronised on every rank; only the norms may (their input
    and gradients are already whole). Catches a new parameter added without a plan entry."""
    model = tiny_model("mixed")
    plan = model.tp_plan
    without_rule = set()
    for name, _ in model.named_parameters():
        generic_name = replace_layer_number_by_wildcard(name)
        if generic_name not in plan and generic_name.rsplit(".", 1)[0] not in plan:
            without_rule.add(generic_name)
    assert without_rule == {
        "model.layers.*.input_layernorm.weight",
        "model.layers.*.post_attention_layernorm.weight",
        "model.norm.weight",
    }


@pytest.mark.slow
def test_data_parallel_trainer_loss_equals_single_process(tmp_path):
    """examples/train_distributed.py under torchrun (DDP, 2 x 4 rows) logs the losses of one process (8 rows)."""
    script = REPOSITORY / "examples" / "train_distributed.py"
    common = ["--preset", "tiny", "--steps", "3", "--global-batch-size", "8", "--device", "cpu"]
    # Both launches at once: the suite's time is mostly the processes' imports.
    runs = [
        start(
            script,
            *common,
            "--output-dir",
            str(tmp_path / f"run{n}"),
            "--loss-file",
            str(tmp_path / f"losses{n}.json"),
            processes=n,
        )
        for n in (1, 2)
    ]
    finish_all(runs)
    single, data_parallel = (json.loads((tmp_path / f"losses{n}.json").read_text()) for n in (1, 2))
    assert (single["world_size"], data_parallel["world_size"]) == (1, 2)
    assert len(single["losses"]) == 3
    torch.testing.assert_close(data_parallel["losses"], single["losses"], rtol=1e-5, atol=0)


@pytest.mark.slow
def test_fsdp2_step_equals_single_process(model_dir, tmp_path):
    """FSDP2 through `DistributedConfig(fsdp_size=2)`: each rank takes half the rows; loss and gradients match."""
    output = tmp_path / "fsdp2.pt"
    launch(Path(__file__).with_name("fsdp2_worker.py"), str(model_dir), str(output))
    saved = torch.load(output)
    _, loss, grads = reference_step(model_dir, saved["input_ids"])
    assert saved["loss"] == pytest.approx(loss, abs=1e-6)
    assert_gradients_match(saved["grads"], grads)


@pytest.mark.slow
def test_tensor_parallel_matches_unsharded(model_dir, tmp_path):
    """`DistributedConfig(tp_plan="auto")` on 2 ranks, every projection, memory slot and gate split by head:
    logits, greedy generation (a cache of each rank's heads), loss and gradients match the unsharded model."""
    output = tmp_path / "tensor_parallel.pt"
    launch(
        REPOSITORY / "examples" / "tensor_parallel.py",
        "--model-dir",
        str(model_dir),
        "--dtype",
        "float64",
        "--save",
        str(output),
    )
    saved = torch.load(output)
    logits, loss, grads = reference_step(model_dir, saved["input_ids"])
    torch.testing.assert_close(saved["logits"], logits, rtol=0, atol=1e-10)
    prompt = saved["input_ids"][:, :5]
    new_tokens = saved["generated"].shape[1] - prompt.shape[1]
    generated = FastGPTForCausalLM.from_pretrained(model_dir).generate(
        prompt, max_new_tokens=new_tokens, do_sample=False
    )
    torch.testing.assert_close(saved["generated"], generated, rtol=0, atol=0)
    assert saved["loss"] == pytest.approx(loss, abs=1e-6)
    assert_gradients_match(saved["grads"], grads)


@pytest.mark.slow
def test_pipeline_parallel_step_matches_unsplit(model_dir, tmp_path):
    """Two stages under GPipe, 2 microbatches: the last stage's loss and both stages' gradients match."""
    prefix = tmp_path / "pipeline"
    launch(
        REPOSITORY / "examples" / "pipeline_parallel.py",
        "--model-dir",
        str(model_dir),
        "--dtype",
        "float64",
        "--steps",
        "1",
        "--save-first-step",
        str(prefix),
    )
    first, last = (torch.load(f"{prefix}.rank{rank}.pt") for rank in (0, 1))
    _, loss, grads = reference_step(model_dir, first["input_ids"])
    assert first["loss"] is None
    assert last["loss"] == pytest.approx(loss, abs=1e-6)
    stage_grads = {**first["grads"], **last["grads"]}
    assert_gradients_match(stage_grads, grads)
    # The tied embedding's gradient is the sum of both stages' contributions, held by both.
    torch.testing.assert_close(first["grads"]["model.embed_tokens.weight"], last["grads"]["model.embed_tokens.weight"])
