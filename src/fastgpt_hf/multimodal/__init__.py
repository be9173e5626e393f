"""FastGPT with a vision encoder: configuration, model and processor for image-text-to-text."""

from .configuration_fastgpt_vl import FastGPTVLConfig
from .modeling_fastgpt_vl import (
    FastGPTForConditionalGeneration,
    FastGPTVLModel,
    FastGPTVLPreTrainedModel,
    FastGPTVLProjector,
)
from .processing_fastgpt_vl import FastGPTProcessor

__all__ = [
    "FastGPTForConditionalGeneration",
    "FastGPTProcessor",
    "FastGPTVLConfig",
    "FastGPTVLModel",
    "FastGPTVLPreTrainedModel",
    "FastGPTVLProjector",
]
