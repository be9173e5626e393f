"""Convert a pretrained Llama-family checkpoint into a FastGPT checkpoint: `fastgpt convert SOURCE OUTPUT`.

FastGPT keeps Llama's skeleton and parameter names (DESIGN.md section 1), so a Llama, Mistral, Qwen2 or SmolLM
checkpoint becomes a FastGPT by copying every tensor under its own name; the dynamic layers' new parameters
(`memory_k`, `memory_v`, `compress_k`, `compress_v`, `mix_gate`) are set to values that leave the source's
computation (nearly) untouched:

- the gate `sigmoid(mix_gate(x))`: weight 0, bias `GATE_BIAS` = 7, so g = 0.99909 for every token and head: the
  local branch (the source's attention inside the window) carries the output, the global branch 0.09% of it. A
  gate that is exactly 1 in float32 (bias >= 17) would also have exactly zero gradient (sigmoid' = g (1 - g)), and
  uptraining could never open it; 7 keeps the gradient at 9e-4 of its largest value, which Adam rescales. The
  model computes the global share as sigmoid(-logit), which bf16 holds (9.1e-4) where it rounds sigmoid(7) to 1;
- memory slots: keys 0 (every query scores them 0, no slot preferred) and values 0 (a slot returns nothing): the
  neutral attention sinks. With no complete block yet (prompts shorter than `compress_block_size`) the global
  branch is then exactly 0;
- compressors: the identity with zero bias (`_init_weights`' start): a block's entry is its mean key and value.

So a FastGPT whose layers are all `full_attention` computes exactly what the source computes, and one with
sliding / dynamic layers gives the source's greedy tokens on prompts shorter than every window (tests hold both).
`--full-layers K` keeps full the K layers whose heads retrieve (`retrieval_layout`) instead of the deepest ones.
`--sink-tokens N` (`num_sink_tokens`) lets the windowed layers keep seeing the first N tokens, on which the source's
heads park attention (README, "Attention sinks"); inside every window it changes nothing.

SOURCE is a folder with `config.json` and safetensors, or a `.gguf` file, which Transformers dequantizes
(`gguf_file=`; needs the `gguf` package: `pip install "fastgpt_hf[convert]"`). Nothing is filled in silently: the
source loads strictly (missing, unexpected or mis-shaped tensors are an error), every source tensor must have a
FastGPT name, and everything FastGPT cannot compute is refused by name: other architectures, sliding-window
sources (Mistral v0.1's `sliding_window`, Qwen2's `use_sliding_window`), and whatever `FastGPTConfig` refuses.
Qwen2's q/k/v biases map onto FastGPT's `attention_bias=True`, whose `o_proj` bias (absent in Qwen2) is set to 0.
Rope types and scalings carry over in `rope_parameters`: FastGPT's rotary embedding is built by the same
Transformers functions as Llama's.

The tokenizer (with its chat template) and the generation config are copied; OUTPUT is an ordinary FastGPT
checkpoint (`save_pretrained`: weights, config, modeling code with `auto_map`, model card), which
`AutoModelForCausalLM.from_pretrained(OUTPUT)` loads, or without this package with `trust_remote_code=True`.
"""

