"""The `fastgpt` console script's entry point (`fastgpt_console`): the dependencies' known log lines stay out."""

import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fastgpt_console import KNOWN_DEPENDENCY_LINES, KnownLineFilter, module_being_run, quiet_dependency_logs
from fastgpt_hf.data import load_tokenizer
from fastgpt_hf.quantization import dynamic_range_quantize, save_dynamic_range

from .conftest import tiny_model

# What each dependency logs, word for word (torchao 0.18, torch 2.13, bitsandbytes 0.50 on a CPU without CUDA).
DEPENDENCY_LINES = {
    "torchao": "Failed to load /venv/lib/python3.11/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: "
    "Could not load this library: /venv/lib/python3.11/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so",
    "torch.utils._pytree": "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by "
    "torch.compile as an opaque value type. Calling register_constant() on Enum subclasses is deprecated and will "
    "be an error in a future release.",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community: No module named "
    "'kernels'. Please make sure you already `pip install kernels` and the kernels >= 0.11.1",
}
# Anything else those loggers say still reaches the user.
OTHER_LINES = {
    "torchao": "Skipping import of cpp extensions due to incompatible torch version.",
    "torch.utils._pytree": "<class 'Point'> cannot be registered as a pytree",
    "bitsandbytes.backends.cpu.ops": "Failed to load the CPU library libbitsandbytes_cpu.so",
}
# Logged at every int8 matmul of a float32 model by bitsandbytes, and warned by torch when a quantized tensor is made.
REPEATED_LINE_LOGGER = "bitsandbytes.autograd._functions"
REPEATED_LINE = "MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization"
TORCH_QUANTIZED_DEPRECATION = (
    "torch.quantize_per_tensor, torch.quantize_per_channel and other quantized tensor creation functions that "
    "produce tensors with dtype torch.quint8, torch.qint8, and torch.qint32 are deprecated and will be removed in a "
    "future PyTorch release."
)
PROGRESS_BAR = re.compile(r"^[\w ]+: +\d+%\|")


def record(logger_name: str, message: str) -> logging.LogRecord:
    return logging.LogRecord(logger_name, logging.WARNING, __file__, 1, message, None, None)


@pytest.mark.parametrize("logger_name", sorted(DEPENDENCY_LINES))
def test_each_filter_drops_its_line_and_nothing_else(logger_name):
    patterns = [pattern for name, pattern in KNOWN_DEPENDENCY_LINES if name == logger_name]
    line_filters = [KnownLineFilter(pattern) for pattern in patterns]
    assert not all(
        line_filter.filter(record(logger_name, DEPENDENCY_LINES[logger_name])) for line_filter in line_filters
    )
    assert all(line_filter.filter(record(logger_name, OTHER_LINES[logger_name])) for line_filter in line_filters)


def test_quiet_dependency_logs_filters_those_loggers_only():
    names = (*DEPENDENCY_LINES, REPEATED_LINE_LOGGER, "transformers", "")
    loggers = {name: logging.getLogger(name) for name in names}
    before = {name: list(logger.filters) for name, logger in loggers.items()}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_dependency_logs()
            warnings.warn(TORCH_QUANTIZED_DEPRECATION, UserWarning, stacklevel=1)
            warnings.warn(TORCH_QUANTIZED_DEPRECATION, FutureWarning, stacklevel=1)
            warnings.warn("torch.quantize_per_channel is slow", UserWarning, stacklevel=1)
        for name, message in DEPENDENCY_LINES.items():
            assert not loggers[name].filter(record(name, message)), name
            assert loggers["transformers"].filter(record("transformers", message))
            assert loggers[""].filter(record("root", message))
        bnb = loggers[REPEATED_LINE_LOGGER]
        assert [bnb.filter(record(REPEATED_LINE_LOGGER, REPEATED_LINE)) for _ in range(3)] == [True, False, False]
        assert bnb.filter(record(REPEATED_LINE_LOGGER, REPEATED_LINE.replace("float32", "bfloat16")))
        assert [(warning.category, str(warning.message)[:30]) for warning in caught] == [
            (FutureWarning, TORCH_QUANTIZED_DEPRECATION[:30]),
            (UserWarning, "torch.quantize_per_channel is slow"[:30]),
        ]
    finally:
        for name, logger in loggers.items():
            logger.filters[:] = before[name]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A float checkpoint and its dynamic-range copy (the scheme whose loading makes torch warn), with tokenizers."""
    folders = {kind: tmp_path_factory.mktemp(kind) for kind in ("float", "dynamic-range")}
    tokenizer = load_tokenizer()
    model = tiny_model("mixed", dtype=torch.float32, vocab_size=len(tokenizer))
    model.save_pretrained(folders["float"])
    save_dynamic_range(dynamic_range_quantize(model), folders["dynamic-range"])
    for folder in folders.values():
        tokenizer.save_pretrained(folder)
    return folders


# What the installed `fastgpt` script runs (pip writes this wrapper around the [project.scripts] entry), and the
# module run the package offers without the script.
ENTRIES = {
    "fastgpt script": ["-c", "import sys; from fastgpt_console import main; sys.argv[0] = 'fastgpt'; sys.exit(main())"],
    "python -m fastgpt_hf.cli": ["-m", "fastgpt_hf.cli"],
}


@pytest.mark.parametrize(
    ("entry", "kind"),
    [("fastgpt script", "float"), ("python -m fastgpt_hf.cli", "float"), ("fastgpt script", "dynamic-range")],
)
@pytest.mark.slow
def test_fastgpt_generate_prints_the_text_and_progress_bars_only(checkpoints, entry, kind):
    command = [sys.executable, *ENTRIES[entry], "generate", str(checkpoints[kind]), "--prompt", " The game"]
    finished = subprocess.run([*command, "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.startswith(" The game")
    stderr_lines = [line.strip() for line in re.split(r"[\r\n]", finished.stderr) if line.strip()]
    assert [line for line in stderr_lines if not PROGRESS_BAR.match(line)] == []


@pytest.mark.slow
def test_import_fastgpt_hf_filters_nothing():
    # Imported by a program (here `python -c`), the package and its CLI module leave every logger as it was.
    loggers = sorted({name for name, _ in KNOWN_DEPENDENCY_LINES})
    script = (
        "import logging, fastgpt_hf, fastgpt_hf.cli; "
        f"print([name for name in {loggers!r} if logging.getLogger(name).filters])"
    )
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("argv", "orig_argv", "module"),
    [
        (["-m"], ["python", "-m", "fastgpt_hf.cli", "generate"], "fastgpt_hf.cli"),
        (["-m"], ["python", "-X", "importtime", "-mfastgpt_hf.cli"], "fastgpt_hf.cli"),
        (["-m"], ["python", "-m", "pytest", "fastgpt_hf.cli"], "pytest"),
        (["/venv/lib/fastgpt_hf/cli.py", "generate"], ["python", "-m", "fastgpt_hf.cli", "generate"], None),
        (["-c"], ["python", "-c", "import fastgpt_hf"], None),
    ],
)
def test_module_being_run_is_the_module_of_python_m_while_python_locates_it(monkeypatch, argv, orig_argv, module):
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    assert module_being_run() == module
