"""`push_to_hub`, `fastgpt push` and `save_pretrained(push_to_hub=True)` end to end against a stand-in Hub on
127.0.0.1, then loading back from it.

huggingface_hub reads `HF_ENDPOINT` when it is imported, so the client runs in a subprocess whose environment
points it (and every cache) at the stand-in and at tmp_path; no request can reach the real Hub.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from fastgpt_hf.model_card import select_upload
from fastgpt_hf.quantization import dynamic_range_quantize, save_dynamic_range

from .conftest import left_padded_batch, tiny_model
from .hub_stand_in import HubStandIn

# Run in the subprocess: push one model three ways, load each repository back, save the logits.
PUSH_AND_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
from fastgpt_hf.model_card import push_main

checkpoint, inputs_file, outputs_file = sys.argv[1:]
inputs = torch.load(inputs_file)
AutoModelForCausalLM.from_pretrained(checkpoint).push_to_hub("someone/pushed", tags=["tiny"])
push_main([checkpoint, "someone/cli", "--private"])
AutoModelForCausalLM.from_pretrained(checkpoint).save_pretrained("saved", push_to_hub=True, repo_id="someone/saved")
logits = {}
for repo_id in ("someone/pushed", "someone/cli", "someone/saved"):
    model = AutoModelForCausalLM.from_pretrained(repo_id)
    with torch.no_grad():
        logits[repo_id] = model(inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
torch.save(logits, outputs_file)
"""

CHECKPOINT_FILES = {
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "modeling_fastgpt.py",
    "configuration_fastgpt.py",
    "presets.py",
    "cache_fastgpt.py",
    "cache_blocks.py",
    "cache_dynamic_layers.py",
    "cache_static_layers.py",
    "cache_quantization.py",
    "checkpoints.py",
    "input_checks.py",
    "attention_compressed.py",
    "attention_selective.py",
    "attention_eager.py",
    "attention_flex.py",
    "attention_masks.py",
    "attention_sdpa.py",
    "attention_quantized.py",
    "generation_fastgpt.py",
    "generation_fast_path.py",
}


