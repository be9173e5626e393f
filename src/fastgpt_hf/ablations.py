"""The peers and ablations of the quality harness (`benchmarks/quality.py`), each built from one base shape.

A variant is a layer layout, config overrides, and parameters set at build time: `zeroed` ones set to zero and
frozen, `frozen` ones kept at their initial values (`requires_grad` False, so `Trainer`'s optimizer skips them).
Nothing here changes the modeling code: every variant is a configuration of `FastGPTForCausalLM` or, for
`llama`, the `LlamaForCausalLM` of the same shape (`training.llama_peer`).

The ablations of the dynamic layer start from `dynamic` (the default layout with its full layers turned dynamic),
where the global branch is the only path beyond the windows; with full layers present, they could carry what an
ablated global branch drops. `selective` is that layout with the proposed selective layer (README, "The selective
layer") in place of the dynamic one. Two ablations the issue names cannot be expressed by config and are
approximated (`NOT_EXPRESSIBLE` says why, `VARIANTS` what runs instead).
"""

from dataclasses import dataclass, field

from transformers import PreTrainedModel

from .configuration_fastgpt import DYNAMIC, FULL, SELECTIVE, SLIDING, FastGPTConfig
from .training import initialised_model, llama_peer

LAYOUTS = ("llama", "default", "sliding", "no_full", "selective")


@dataclass(frozen=True)
class Variant:
    """How one peer or ablation differs from the base shape."""

    description: str
    layout: str  # one of LAYOUTS
    overrides: dict = field(default_factory=dict)
    zeroed: tuple[str, ...] = ()  # parameters (by module or parameter name) set to zero and frozen
    frozen: tuple[str, ...] = ()  # parameters frozen at their initial values


VARIANTS: dict[str, Variant] = {
    "llama": Variant("LlamaForCausalLM of the same shape: every layer full attention", "llama"),
    "fastgpt": Variant("FastGPT's default layout: sliding, dynamic, full stages", "default"),
    "sliding": Variant("every layer sliding_attention", "sliding"),
    "dynamic": Variant("sliding + dynamic: the default layout's full layers turned dynamic", "no_full"),
    "selective": Variant(
        "sliding + selective: the default layout's dynamic and full layers turned selective_attention (the dynamic "
        "layer whose global branch also attends to the tokens of its top-scoring blocks)",
        "selective",
    ),
    "dynamic-null-memory": Variant(
        "dynamic, memory slots replaced by one slot frozen at zero (a null sink: score 0, value 0)",
        "no_full",
        overrides={"num_memory_tokens": 1},
        zeroed=("memory_k", "memory_v"),
    ),
    "dynamic-empty-blocks": Variant(
        "dynamic, compressors frozen at zero: every block's key and value is 0, so blocks carry no content",
        "no_full",
        zeroed=("compress_k", "compress_v"),
    ),
    "dynamic-fixed-gate": Variant(
        "dynamic, gate (mix_gate) frozen at its initialisation", "no_full", frozen=("mix_gate",)
    ),
}

NOT_EXPRESSIBLE: dict[str, str] = {
    "FastGPT all full_attention": "computes exactly what the Llama peer computes (DESIGN.md section 1, held by the "
    "tests), so `llama` stands for it",
    "dynamic without memory slots (num_memory_tokens=0)": "FastGPTConfig refuses it (num_memory_tokens must be a "
    "positive integer: a query before the first complete block would have no global key at all); "
    "`dynamic-null-memory` runs instead",
    "dynamic without compressed blocks (compress_block_size > sequence)": "FastGPTConfig refuses it "
    "(compress_block_size must be at most dynamic_window, and the windows must be shorter than the sequence for "
    "the test to mean anything); `dynamic-empty-blocks` runs instead",
}


def variant_layer_types(layout: str, base_layer_types: list[str]) -> list[str]:
    """The layer types of `layout` for a model whose default layout is `base_layer_types`."""
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; choose one of {list(LAYOUTS)}.")
    if layout == "llama":
        return [FULL] * len(base_layer_types)
    if layout == "sliding":
        return [SLIDING] * len(base_layer_types)
    if layout == "no_full":
        return [DYNAMIC if kind == FULL else kind for kind in base_layer_types]
    if layout == "selective":
        return [SELECTIVE if kind in (DYNAMIC, FULL) else kind for kind in base_layer_types]
    return list(base_layer_types)


def variant_config(name: str, shape: dict) -> FastGPTConfig:
    """The FastGPT config of variant `name` on `shape` (FastGPTConfig keyword arguments, layer_types optional)."""
    if name not in VARIANTS:
        raise ValueError(f"Unknown variant {name!r}; choose from {list(VARIANTS)}.")
    variant = VARIANTS[name]
    base = FastGPTConfig(**shape)
    layer_types = variant_layer_types(variant.layout, base.layer_types)
    return FastGPTConfig(**{**shape, **variant.overrides, "layer_types": layer_types})


def variant_model(name: str, shape: dict, seed: int = 0) -> PreTrainedModel:
    """A freshly initialised model of variant `name` (seeded), its `zeroed` and `frozen` parameters fixed."""
    config = variant_config(name, shape)
    variant = VARIANTS[name]
    model = llama_peer(config, seed) if variant.layout == "llama" else initialised_model(config, seed)
    for parameter_name, parameter in model.named_parameters():
        parts = set(parameter_name.split("."))
        if parts & set(variant.zeroed):
            parameter.data.zero_()
        if parts & set(variant.zeroed + variant.frozen):
            parameter.requires_grad_(False)
    return model
