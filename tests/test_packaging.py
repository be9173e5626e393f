"""How the package installs and what importing it costs: pyproject.toml as setuptools reads it, optional imports."""

import subprocess
import sys
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"
# Runs in a fresh interpreter: torchao and bitsandbytes modules that importing the package adds to what Transformers'
# own `modeling_utils` imports (it imports torchao itself when installed), and whether bitsandbytes is imported.
IMPORT_FOOTPRINT = """
import sys

import transformers.modeling_utils


def optional_modules():
    return {name for name in sys.modules if name.split(".")[0] in ("torchao", "bitsandbytes")}


before = optional_modules()
import fastgpt_hf, fastgpt_hf.cli, fastgpt_hf.model_card, fastgpt_hf.quantization

print(sorted(optional_modules() - before), "bitsandbytes" in sys.modules)
"""


@pytest.mark.slow
def test_importing_the_package_imports_no_quantization_library():
    finished = subprocess.run([sys.executable, "-c", IMPORT_FOOTPRINT], capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == "[] False"


def test_pyproject_uses_the_spdx_license_and_the_console_entry_point():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    pyproject = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    # A TOML table or a License classifier makes setuptools >= 77 print a deprecation banner at every install.
    assert pyproject["project"]["license"] == "Apache-2.0"
    assert not [entry for entry in pyproject["project"].get("classifiers", []) if entry.startswith("License ::")]
    assert pyproject["build-system"]["requires"] == ["setuptools>=77"]
    assert pyproject["project"]["scripts"]["fastgpt"] == "fastgpt_console:main"
    assert "fastgpt_console" in pyproject["tool"]["setuptools"]["py-modules"]
