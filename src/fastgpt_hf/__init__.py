"""FastGPT for Hugging Face Transformers: importing this package registers it with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_fastgpt import FastGPTConfig
from .modeling_fastgpt import FastGPTForCausalLM, FastGPTModel, FastGPTPreTrainedModel

AutoConfig.register(FastGPTConfig.model_type, FastGPTConfig, exist_ok=True)
AutoModel.register(FastGPTConfig, FastGPTModel, exist_ok=True)
AutoModelForCausalLM.register(FastGPTConfig, FastGPTForCausalLM, exist_ok=True)

__all__ = ["FastGPTConfig", "FastGPTForCausalLM", "FastGPTModel", "FastGPTPreTrainedModel"]
