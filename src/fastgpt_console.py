"""Entry point of the `fastgpt` console script, and the dependencies' log lines that it (and the demo) hides.

It lives outside the `fastgpt_hf` package on purpose. Importing anything in the package first runs
`fastgpt_hf/__init__.py`, which imports Transformers' `modeling_utils`; that imports torchao when it is installed
(`quantizers/quantizer_torchao.py`), and torchao logs its failed extension loads, and torch its pytree
deprecations, while torchao is being imported. A filter must sit on those loggers before that import, so the
console script starts here. `python -m fastgpt_hf.cli` runs the package's `__init__` first: it asks
`module_being_run` and installs the same filters, then. `import fastgpt_hf` installs no filter: library users keep
every message.

Each filter drops one known line, matched by its logger and message, that a user of the command can do nothing
about (a line logged at every call is kept once); every other record of those loggers, and every other logger,
passes. One warning filter, matched by category and message, drops torch's deprecation of the quantized tensors
that the `dynamic-range` scheme is built on.
"""

import logging
import re
import sys
import warnings

# (logger name, regular expression searched in the formatted message), one entry per known line.
KNOWN_DEPENDENCY_LINES = (
    # torchao's wheel ships extensions built for CUDA and for another CPython; it tries them all and logs each miss.
    ("torchao", r"^Failed to load \S*torchao/_C\w*\.\S*\.so: "),
    # torchao registers enums as pytree constants, which torch now deprecates, once per enum at import.
    ("torch.utils._pytree", r"is an Enum subclass and is now natively supported by torch\.compile"),
    # bitsandbytes on CPUs with AVX512-BF16 looks for an optional 4-bit kernel (the `kernels` package) at import.
    ("bitsandbytes.backends.cpu.ops", r"^Failed to load CPU gemm_4bit_forward from kernels-community"),
)
# (logger name, regular expression), one entry per line that a dependency logs at every call: the first one stays.
REPEATED_DEPENDENCY_LINES = (
    # bitsandbytes' int8 matmul of a float32 model (`bnb-int8` on the CPU) says so for every layer at every step.
    ("bitsandbytes.autograd._functions", r"^MatMul8bitLt: inputs will be cast from torch\.float32 to float16 "),
)
# (category, regular expression matched at the start of the message), one entry per known warning.
KNOWN_DEPENDENCY_WARNINGS = (
    # torch deprecates its quantized tensors, which the `dynamic-range` scheme (torch.ao's quantize_dynamic) makes.
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor creation "),
)


class KnownLineFilter(logging.Filter):
    """A logging filter that drops the records whose formatted message matches `pattern` (all but the first one
    with `keep_first`)."""

    def __init__(self, pattern: str, keep_first: bool = False) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)
        self.keep_first = keep_first

    def filter(self, record: logging.LogRecord) -> bool:
        if self.pattern.search(record.getMessage()) is None:
            return True
        keep, self.keep_first = self.keep_first, False
        return keep


def quiet_dependency_logs() -> None:
    """Drop `KNOWN_DEPENDENCY_LINES`, the repeats of `REPEATED_DEPENDENCY_LINES` and `KNOWN_DEPENDENCY_WARNINGS`
    from now on; call it before torch, Transformers or torchao is imported."""
    for logger_name, pattern in KNOWN_DEPENDENCY_LINES:
        logging.getLogger(logger_name).addFilter(KnownLineFilter(pattern))
    for logger_name, pattern in REPEATED_DEPENDENCY_LINES:
        logging.getLogger(logger_name).addFilter(KnownLineFilter(pattern, keep_first=True))
    for category, message in KNOWN_DEPENDENCY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def module_being_run() -> str | None:
    """The MODULE of `python -m MODULE` while Python imports the packages above it, before running it; else None.

    Python sets `sys.argv[0]` to "-m" while it locates the module (`sys.orig_argv` keeps the command line), so
    `fastgpt_hf/__init__.py` can tell `python -m fastgpt_hf.cli` from `import fastgpt_hf`.
    """
    if sys.argv[:1] != ["-m"]:
        return None
    for position, argument in enumerate(sys.orig_argv[1:], start=1):
        if argument == "-m":
            return sys.orig_argv[position + 1] if position + 1 < len(sys.orig_argv) else None
        if argument.startswith("-m"):
            return argument[2:]
    return None


def main() -> None:
    """`fastgpt COMMAND [options]`: `fastgpt_hf.cli.main` without the dependencies' known log lines."""
    quiet_dependency_logs()
    from fastgpt_hf.cli import main as fastgpt_main

    fastgpt_main()


if __name__ == "__main__":
    main()
