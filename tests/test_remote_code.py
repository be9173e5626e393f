"""A saved checkpoint carries its code: it loads and generates in a fresh virtualenv that lacks fastgpt_hf,
from its folder and from a (stand-in) Hub repository."""

import json
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers.dynamic_module_utils import get_imports, get_relative_import_files

import fastgpt_hf

from .conftest import left_padded_batch, tiny_model
from .hub_stand_in import HubStandIn
from .test_multimodal import PROMPT, build_model, pictures, tiny_processor

# Run by the fresh venv's interpreter: load through auto_map from a folder and from a Hub repository, report.
LOAD_WITHOUT_PACKAGE = """
import importlib.util, sys, torch
from transformers import AutoModelForCausalLM

folder, repo_id, inputs_file, outputs_file = sys.argv[1:]
inputs = torch.load(inputs_file)
outputs = {"package_importable": importlib.util.find_spec("fastgpt_hf") is not None}
for source in (folder, repo_id):
    model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True)
    with torch.no_grad():
        logits = model(inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    generated = model.generate(
        inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=8, do_sample=False
    )
    outputs[source] = {"model_module": type(model).__module__, "logits": logits, "generated": generated}
model.save_pretrained("resaved")  # the copied code saves too, without the package's card generator
torch.save(outputs, outputs_file)
"""


# The captioning model and its processor, through AutoProcessor and AutoModelForImageTextToText.
LOAD_CAPTIONER_WITHOUT_PACKAGE = """
import importlib.util, sys, torch
from PIL import Image
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

folder, prompt, outputs_file, *picture_files = sys.argv[1:]
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
images = [Image.open(name) for name in picture_files]
inputs = processor(images=images, text=[prompt, prompt + " a"], padding=True, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
base_model = AutoModel.from_pretrained(folder, trust_remote_code=True)
model.save_pretrained("resaved")  # the copied code saves too, without the package's card generator
torch.save({
    "package_importable": importlib.util.find_spec("fastgpt_hf") is not None,
    "modules": [type(model).__module__, type(processor).__module__, type(base_model).__module__],
    "base_model_class": type(base_model).__name__,
    "input_ids": inputs["input_ids"],
    "logits": logits,
    "generated": generated,
}, outputs_file)
"""