import argparse
import importlib.util
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from .checkpoints import loading_problems
from .configuration_fastgpt import FULL, GLOBAL_BRANCH_TYPES, FastGPTConfig
from .modeling_fastgpt import FastGPTForCausalLM
from .output_folders import refuse_occupied, refuse_unwritable, staged_folder, writer_lock
from .retrieval_layout import retrieval_layout, retrieval_scores

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Config fields copied as they are (Llama's names; Mistral and Qwen2 use the same ones).
COPIED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
# The parameters of a dynamic layer that no Llama has.
NEW_PARAMETERS = ("memory_k", "memory_v", "compress_k", "compress_v", "mix_gate")
GATE_BIAS = 7.0
# Layout options of `fastgpt convert` (FastGPTConfig fields); None keeps FastGPT's default. The sizes are options of
# their own names (`--sliding-window`), the attention sinks `--sink-tokens`.
LAYOUT_SIZE_FIELDS = ("sliding_window", "dynamic_window", "num_memory_tokens", "compress_block_size")
LAYOUT_FIELDS = (*LAYOUT_SIZE_FIELDS, "num_sink_tokens")


def is_new_parameter(name: str) -> bool:
    """True for a parameter name of a dynamic layer's global branch or gate (absent from every source)."""
    return any(f".self_attn.{part}" in name for part in NEW_PARAMETERS)


def source_biases(config: PretrainedConfig) -> tuple[bool, bool]:
    """(attention_bias, mlp_bias) of FastGPT for a source: Llama's flags; Mistral none; Qwen2 q/k/v biases."""
    if config.model_type == "llama":
        return config.attention_bias, config.mlp_bias
    return config.model_type == "qwen2", False


def check_source_config(config: PretrainedConfig) -> None:
    """Raise a ValueError naming what FastGPT cannot compute as the source does: another architecture or
    sliding-window attention."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Cannot convert a {config.model_type!r} model: FastGPT maps only the Llama family "
            f"({', '.join(SUPPORTED_MODEL_TYPES)}; SmolLM is 'llama')."
        )
    windowed = [kind for kind in getattr(config, "layer_types", None) or [] if kind != FULL]
    if getattr(config, "sliding_window", None) is not None or windowed:
        raise ValueError(
            f"The {config.model_type} source uses sliding-window attention (sliding_window="
            f"{config.sliding_window}); conversion starts from full attention in every layer. To convert it as full "
            "attention (the same model for inputs up to its window), set sliding_window to null (Qwen2: "
            "use_sliding_window to false) in the source's config.json."
        )


def fastgpt_config_for(
    source_config: PretrainedConfig, layer_types: list[str] | str | None = None, **layout
) -> FastGPTConfig:
    """The FastGPT config of a source's shape with `layer_types` (None: FastGPT's three stages; one kind or alias:
    every layer) and the `LAYOUT_FIELDS` in `layout` (None values: FastGPT's defaults)."""
    check_source_config(source_config)
    fields = {name: getattr(source_config, name) for name in COPIED_FIELDS}
    fields["head_dim"] = getattr(source_config, "head_dim", None)
    fields["attention_bias"], fields["mlp_bias"] = source_biases(source_config)
    if isinstance(layer_types, str):
        layer_types = [layer_types] * source_config.num_hidden_layers
    elif layer_types is not None and len(layer_types) == 1:
        layer_types = list(layer_types) * source_config.num_hidden_layers
    unknown = sorted(set(layout) - set(LAYOUT_FIELDS))
    if unknown:
        raise ValueError(f"Unknown layout options {unknown}; the layout options are {list(LAYOUT_FIELDS)}.")
    fields.update({name: value for name, value in layout.items() if value is not None})
    try:
        return FastGPTConfig(layer_types=layer_types, dtype=source_config.dtype, **fields)
    except (ValueError, TypeError) as error:
        raise ValueError(f"Cannot map the {source_config.model_type} config onto FastGPT: {error}") from None


def start_local(model: FastGPTForCausalLM, gate_bias: float = GATE_BIAS) -> None:
    """Set every dynamic layer's new parameters to their neutral start (module docstring): gate weight 0 and bias
    `gate_bias`, memory keys and values 0, compressors the identity."""
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            if attention.layer_type not in GLOBAL_BRANCH_TYPES:
                continue
            attention.memory_k.zero_()
            attention.memory_v.zero_()
            for compressor in (attention.compress_k, attention.compress_v):
                nn.init.eye_(compressor.weight)
                compressor.bias.zero_()
            attention.mix_gate.weight.zero_()
            attention.mix_gate.bias.fill_(gate_bias)


def converted_model(
    source: PreTrainedModel, layer_types: list[str] | str | None = None, gate_bias: float = GATE_BIAS, **layout
) -> FastGPTForCausalLM:
    """A FastGPT (eval mode) holding every tensor of `source` (a Llama-family `*ForCausalLM`) under its own name,
    the new parameters at their neutral start (`start_local`), Qwen2's absent `o_proj` bias at 0.

    Raises a ValueError naming each source tensor FastGPT has no place for, and each FastGPT tensor the source
    does not give (beyond the new parameters and the zero `o_proj` biases)."""
    config = fastgpt_config_for(source.config, layer_types, **layout)
    config._attn_implementation = "sdpa"
    model = FastGPTForCausalLM._from_config(config, dtype=source.dtype)
    source_state = source.state_dict()
    target_state = model.state_dict()
    zero_filled = {name for name in target_state if name.endswith("o_proj.bias")} - set(source_state)
    unmapped = sorted(set(source_state) - set(target_state))
    unfilled = sorted(
        name for name in set(target_state) - set(source_state) - zero_filled if not is_new_parameter(name)
    )
    mis_shaped = sorted(
        f"{name} {tuple(tensor.shape)} -> {tuple(target_state[name].shape)}"
        for name, tensor in source_state.items()
        if name in target_state and tensor.shape != target_state[name].shape
    )
    problems = [f"no FastGPT tensor for {name}" for name in unmapped]
    problems += [f"the source has no {name}" for name in unfilled]
    problems += [f"mis-shaped: {entry}" for entry in mis_shaped]
    if problems:
        listing = "\n  ".join(problems)
        raise ValueError(f"Cannot map the {source.config.model_type} checkpoint onto FastGPT:\n  {listing}")
    model.load_state_dict(source_state, strict=False)
    with torch.no_grad():
        for name in zero_filled:
            model.get_parameter(name).zero_()
    start_local(model, gate_bias)
    model.generation_config = source.generation_config
    return model.eval()


def source_location(source: str | Path) -> tuple[Path, dict]:
    """(folder, extra from_pretrained arguments) of a source folder or `.gguf` file, or a ValueError."""
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        if importlib.util.find_spec("gguf") is None:
            raise ValueError(f"Reading {path} needs the gguf package: pip install 'fastgpt_hf[convert]'.")
        return path.parent, {"gguf_file": path.name}
    if path.is_dir() and (path / "config.json").is_file():
        return path, {}
    raise ValueError(f"{source} is neither a checkpoint folder (with config.json and safetensors) nor a .gguf file.")


def load_source(source: str | Path, dtype: str | torch.dtype = "auto") -> tuple[PreTrainedModel, object]:
    """(model in eval mode, tokenizer) of a Llama-family source folder or GGUF file, loaded strictly: the config is
    checked (`check_source_config`) before any weight is read, and a missing, unexpected or mis-shaped tensor is a
    ValueError instead of Transformers' random initialisation."""
    folder, location = source_location(source)
    check_source_config(AutoConfig.from_pretrained(folder, **location))
    model, report = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True, **location
    )
    problems = loading_problems(report, ignore_mismatched_sizes=False)
    if problems:
        listing = "\n  ".join(problems)
        raise ValueError(f"The source {source} does not load whole:\n  {listing}")
    tokenizer = AutoTokenizer.from_pretrained(folder, **location)
    return model.eval(), tokenizer


