"""FastGPT to ExecuTorch: `torch.export` of the model with its static hybrid cache, lowered to XNNPACK.

The `.pte` file holds three methods that share the cache (ExecuTorch's shared mutable buffers, one memory arena
for every method) and a few constant methods describing it:

| method | input | output |
| --- | --- | --- |
| `prefill` | `input_ids` `[1, C]` (C = `get_prefill_chunk()`) | logits `[1, C, vocab]` |
| `decode` | `input_ids` `[1, 1]` | logits `[1, 1, vocab]` |
| `reset` | none | a zero `[1]` tensor; empties the cache before a new sequence |
| `get_max_cache_len`, `get_prefill_chunk`, `get_vocab_size` | none | ints |

The cache is `FastGPTStaticCache` (DESIGN.md section 4) with its tensors registered as the module's buffers:
windowed layers keep rings of their window, full layers of `max_cache_len`, dynamic layers add the block sums,
counts and compressed entries of ceil(max_cache_len / b) blocks; positions count from the cache's own counter,
so the methods take only token ids. A sequence is at most `max_cache_len` tokens (`run_executorch` refuses
longer ones): a dynamic layer has block state for no more. Attention sinks (`num_sink_tokens` > 0) live in slots
ahead of each window's ring and in two small tensors per windowed layer (when each sink arrived, how many there
are), buffers like the rest; `reset` zeroes them too.

`prefill` has a fixed length: every shape of both graphs is static, so the attention backends' choices on shapes
are made once at export, and nothing in the model needs rewriting for export. A prompt is fed as whole chunks
through `prefill` and its remainder token by token through `decode` (`run_executorch`).

`int8-dynamic` quantizes, through torchao, every Linear except the global branch's small float32 parts
(`_keep_in_fp32_modules`) with dynamic per-token int8 activations and per-channel int8 weights
(`Int8DynamicActivationIntxWeightConfig`), the output head included, and the embedding to per-row int8 weights
(`IntxWeightOnlyConfig`): on a phone the (tied) embedding and head are a third of the `small` preset, and the
file is then about a quarter of the float one. XNNPACK runs the int8 matmuls. `quantize_for_edge` applies the
same scheme to an eager model, which is what the exported one is compared with.
"""

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from .cache_fastgpt import FastGPTStaticCache
from .modeling_fastgpt import FastGPTPreTrainedModel

QUANTIZATIONS = ("none", "int8-dynamic")
METHODS = ("prefill", "decode", "reset")
DEFAULT_MAX_CACHE_LEN = 2048
DEFAULT_PREFILL_CHUNK = 128


def quantize_for_edge(model: PreTrainedModel) -> PreTrainedModel:
    """Quantize in place, through torchao, as `--quantize int8-dynamic` does: per-row int8 embedding weights; every
    Linear but the global branch's float32 parts with per-channel int8 weights and per-token int8 activations."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis

    precise = set(FastGPTPreTrainedModel._keep_in_fp32_modules)
    is_embedding = lambda module, name: isinstance(module, nn.Embedding)  # noqa: E731
    is_quantized_linear = lambda module, name: isinstance(module, nn.Linear) and name.split(".")[-1] not in precise  # noqa: E731
    # A tied output head gets its own copy: ExecuTorch fuses the embedding's dequantize into `embedding_byte` only
    # where nothing else reads the dequantized table.
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
    # padding_idx changes only gradients, and an `embedding` call that passes it is not fused.
    model.get_input_embeddings().padding_idx = None
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)), filter_fn=is_embedding)
    linear_config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    quantize_(model, linear_config, filter_fn=is_quantized_linear)
    return model


def cache_tensors(cache: FastGPTStaticCache) -> dict[str, torch.Tensor]:
    """Every tensor of the cache by a buffer name: `layers.N.keys`, `.values`, `.slot_is_real`,
    `.cumulative_length` and, for dynamic layers, the block state (`CompressedBlocks.BLOCK_STATE`)."""
    tensors = {}
    for index, layer in enumerate(cache.layers):
        for name in layer.state_names():
            tensors[f"layer_{index}_{name}"] = getattr(layer, name)
    return tensors


class FastGPTWithStaticCache(nn.Module):
    """A FastGPT causal LM and a batch-1 `FastGPTStaticCache` of `max_cache_len` positions whose tensors are this
    module's (non-persistent) buffers, so that `torch.export` sees them as state the methods mutate."""

    def __init__(self, model: PreTrainedModel, max_cache_len: int):
        super().__init__()
        config = model.config
        self.model = model
        self.max_cache_len = max_cache_len
        self.cache = FastGPTStaticCache(config, max_cache_len)
        dtype = model.get_input_embeddings().weight.dtype
        if not dtype.is_floating_point:  # an int8 embedding: the cache takes the activations' dtype
            dtype = torch.float32
        self.cache.early_initialization(1, config.num_key_value_heads, config.head_dim, dtype, model.device)
        self.buffer_names = []
        for name, tensor in cache_tensors(self.cache).items():
            self.register_buffer(name, tensor, persistent=False)
            self.buffer_names.append(name)

    def bind_cache(self) -> None:
        """Point the cache's layers at this module's buffers: under `torch.export` they are the traced state."""
        for name in self.buffer_names:
            _, index, attribute = name.split("_", 2)
            setattr(self.cache.layers[int(index)], attribute, getattr(self, name))

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`[1, T]` token ids after the cached ones -> `[1, T, vocab]` logits; the cache takes them in."""
        self.bind_cache()
        return self.model(input_ids=input_ids, cache=self.cache, use_cache=True).logits

    def reset(self) -> torch.Tensor:
        """Empty the cache (zeros everywhere, no position seen); returns a zero `[1]` tensor."""
        self.bind_cache()
        for name in self.buffer_names:
            getattr(self, name).zero_()
        return torch.zeros(1)


class ExportedMethod(nn.Module):
    """One method of `FastGPTWithStaticCache` as a module's forward, for `torch.export`: every method's buffers
    then have the same names (`owner.layer_N_...`), which is what lets ExecuTorch share them."""

    def __init__(self, owner: nn.Module, method: str):
        super().__init__()
        self.owner = owner
        self.method = method

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return getattr(self.owner, self.method)(*args)


def export_methods(wrapper: FastGPTWithStaticCache, prefill_chunk: int) -> dict[str, torch.export.ExportedProgram]:
    """`torch.export` of `prefill` (`[1, prefill_chunk]` ids), `decode` (`[1, 1]`) and `reset`, the cache zero
    before each (export runs the code once)."""
    examples = {
        "prefill": (torch.zeros(1, prefill_chunk, dtype=torch.long),),
        "decode": (torch.zeros(1, 1, dtype=torch.long),),
        "reset": (),
    }
    programs = {}
    with torch.no_grad():
        for method, example in examples.items():
            wrapper.reset()
            callable_name = "logits" if method != "reset" else "reset"
            programs[method] = torch.export.export(ExportedMethod(wrapper, callable_name), example, strict=False)
        wrapper.reset()
    return programs


def lerp_without_strided_copy(start: torch.Tensor, end: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`torch.lerp` as PyTorch's reference computes it, minus the trailing `prims.copy_strided` (which has no
    ExecuTorch kernel): the dynamic layer's gate mix."""
    difference = end - start
    return torch.where(weight < 0.5, start + weight * difference, end - difference * (1 - weight))


