"""Entry point of the `fastgpt` console script, and the dependencies' log lines that it (and the demo) hides.

It lives outside the `fastgpt_hf` package on purpose. Importing anything in the package first runs
`fastgpt_hf/__init__.py`, which imports Transformers' `modeling_utils`; that imports torchao when it is installed
(`quantizers/quantizer_torchao.py`), and torchao logs its failed extension loads, and torch its pytree
deprecations, while torchao is being imported. A filter must sit on those loggers before that import, so the
console script starts here. `python -m fastgpt_hf.cli` runs the package's `__init__` first: it asks
`module_being_run` and installs the same filters, then. `import fastgpt_hf` installs no filter: library users keep
every message.

Each filter drops one known line, matched by its logger and message, that a user of the command can do nothing
about; every other record of those loggers, and every other logger, passes.
"""

import logging
import re
import sys

# (logger name, regular expression searched in the formatted message), one entry per known line.
KNOWN_DEPENDENCY_LINES = (
    # torchao's wheel ships extensions built for CUDA and for another CPython; it tries them all and logs each miss.
    ("torchao", r"^Failed to load \S*torchao/_C\w*\.\S*\.so: "),
    # torchao registers enums as pytree constants, which torch now deprecates, once per enum at import.
    ("torch.utils._pytree", r"is an Enum subclass and is now natively supported by torch\.compile"),
    # bitsandbytes on CPUs with AVX512-BF16 looks for an optional 4-bit kernel (the `kernels` package) at import.
    ("bitsandbytes.backends.cpu.ops", r"^Failed to load CPU gemm_4bit_forward from kernels-community"),
)


class KnownLineFilter(logging.Filter):
    """A logging filter that drops the records whose formatted message matches `pattern`."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.search(record.getMessage()) is None


def quiet_dependency_logs() -> None:
    """Drop `KNOWN_DEPENDENCY_LINES` from now on; call it before torch, Transformers or torchao is imported."""
    for logger_name, pattern in KNOWN_DEPENDENCY_LINES:
        logging.getLogger(logger_name).addFilter(KnownLineFilter(pattern))


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
