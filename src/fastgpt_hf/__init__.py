"""FastGPT for Hugging Face Transformers: importing this package registers it with the Auto classes (and, where
Liger-Kernel is installed, with Liger: `fastgpt_hf.liger_registration`).

It also marks the classes for `register_for_auto_class`, so that `save_pretrained` writes `auto_map` into
config.json and copies the modeling code (a flat set of files with relative imports) beside the weights:
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` then works without this package.

Importing it filters no log line or warning; only `python -m fastgpt_hf.cli`, like the `fastgpt` script, drops the
dependencies' known import-time lines (`fastgpt_console`).
"""

import sys

if sys.argv[:1] == ["-m"]:  # Python imports this package to run one of its modules: quiet `python -m fastgpt_hf.cli`
    import fastgpt_console

    if fastgpt_console.module_being_run() == "fastgpt_hf.cli":
        fastgpt_console.quiet_dependency_logs()

from transformers import (  # noqa: E402  (after the command line's filters, before Transformers imports torchao)
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_fastgpt import FASTGPT_HF_VERSION, FastGPTConfig
from .configuration_fastgpt_vl import FastGPTVLConfig
from .liger_registration import register_with_liger
from .modeling_fastgpt import FastGPTForCausalLM, FastGPTModel, FastGPTPreTrainedModel
from .modeling_fastgpt_vl import FastGPTForConditionalGeneration, FastGPTVLModel
from .processing_fastgpt_vl import FastGPTProcessor

AutoConfig.register(FastGPTConfig.model_type, FastGPTConfig, exist_ok=True)
AutoModel.register(FastGPTConfig, FastGPTModel, exist_ok=True)
AutoModelForCausalLM.register(FastGPTConfig, FastGPTForCausalLM, exist_ok=True)
FastGPTConfig.register_for_auto_class("AutoConfig")
FastGPTModel.register_for_auto_class("AutoModel")
FastGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
AutoConfig.register(FastGPTVLConfig.model_type, FastGPTVLConfig, exist_ok=True)
AutoModel.register(FastGPTVLConfig, FastGPTVLModel, exist_ok=True)
AutoModelForImageTextToText.register(FastGPTVLConfig, FastGPTForConditionalGeneration, exist_ok=True)
AutoProcessor.register(FastGPTVLConfig, FastGPTProcessor, exist_ok=True)
FastGPTVLConfig.register_for_auto_class("AutoConfig")
FastGPTVLModel.register_for_auto_class("AutoModel")
FastGPTForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
FastGPTProcessor.register_for_auto_class("AutoProcessor")
register_with_liger()

__version__ = FASTGPT_HF_VERSION

__all__ = [
    "FastGPTConfig",
    "FastGPTForCausalLM",
    "FastGPTForConditionalGeneration",
    "FastGPTModel",
    "FastGPTPreTrainedModel",
    "FastGPTProcessor",
    "FastGPTVLConfig",
    "FastGPTVLModel",
]
