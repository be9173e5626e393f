"""`push_to_hub`, `fastgpt push` and `save_pretrained(push_to_hub=True)` end to end against a stand-in Hub on
127.0.0.1, then loading back from it.

huggingface_hub reads `HF_ENDPOINT` when it is imported, so the client runs in a subprocess whose environment
points it (and every cache) at the stand-in and at tmp_path; no request can reach the real Hub.
"""

import os
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard

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
    "strict_loading.py",
    "attention_compressed.py",
    "attention_eager.py",
    "attention_flex.py",
    "attention_masks.py",
    "attention_sdpa.py",
}


@pytest.mark.timeout(300)
def test_every_way_to_push_uploads_the_checkpoint_with_its_card_and_loads_back(tmp_path):
    model = tiny_model("mixed", dtype=torch.float32)
    model.save_pretrained(tmp_path / "checkpoint")
    input_ids, attention_mask = left_padded_batch(29)
    torch.save({"input_ids": input_ids, "attention_mask": attention_mask}, tmp_path / "inputs.pt")
    (tmp_path / "push_and_load.py").write_text(PUSH_AND_LOAD)
    with HubStandIn() as hub:
        env = {
            **{key: value for key, value in os.environ.items() if not key.startswith("HF_")},
            **hub.client_environment(tmp_path),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_TOKEN": "hf_stand_in_token",
        }
        command = [sys.executable, "push_and_load.py", "checkpoint", "inputs.pt", "outputs.pt"]
        run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
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