def convert(
    source: str | Path,
    output: str | Path,
    layer_types: list[str] | str | None = None,
    gate_bias: float = GATE_BIAS,
    overwrite: bool = False,
    full_layers: int | None = None,
    **layout,
) -> FastGPTForCausalLM:
    """Write the FastGPT checkpoint of `source` (`converted_model`) with its tokenizer to `output` and return the
    model. `full_layers` (instead of `layer_types`): keep the source's most retrieving layers full
    (`retrieval_layout`). `output` must be new or empty unless `overwrite`; it is written beside its final name and
    renamed into place, under a lock, and never a folder holding the source."""
    if full_layers is not None and layer_types is not None:
        raise ValueError("Give either the layer types or the number of full layers to choose them, not both.")
    output = Path(output)
    refuse_unwritable(output, [Path(source)])
    with writer_lock(output):
        if not overwrite:
            refuse_occupied(output, "pass overwrite=True (--overwrite) to replace them, or another output folder")
        source_model, tokenizer = load_source(source)
        if full_layers is not None:
            layer_types = retrieving_layout(source_model, tokenizer, full_layers)
        model = converted_model(source_model, layer_types, gate_bias, **layout)
        with staged_folder(output) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    return model


def retrieving_layout(source: PreTrainedModel, tokenizer, full_layers: int) -> list[str]:
    """`retrieval_layout` of the source's `retrieval_scores` (eager attention while scoring), each layer's score and
    kind printed."""
    implementation = source.config._attn_implementation
    source.set_attn_implementation("eager")
    try:
        scores = retrieval_scores(source, tokenizer)
    finally:
        source.set_attn_implementation(implementation)
    layer_types = retrieval_layout(scores, full_layers)
    print("retrieval score by layer (the most retrieving head's attention share on a pass key's needle):")
    for index, (score, kind) in enumerate(zip(scores, layer_types, strict=True)):
        print(f"  {index:3d}  {score:.3f}  {kind}")
    return layer_types