def lower_to_executorch(programs: dict[str, torch.export.ExportedProgram], constants: dict[str, int]):
    """XNNPACK lowering of exported methods that share their mutable buffers (same names); returns ExecuTorch's
    program manager (`.buffer` is the `.pte` file)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    # Only lerp beforehand: the lowering decomposes the rest itself, keeping what XNNPACK takes whole (linear,
    # whose int8 weights a decomposed `permute + addmm` would hand it transposed).
    lerp_only = {torch.ops.aten.lerp.Tensor: lerp_without_strided_copy}
    edge = to_edge_transform_and_lower(
        {name: program.run_decompositions(lerp_only) for name, program in programs.items()},
        partitioner=[XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
        constant_methods=constants,
    )
    return edge.to_executorch(
        ExecutorchBackendConfig(
            memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True, alloc_graph_input=False),
            emit_mutable_buffer_names=True,
            # Fuses the int8 embedding's dequantize + gather into ExecuTorch's `embedding_byte` kernel.
            do_quant_fusion_and_const_prop=True,
        )
    )


def export_model(
    model: PreTrainedModel,
    output: str | Path,
    quantize: str = "none",
    max_cache_len: int = DEFAULT_MAX_CACHE_LEN,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> Path:
    """Write `model` (a float FastGPT causal LM, eval mode) as an ExecuTorch `.pte` file; returns its path.

    Args:
        quantize: "none" (the weights' dtype) or "int8-dynamic" (`quantize_for_edge`, applied to the model).
        max_cache_len: positions the cache holds: the longest prompt plus new tokens the file can run.
        prefill_chunk: tokens per `prefill` call, at most `max_cache_len`.
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"Unknown quantization {quantize!r}; choose one of {list(QUANTIZATIONS)}.")
    if not 1 <= prefill_chunk <= max_cache_len:
        raise ValueError(f"prefill_chunk must be in [1, max_cache_len={max_cache_len}], got {prefill_chunk}.")
    if max_cache_len > model.config.max_position_embeddings:
        raise ValueError(
            f"max_cache_len={max_cache_len} exceeds the model's max_position_embeddings="
            f"{model.config.max_position_embeddings}; export with a smaller --max-cache-len."
        )
    # Eager attention: dense masked scores of one chunk against the cache, the same graph at every step; the
    # sdpa backend's blocked windows reshape sdpa's output in a way ExecuTorch's decomposition cannot view, and
    # where chunks fit the windows (one sdpa call) its file ran no faster (benchmarks/RESULTS.md, "## export").
    model.eval().set_attn_implementation("eager")
    if quantize == "int8-dynamic":
        quantize_for_edge(model)
    wrapper = FastGPTWithStaticCache(model, max_cache_len)
    constants = {
        "get_max_cache_len": max_cache_len,
        "get_prefill_chunk": prefill_chunk,
        "get_vocab_size": model.config.vocab_size,
    }
    program = lower_to_executorch(export_methods(wrapper, prefill_chunk), constants)
    output = Path(output)
    output.write_bytes(program.buffer)
    return output


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    quantize: str = "none",
    max_cache_len: int = DEFAULT_MAX_CACHE_LEN,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> Path:
    """`export_model` of a float checkpoint folder."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    return export_model(model, output, quantize, max_cache_len, prefill_chunk)
