"""FastGPT for Hugging Face Transformers: importing this package registers it with the Auto classes."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_fastgpt import FastGPTConfig
from .modeling_fastgpt import FastGPTForCausalLM, FastGPTModel, FastGPTPreTrainedModel
from .multimodal import FastGPTForConditionalGeneration, FastGPTProcessor, FastGPTVLConfig, FastGPTVLModel

AutoConfig.register(FastGPTConfig.model_type, FastGPTConfig, exist_ok=True)
AutoModel.register(FastGPTConfig, FastGPTModel, exist_ok=True)
AutoModelForCausalLM.register(FastGPTConfig, FastGPTForCausalLM, exist_ok=True)
AutoConfig.register(FastGPTVLConfig.model_type, FastGPTVLConfig, exist_ok=True)
AutoModel.register(FastGPTVLConfig, FastGPTVLModel, exist_ok=True)
AutoModelForImageTextToText.register(FastGPTVLConfig, FastGPTForConditionalGeneration, exist_ok=True)
AutoProcessor.register(FastGPTVLConfig, FastGPTProcessor, exist_ok=True)

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