def convert_main(argv: list[str] | None = None) -> None:
    """`fastgpt convert SOURCE OUTPUT`: a Llama-family folder or GGUF file in, a FastGPT checkpoint out."""
    from .cli import non_negative_int, positive_int

    parser = argparse.ArgumentParser(
        prog="fastgpt convert",
        description="Convert a Llama, Mistral, Qwen2 or SmolLM checkpoint (a folder with config.json and "
        "safetensors, or a .gguf file) into a FastGPT checkpoint with the same weights, tokenizer and chat template. "
        "The dynamic layers' new parameters start neutral (the gate local), so the converted model answers as the "
        "source does on prompts shorter than every window; `fastgpt uptrain` then teaches them.",
    )
    parser.add_argument("source", help="source checkpoint folder or .gguf file")
    parser.add_argument("output", help="folder for the FastGPT checkpoint (new or empty, or --overwrite)")
    parser.add_argument(
        "--layer-types",
        nargs="+",
        help="one kind per layer, or one kind for every layer: sliding_attention (local), dynamic_attention "
        "(dynamic), full_attention (global); default: FastGPT's three stages. `--layer-types full_attention` "
        "computes exactly what the source computes",
    )
    for field in LAYOUT_SIZE_FIELDS:
        parser.add_argument(f"--{field.replace('_', '-')}", type=positive_int, help="default: FastGPT's")
    parser.add_argument(
        "--sink-tokens",
        dest="num_sink_tokens",
        type=non_negative_int,
        help="attention sinks: every windowed query also sees the first N real tokens (num_sink_tokens; default 0, "
        "none)",
    )
    parser.add_argument(
        "--full-layers",
        type=positive_int,
        help="instead of --layer-types: keep the K layers whose heads retrieve most full (scored on pass-key samples "
        "the source answers), the other layers below them sliding and the rest dynamic",
    )
    parser.add_argument("--gate-bias", type=float, default=GATE_BIAS, help="initial gate bias (sigmoid: local share)")
    parser.add_argument("--overwrite", action="store_true", help="replace what OUTPUT holds")
    args = parser.parse_args(argv)
    layout = {field: getattr(args, field) for field in LAYOUT_FIELDS}
    if args.full_layers is not None and args.layer_types is not None:
        parser.error("--layer-types and --full-layers choose the same thing: give one of them")
    model = convert(
        args.source, args.output, args.layer_types, args.gate_bias, args.overwrite, args.full_layers, **layout
    )
    kinds = {kind: model.config.layer_types.count(kind) for kind in dict.fromkeys(model.config.layer_types)}
    print(f"{args.source} -> {args.output}: {model.num_parameters():,} parameters, layers {kinds}")
