"""What the hardware allows, for every subcommand: the measured copy bandwidth and matmul rate of the device, the
datasheet peaks of the GPUs the figures come from, and the floors they give.

- Prefill floor: FLOPs over the measured matmul rate (dense projections and MLP, plus attention over the score
  entries FastGPT computes; no output head, `logits_to_keep=1`). Training step: three times that, output head
  included, every row.
- Decode floor: bytes one step must read over the measured copy bandwidth: every weight (an untied input embedding
  only by the row) and the whole cache of the context.
- Cache bytes: FastGPT's read off real cache buffers (a `FastGPTStaticCache` allocated on the meta device: shapes
  and dtypes, no memory; at a full context it holds what the dynamic cache holds), Llama's `DynamicCache` computed:
  2 (keys, values) x layers x kv heads x head dim x context x element bytes.
"""

import torch
from timing import median_ms

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM
from fastgpt_hf.cache_fastgpt import FastGPTStaticCache
from fastgpt_hf.quantization import weight_bytes

# Dense bf16 tensor-core TFLOP/s and memory GB/s from NVIDIA's datasheets (SXM parts), by a word of the device name.
DATASHEET_PEAKS = {
    "H100": {"bf16_tflops": 989.0, "memory_gbs": 3350.0},
    "H200": {"bf16_tflops": 989.0, "memory_gbs": 4800.0},
}
# Elements copied to measure bandwidth, and the side of the square matmul that measures the rate, per device type.
COPY_ELEMENTS = {"cuda": 2**29, "cpu": 2**25}
MATMUL_SIDE = {"cuda": 8192, "cpu": 1024}


def datasheet_peaks(device_name: str) -> dict[str, float] | None:
    """The datasheet peaks of a device named `device_name` (e.g. "NVIDIA H100 80GB HBM3"), or None if not listed."""
    return next((peaks for word, peaks in DATASHEET_PEAKS.items() if word in device_name), None)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"


def copy_bandwidth_gbs(device: torch.device | str) -> float:
    """Device-to-device copy of a float32 tensor (2 GiB on a GPU, 128 MiB on a CPU), bytes read plus written, GB/s."""
    source = torch.randn(COPY_ELEMENTS[torch.device(device).type], device=device)
    target = torch.empty_like(source)
    return 2 * source.numel() * source.element_size() / median_ms(lambda: target.copy_(source), device) / 1e6


def matmul_tflops(device: torch.device | str, dtype: torch.dtype) -> float:
    """Measured rate of a square matrix product in `dtype` (8192 on a GPU, 1024 on a CPU), TFLOP/s."""
    side = MATMUL_SIDE[torch.device(device).type]
    a, b = (torch.randn(side, side, device=device, dtype=dtype) for _ in range(2))
    return 2 * side**3 / median_ms(lambda: a @ b, device) / 1e9


def device_header(device: torch.device | str, dtype: torch.dtype) -> tuple[str, float, float]:
    """A line naming the device, torch and the measured (and datasheet) rates; the copy GB/s and matmul TFLOP/s."""
    name, bandwidth, rate = device_name(device), copy_bandwidth_gbs(device), matmul_tflops(device, dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    line = (
        f"device: {name}, torch {torch.__version__}; copy {bandwidth:.0f} GB/s, {dtype_name} matmul {rate:.1f} TFLOP/s"
    )
    peaks = datasheet_peaks(name)
    if peaks is not None:
        line += f" (datasheet {peaks['memory_gbs']:.0f} GB/s, bf16 {peaks['bf16_tflops']:.0f} TFLOP/s)"
    return line, bandwidth, rate


def prefill_flops(model: FastGPTForCausalLM, length: int) -> float:
    """Dense projection and MLP FLOPs plus attention FLOPs over computed score entries (no lm_head), one row."""
    config = model.config
    dense_parameters = sum(p.numel() for n, p in model.model.layers.named_parameters() if p.dim() == 2)
    attention_entries = sum((1 - sparsity) * length**2 for sparsity in model.attention_sparsity(length))
    return 2 * dense_parameters * length + 4 * config.num_attention_heads * config.head_dim * attention_entries


def training_flops(model: FastGPTForCausalLM, batch: int, length: int, recompute_layers: bool = False) -> float:
    """Forward and backward: three times the prefill's FLOPs plus the output head's, every row; with
    `recompute_layers` (gradient checkpointing) the decoder layers' forward once more."""
    head = 2 * model.config.vocab_size * model.config.hidden_size * length
    return batch * ((3 + recompute_layers) * prefill_flops(model, length) + 3 * head)


def compute_floor_ms(flops: float, tflops: float) -> float:
    return flops / (tflops * 1e12) * 1e3


def bytes_floor_ms(bytes_read: float, bandwidth_gbs: float) -> float:
    return bytes_read / (bandwidth_gbs * 1e6)


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Weight bytes a decode step reads: all of them but an untied input embedding, of which it reads one row."""
    embedding = model.get_input_embeddings().weight
    tied = embedding is model.get_output_embeddings().weight
    return weight_bytes(model) - (0 if tied else embedding.numel() * embedding.element_size())


def fastgpt_cache_bytes(
    config: FastGPTConfig, context: int, dtype: torch.dtype = torch.bfloat16, kv_quantization: str | None = None
) -> int:
    """Bytes of every tensor a FastGPT cache holds after `context` positions (batch 1, a model in `dtype`; keys and
    values in `dtype`, or as `kv_quantization` says)."""
    cache = FastGPTStaticCache(config, max_cache_len=context, kv_quantization=kv_quantization)
    cache.early_initialization(1, config.num_key_value_heads, config.head_dim, dtype, torch.device("meta"))
    return sum(buffer.numel() * buffer.element_size() for layer in cache.layers for buffer in layer.batch_buffers())


def llama_cache_bytes(config: FastGPTConfig, context: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of a LlamaForCausalLM DynamicCache of the same shape after `context` positions (batch 1)."""
    element_bytes = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * context * element_bytes