def run_client(
    hub: HubStandIn, folder: Path, argv: list[str], token: str = "hf_stand_in_token", **environment: str
) -> subprocess.CompletedProcess:
    """Run `python *argv` in `folder` as a Hub client of the stand-in, with HF_TOKEN `token`."""
    env = {
        **{key: value for key, value in os.environ.items() if not key.startswith("HF_")},
        **hub.client_environment(folder),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_TOKEN": token,
        **environment,
    }
    return subprocess.run([sys.executable, *argv], cwd=folder, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_way_to_push_uploads_the_checkpoint_with_its_card_and_loads_back(tmp_path):
    model = tiny_model("mixed", dtype=torch.float32)
    model.save_pretrained(tmp_path / "checkpoint")
    input_ids, attention_mask = left_padded_batch(29)
    torch.save({"input_ids": input_ids, "attention_mask": attention_mask}, tmp_path / "inputs.pt")
    (tmp_path / "push_and_load.py").write_text(PUSH_AND_LOAD)
    with HubStandIn() as hub:
        run = run_client(hub, tmp_path, ["push_and_load.py", "checkpoint", "inputs.pt", "outputs.pt"])
        assert run.returncode == 0, f"{run.stderr[-4000:]}\nunanswered requests: {hub.unanswered}"
    for repo_id in ("someone/pushed", "someone/cli", "someone/saved"):
        assert set(hub.files[repo_id]) == CHECKPOINT_FILES
    pushed_card = ModelCard(hub.files["someone/pushed"]["README.md"].decode())
    assert pushed_card.data.model_name == "someone/pushed"
    assert "tiny" in pushed_card.data.tags
    # save_pretrained(push_to_hub=True) sends FastGPT's card too, the one it wrote beside the weights.
    saved_card = hub.files["someone/saved"]["README.md"]
    assert ModelCard(saved_card.decode()).data.model_name == "someone/saved"
    assert saved_card == (tmp_path / "saved" / "README.md").read_bytes()
    for name in ("README.md", "model.safetensors", "modeling_fastgpt.py"):  # `fastgpt push` sends the folder as is
        assert hub.files["someone/cli"][name] == (tmp_path / "checkpoint" / name).read_bytes()
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
    for repo_id, logits in torch.load(tmp_path / "outputs.pt").items():
        assert torch.equal(logits, expected), repo_id


# Run in the subprocess: a dry run, `fastgpt push` without and with --include, then save_pretrained(push_to_hub=True)
# into the same folder.
PUSH_SELECTED = """
import sys
from transformers import AutoModelForCausalLM
from fastgpt_hf.model_card import push_main

checkpoint = sys.argv[1]
push_main([checkpoint, "someone/dry", "--dry-run"])
push_main([checkpoint, "someone/default"])
push_main([checkpoint, "someone/notes", "--include", "notes.txt"])
AutoModelForCausalLM.from_pretrained(checkpoint).save_pretrained(checkpoint, push_to_hub=True, repo_id="someone/saved")
"""
# What a training run or its user leaves beside the weights; checkpoint-2/ holds a model.safetensors of its own.
STRAY_FILES = {
    ".env": b"HF_TOKEN=hf_do_not_publish\n",
    "notes.txt": b"lr sweep notes\n",
    "training_args.bin": b"pickled TrainingArguments",
    "checkpoint-2/optimizer.pt": b"pickled optimizer state",
    "checkpoint-2/model.safetensors": b"an intermediate checkpoint",
}


@pytest.mark.timeout(300)
def test_push_uploads_only_what_a_model_repository_needs(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    tiny_model("mixed", dtype=torch.float32).save_pretrained(checkpoint)
    (checkpoint / "README.md").unlink()  # the dry run announces the card that pushing writes
    for name, content in STRAY_FILES.items():
        (checkpoint / name).parent.mkdir(exist_ok=True)
        (checkpoint / name).write_bytes(content)
    (tmp_path / "push_selected.py").write_text(PUSH_SELECTED)
    with HubStandIn() as hub:
        run = run_client(hub, tmp_path, ["push_selected.py", "checkpoint"])
        assert run.returncode == 0, f"{run.stderr[-4000:]}\nunanswered requests: {hub.unanswered}"
    assert "someone/dry" not in hub.files
    assert set(hub.files["someone/default"]) == CHECKPOINT_FILES
    assert set(hub.files["someone/notes"]) == CHECKPOINT_FILES | {"notes.txt"}
    assert set(hub.files["someone/saved"]) == CHECKPOINT_FILES
    dry_run = run.stdout.split("\nuploading ")[0]
    assert f"would upload {len(CHECKPOINT_FILES) - 1} files to someone/dry:" in dry_run
    size = (checkpoint / "model.safetensors").stat().st_size
    assert f"{size:>15,}  model.safetensors" in dry_run
    assert "README.md (the model card, written before uploading)" in dry_run
    left_out = "left out 5 files that a model repository does not need: .env, checkpoint-2/ (2 files), notes.txt"
    assert f"{left_out}, training_args.bin (upload one with --include PATTERN)" in dry_run
    assert "left out 4 files that a model repository does not need: .env, checkpoint-2/ (2 files), training" in (
        run.stdout
    )
    assert f"{left_out}, training_args.bin" in run.stderr  # save_pretrained(push_to_hub=True) warns


# Run in the subprocess: `fastgpt push` with HF_TOKEN, then with a --token the Hub refuses.
PUSH_WITH_TOKENS = """
import sys
from fastgpt_hf.cli import main

for argv in (["checkpoint", "someone/accepted"], ["checkpoint", "someone/refused", "--token", sys.argv[1]]):
    try:
        main(["push", *argv])
    except SystemExit as exit_:
        print("exit status", exit_.code)
"""


@pytest.mark.timeout(300)
def test_push_never_prints_the_token(tmp_path):
    tiny_model("mixed", dtype=torch.float32).save_pretrained(tmp_path / "checkpoint")
    (tmp_path / "push_with_tokens.py").write_text(PUSH_WITH_TOKENS)
    accepted, refused = "hf_accepted_secret_0123456789", "hf_refused_secret_0123456789"
    with HubStandIn(accepted_token=accepted) as hub:
        # Debug logging on both libraries: what they log about requests must not carry the token either.
        verbose = {"HF_HUB_VERBOSITY": "debug", "TRANSFORMERS_VERBOSITY": "debug"}
        run = run_client(hub, tmp_path, ["push_with_tokens.py", refused], token=accepted, **verbose)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "pushed checkpoint to" in run.stdout and "someone/accepted" in hub.files
    assert "exit status 2" in run.stdout and "someone/refused" not in hub.files
    assert "fastgpt push: error: the Hub refused the upload to someone/refused" in run.stderr
    assert "HF_TOKEN" in run.stderr and "Traceback" not in run.stderr
    for token in (accepted, refused):
        assert token not in run.stdout + run.stderr


def test_dynamic_range_folder_uploads_its_int8_weights_and_description(tmp_path):
    save_dynamic_range(dynamic_range_quantize(tiny_model("mixed", dtype=torch.float32)), tmp_path)
    (tmp_path / "dynamic_range_int8.pt").write_bytes(b"the pickle an older version wrote")
    selection = select_upload(tmp_path)
    assert {"config.json", "dynamic_range_int8.json", "dynamic_range_int8.safetensors"} <= selection.uploaded.keys()
    assert selection.left_out == ["dynamic_range_int8.pt"]