def venv_without_package(folder: Path) -> Path:
    """A venv (no pip) that sees this interpreter's site-packages through a plain path in a .pth file.

    A plain path line only adds the directory: the .pth files inside it (the editable install of fastgpt_hf) do
    not run, so transformers and torch import and fastgpt_hf does not.
    """
    venv.EnvBuilder(with_pip=False).create(folder)
    python_dir = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site_packages = folder / "lib" / python_dir / "site-packages"
    (site_packages / "test_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return folder / "bin" / "python"


# Per saved model class: the module copied for it and the auto_map its checkpoint gets (every class it holds).
COPIED_CODE = {
    "causal_lm": (
        "modeling_fastgpt",
        {
            "AutoConfig": "configuration_fastgpt.FastGPTConfig",
            "AutoModel": "modeling_fastgpt.FastGPTModel",
            "AutoModelForCausalLM": "modeling_fastgpt.FastGPTForCausalLM",
        },
    ),
    "captioner": (
        "modeling_fastgpt_vl",
        {
            "AutoConfig": "configuration_fastgpt_vl.FastGPTVLConfig",
            "AutoModel": "modeling_fastgpt_vl.FastGPTVLModel",
            "AutoModelForImageTextToText": "modeling_fastgpt_vl.FastGPTForConditionalGeneration",
        },
    ),
}


@pytest.mark.parametrize("kind", COPIED_CODE)
def test_copied_code_is_a_closed_set_of_relative_imports(tmp_path, kind):
    model = tiny_model("mixed", dtype=torch.float32) if kind == "causal_lm" else build_model(tiny_processor())
    model.save_pretrained(tmp_path)
    module, expected_auto_map = COPIED_CODE[kind]
    copied = sorted(path.name for path in tmp_path.glob("*.py"))
    needed = {Path(name).name for name in get_relative_import_files(tmp_path / f"{module}.py")}
    assert set(copied) == needed | {f"{module}.py"}
    assert {"checkpoints.py", "input_checks.py", "modeling_fastgpt.py"} <= set(copied)
    assert "model_card.py" not in copied  # the card generator stays in the package
    for name in copied:
        assert "fastgpt_hf" not in get_imports(tmp_path / name), f"{name} imports fastgpt_hf absolutely"
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == expected_auto_map


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_checkpoint_loads_and_generates_in_a_fresh_venv_without_the_package(tmp_path):
    if Path(fastgpt_hf.__file__).is_relative_to(sysconfig.get_paths()["purelib"]):
        pytest.skip("fastgpt_hf is installed non-editable into site-packages, so no venv sharing them can lack it")
    model = tiny_model("mixed", dtype=torch.float32)
    model.save_pretrained(tmp_path / "checkpoint")
    input_ids, attention_mask = left_padded_batch(37)
    torch.save({"input_ids": input_ids, "attention_mask": attention_mask}, tmp_path / "inputs.pt")
    (tmp_path / "load.py").write_text(LOAD_WITHOUT_PACKAGE)
    python = venv_without_package(tmp_path / "venv")
    with HubStandIn() as hub:
        hub.publish("someone/fastgpt-tiny", tmp_path / "checkpoint")
        env = {**hub.client_environment(tmp_path), "PATH": "/usr/bin:/bin"}
        command = [str(python), "-I", "load.py", "checkpoint", "someone/fastgpt-tiny", "inputs.pt", "outputs.pt"]
        run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-4000:]
    outputs = torch.load(tmp_path / "outputs.pt")
    assert not outputs["package_importable"]
    with torch.no_grad():
        expected_logits = model(input_ids, attention_mask=attention_mask).logits
    expected_tokens = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False)
    for source in ("checkpoint", "someone/fastgpt-tiny"):
        assert outputs[source]["model_module"].startswith("transformers_modules.")
        # The same code on the same weights and inputs: bit for bit.
        assert torch.equal(outputs[source]["logits"], expected_logits), source
        assert torch.equal(outputs[source]["generated"], expected_tokens), source
    resaved = {path.name for path in (tmp_path / "resaved").iterdir()}
    assert {"config.json", "model.safetensors", "modeling_fastgpt.py", "checkpoints.py", "input_checks.py"} <= resaved
    assert "README.md" not in resaved


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_captioner_and_its_processor_load_in_a_fresh_venv_without_the_package(tmp_path):
    if Path(fastgpt_hf.__file__).is_relative_to(sysconfig.get_paths()["purelib"]):
        pytest.skip("fastgpt_hf is installed non-editable into site-packages, so no venv sharing them can lack it")
    processor, model = tiny_processor(), build_model(tiny_processor())
    model.save_pretrained(tmp_path / "captioner")
    processor.save_pretrained(tmp_path / "captioner")
    picture_files = []
    for index, picture in enumerate(pictures(2)):
        picture.save(tmp_path / f"picture{index}.png")
        picture_files.append(f"picture{index}.png")
    (tmp_path / "load.py").write_text(LOAD_CAPTIONER_WITHOUT_PACKAGE)
    python = venv_without_package(tmp_path / "venv")
    env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    command = [str(python), "-I", "load.py", "captioner", PROMPT, "outputs.pt", *picture_files]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-4000:]
    outputs = torch.load(tmp_path / "outputs.pt")
    assert not outputs["package_importable"]
    assert all(module.startswith("transformers_modules.") for module in outputs["modules"])
    assert outputs["base_model_class"] == "FastGPTVLModel"
    resaved = {path.name for path in (tmp_path / "resaved").iterdir()}
    assert {"config.json", "model.safetensors", "modeling_fastgpt_vl.py", "checkpoints.py"} <= resaved
    assert "README.md" not in resaved
    images = [Image.open(tmp_path / name) for name in picture_files]
    inputs = processor(images=images, text=[PROMPT, PROMPT + " a"], padding=True, return_tensors="pt")
    assert torch.equal(outputs["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        assert torch.equal(outputs["logits"], model(**inputs).logits)
    assert torch.equal(outputs["generated"], model.generate(**inputs, max_new_tokens=4, do_sample=False))
