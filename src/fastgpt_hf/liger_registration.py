"""FastGPT in Liger's table of models without importing Liger: `fastgpt_hf.liger` is imported when Liger is.

Liger's table, `liger_kernel.transformers.monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN`, is a module that Liger (and
Trainer with `use_liger_kernel=True`) imports on first use; importing it, with Triton and Liger's kernels, takes
about 1.2 s, which `import fastgpt_hf` does not pay. `register_with_liger` adds an import hook instead: once Python
has run that module, it imports `fastgpt_hf.liger`, which adds FastGPT's entries.
"""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
from types import ModuleType

LIGER_TABLE_MODULE = "liger_kernel.transformers.monkey_patch"
FASTGPT_LIGER_MODULE = "fastgpt_hf.liger"

logger = logging.getLogger(__name__)


class ImportFastGPTAfterRunning(importlib.abc.Loader):
    """Runs Liger's table module with its own loader, then imports `fastgpt_hf.liger`."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        try:
            importlib.import_module(FASTGPT_LIGER_MODULE)
        except ImportError as error:  # Liger must keep working for other models
            logger.warning(
                f"FastGPT is not registered with Liger: fastgpt_hf.liger could not import ({error}). "
                'Install the versions it is tested with: pip install "fastgpt_hf[liger]".'
            )

    def __getattr__(self, name: str):
        return getattr(self.loader, name)  # get_source, get_filename, ... for tracebacks and inspect


class LigerImportHook(importlib.abc.MetaPathFinder):
    """Finds Liger's table module once, through the other finders, and gives it `ImportFastGPTAfterRunning`."""

    def find_spec(self, fullname: str, path, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname != LIGER_TABLE_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None:
            spec.loader = ImportFastGPTAfterRunning(spec.loader)
        return spec


def register_with_liger() -> None:
    """FastGPT in Liger's table: now if Liger has loaded it, else when it does; without Liger, nothing."""
    if LIGER_TABLE_MODULE in sys.modules:
        importlib.import_module(FASTGPT_LIGER_MODULE)
    elif importlib.util.find_spec("liger_kernel") is not None:
        if not any(isinstance(finder, LigerImportHook) for finder in sys.meta_path):
            sys.meta_path.insert(0, LigerImportHook())
