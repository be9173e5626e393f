"""INT8 quantization of FastGPT through the ecosystem's quantizers: which schemes, how to apply, save and reload.

Every scheme quantizes the projection and MLP weights to int8 with one scale per output channel and leaves the
parts that must stay precise alone: `lm_head`, and the modules the model declares in `_keep_in_fp32_modules`
(memory slots, compressors, gates); norms and embeddings are never quantized.

| scheme | how | where |
| --- | --- | --- |
| `bnb-int8` | bitsandbytes LLM.int8, `BitsAndBytesConfig(load_in_8bit=True)` at load time | CPU and CUDA |
| `torchao-int8-weight` | `TorchAoConfig(Int8WeightOnlyConfig())`: int8 weights, float activations | servers |
| `torchao-int8-dynamic` | `TorchAoConfig(Int8DynamicActivationInt8WeightConfig())`: int8 x int8 matmuls | servers |
| `dynamic-range` | PyTorch's `quantize_dynamic` of the Linear layers, per-channel (fbgemm / qnnpack) | edge CPUs |

Quantization-aware training: `prepare_qat` inserts torchao fake quantizers (int8 per-channel weights, int8
per-token activations) that train through `Trainer` like any module; `convert_qat` then makes real int8 weights,
the same as `torchao-int8-dynamic`.

The load-time schemes save with `save_pretrained`. A `dynamic-range` model saves with `save_dynamic_range` as
`dynamic_range_int8.safetensors` (int8 weights with their per-channel scales and zero points, every other tensor
as it is) beside `dynamic_range_int8.json` (the scheme and the quantized modules); nothing in this package
unpickles a file. `load_checkpoint_model` opens any checkpoint folder, float, load-time quantized or dynamic-range,
and so does `FastGPTForCausalLM.from_pretrained` (hence `pipeline("text-generation", model=FOLDER)`) where this
package is installed. `fastgpt quantize` saves the float checkpoint's tokenizer beside the int8 weights.
"""

import argparse
import importlib.util
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GenerationConfig,
    PreTrainedModel,
    TorchAoConfig,
)
from transformers.utils import GENERATION_CONFIG_NAME

from .modeling_fastgpt import FastGPTPreTrainedModel
from .output_folders import refuse_occupied, refuse_unwritable, staged_folder, writer_lock

LOAD_TIME_SCHEMES = ("bnb-int8", "torchao-int8-weight", "torchao-int8-dynamic")
SCHEMES = (*LOAD_TIME_SCHEMES, "dynamic-range")
DYNAMIC_RANGE_WEIGHTS = "dynamic_range_int8.safetensors"
DYNAMIC_RANGE_CONFIG = "dynamic_range_int8.json"
PICKLED_DYNAMIC_RANGE_WEIGHTS = "dynamic_range_int8.pt"  # what older versions wrote; refused, never unpickled
DynamicQuantizedLinear = torch.ao.nn.quantized.dynamic.Linear
SCHEME_PACKAGES = {"bnb-int8": "bitsandbytes", "torchao-int8-weight": "torchao", "torchao-int8-dynamic": "torchao"}


def require_scheme(scheme: str) -> None:
    """Raise a ValueError naming what to install or choose when `scheme` cannot run here."""
    if scheme not in SCHEMES:
        raise ValueError(f"Unknown quantization scheme {scheme!r}; choose one of {list(SCHEMES)}.")
    package = SCHEME_PACKAGES.get(scheme)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ValueError(f"Scheme {scheme!r} needs {package}: pip install 'fastgpt_hf[quant]'.")
    if scheme == "dynamic-range" and torch.backends.quantized.engine == "none":
        raise ValueError("Scheme 'dynamic-range' needs PyTorch's fbgemm or qnnpack engine, which this build lacks.")


def precise_module_names() -> list[str]:
    """Names of the modules no scheme may quantize: the output head and FastGPT's float32 declarations."""
    return ["lm_head", *FastGPTPreTrainedModel._keep_in_fp32_modules]


def quantization_config(scheme: str) -> BitsAndBytesConfig | TorchAoConfig:
    """The Transformers quantization config of a load-time scheme."""
    require_scheme(scheme)
    # Transformers matches these against full parameter names from their start: anchor each name at any depth.
    skipped = [rf"(.*\.)?{name}" for name in precise_module_names()]
    if scheme == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skipped)
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    base = Int8WeightOnlyConfig() if scheme == "torchao-int8-weight" else Int8DynamicActivationInt8WeightConfig()
    return TorchAoConfig(base, modules_to_not_convert=skipped)


def load_quantized(checkpoint: str | Path, scheme: str, device_map: str = "cpu") -> PreTrainedModel:
    """Load a float checkpoint with int8 weights under `scheme` (any of `SCHEMES`)."""
    if scheme == "dynamic-range":
        return dynamic_range_quantize(AutoModelForCausalLM.from_pretrained(checkpoint).eval())
    return AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=quantization_config(scheme), device_map=device_map
    )


def dynamic_range_quantize(model: PreTrainedModel) -> PreTrainedModel:
    """Replace the model's Linear layers, except the precise ones, by int8 dynamic-range Linear layers."""
    require_scheme("dynamic-range")
    precise = set(precise_module_names())
    per_channel = torch.ao.quantization.per_channel_dynamic_qconfig
    qconfig_by_name = {
        name: per_channel
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.split(".")[-1] not in precise
    }
    return torch.ao.quantization.quantize_dynamic(model, qconfig_by_name, dtype=torch.qint8)


def dynamic_range_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """What the safetensors file of a dynamic-range model holds, and the channel axis of each quantized Linear.

    A quantized Linear `name` (per-channel qint8, weight [out, in]) gives `name.weight` (int8 [out, in], the
    packed weight's `int_repr()`), `name.weight_scales` (float64 [out]), `name.weight_zero_points` (int64 [out])
    and `name.bias` (float32 [out]) when it has one. Every other tensor of the state dict is kept as it is, a tied
    tensor under its first name only.
    """
    tensors, axes = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, DynamicQuantizedLinear):
            continue
        weight, bias = module.weight(), module.bias()
        if weight.qscheme() != torch.per_channel_affine:
            raise ValueError(f"{name} is quantized {weight.qscheme()}; save_dynamic_range stores per-channel weights.")
        tensors[f"{name}.weight"] = weight.int_repr()
        tensors[f"{name}.weight_scales"] = weight.q_per_channel_scales()
        tensors[f"{name}.weight_zero_points"] = weight.q_per_channel_zero_points()
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach()
        axes[name] = weight.q_per_channel_axis()
    quantized_prefixes = tuple(f"{name}." for name in axes)
    seen = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if not key.startswith(quantized_prefixes) and id(tensor) not in seen:
            seen.add(id(tensor))
            tensors[key] = tensor.detach()
    return tensors, axes


def save_dynamic_range(model: PreTrainedModel, folder: str | Path) -> None:
    """Save a dynamic-range model: config.json, generation_config.json, its tensors as safetensors (see
    `dynamic_range_tensors`) and `dynamic_range_int8.json` naming the scheme and the quantized modules with their
    channel axis."""
    folder = Path(folder)
    tensors, axes = dynamic_range_tensors(model)
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, folder / DYNAMIC_RANGE_WEIGHTS)
    description = {"scheme": "dynamic-range", "weight_dtype": "qint8", "qscheme": "per_channel_affine"}
    description["quantized_modules"] = {name: {"axis": axis} for name, axis in axes.items()}
    (folder / DYNAMIC_RANGE_CONFIG).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")


def load_dynamic_range(folder: str | Path) -> PreTrainedModel:
    """Rebuild a model saved by `save_dynamic_range` (eval mode): the model of its config (and generation config,
    when the folder has one), quantized by `dynamic_range_quantize`, then each int8 weight and every other tensor
    from the safetensors file. Nothing is unpickled; a missing, corrupt or mismatched file is a ValueError naming
    it."""
    folder = Path(folder)
    axes = read_dynamic_range_description(folder)
    model = dynamic_range_quantize(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).eval())
    if (folder / GENERATION_CONFIG_NAME).is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    expected, expected_axes = dynamic_range_tensors(model)
    if axes.keys() != expected_axes.keys():
        raise ValueError(
            f"{folder / DYNAMIC_RANGE_CONFIG} names quantized modules that config.json's model does not quantize "
            f"the same way ({sorted(axes.keys() ^ expected_axes.keys())}); re-quantize the float checkpoint."
        )
    tensors = read_dynamic_range_tensors(folder / DYNAMIC_RANGE_WEIGHTS, expected)
    for name, axis in axes.items():
        weight = torch._make_per_channel_quantized_tensor(
            tensors.pop(f"{name}.weight"),
            tensors.pop(f"{name}.weight_scales"),
            tensors.pop(f"{name}.weight_zero_points"),
            axis,
        )
        model.get_submodule(name).set_weight_bias(weight, tensors.pop(f"{name}.bias", None))
    # load_state_dict cannot skip the quantized modules (they read their own keys even when not strict): copy the
    # plain tensors in place, a tied one through its first name.
    targets = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in tensors.items():
            targets[name].copy_(tensor)
    return model


def read_dynamic_range_description(folder: Path) -> dict[str, int]:
    """The quantized modules of `folder`'s dynamic_range_int8.json with their channel axis, or a ValueError naming
    the file (a folder holding only the pickle of older versions is refused: re-quantize it)."""
    path = folder / DYNAMIC_RANGE_CONFIG
    if not path.is_file() and (folder / PICKLED_DYNAMIC_RANGE_WEIGHTS).is_file():
        raise ValueError(
            f"{folder / PICKLED_DYNAMIC_RANGE_WEIGHTS} is a pickle written by an older fastgpt_hf and is not loaded "
            "(unpickling a file runs any code it holds); re-quantize the float checkpoint: "
            f"fastgpt quantize FLOAT_CHECKPOINT {folder} --scheme dynamic-range."
        )
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
        axes = {name: int(entry["axis"]) for name, entry in description["quantized_modules"].items()}
        scheme = description["scheme"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{path} is missing or corrupt ({type(error).__name__}: {error}); save the model with "
            "save_dynamic_range or re-quantize the float checkpoint (fastgpt quantize ... --scheme dynamic-range)."
        ) from error
    if scheme != "dynamic-range":
        raise ValueError(f"{path} describes scheme {scheme!r}; this loader reads 'dynamic-range' only.")
    return axes


def read_dynamic_range_tensors(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a dynamic-range safetensors file, checked against `expected` (names, shapes and dtypes of
    the freshly quantized model), or a ValueError naming the file and what differs."""
    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as error:
        raise ValueError(
            f"{path} is missing or corrupt ({type(error).__name__}: {error}); save or download it again."
        ) from error
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    mismatched = [
        f"{name}: {tuple(tensors[name].shape)} {tensors[name].dtype}, expected {tuple(tensor.shape)} {tensor.dtype}"
        for name, tensor in expected.items()
        if name in tensors and (tensors[name].shape != tensor.shape or tensors[name].dtype != tensor.dtype)
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{path} does not fit config.json's model: missing {missing}, unexpected {unexpected}, mismatched "
            f"{mismatched}; re-quantize the float checkpoint (fastgpt quantize ... --scheme dynamic-range)."
        )
    return tensors


def is_dynamic_range_folder(path: str | Path) -> bool:
    """True for a local folder holding dynamic_range_int8.json or the refused pickle of older versions."""
    folder = Path(path)
    return (folder / DYNAMIC_RANGE_CONFIG).is_file() or (folder / PICKLED_DYNAMIC_RANGE_WEIGHTS).is_file()


def load_checkpoint_model(folder: str | Path) -> PreTrainedModel:
    """The model of a checkpoint folder: a dynamic-range one (`load_dynamic_range`) when `is_dynamic_range_folder`,
    else what `from_pretrained` loads."""
    if is_dynamic_range_folder(folder):
        return load_dynamic_range(folder)
    return AutoModelForCausalLM.from_pretrained(folder)


def qat_filter():
    """torchao filter: Linear layers that QAT and its conversion may touch."""
    precise = set(precise_module_names())
    return lambda module, name: isinstance(module, nn.Linear) and name.split(".")[-1] not in precise


def prepare_qat(model: PreTrainedModel) -> PreTrainedModel:
    """Insert int8 fake quantizers (per-channel weights, per-token activations) for quantization-aware training."""
    require_scheme("torchao-int8-dynamic")
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    activations = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weights = IntxFakeQuantizeConfig(torch.int8, "per_channel")
    config = QATConfig(activation_config=activations, weight_config=weights, step="prepare")
    quantize_(model, config, filter_fn=qat_filter())
    return model


def convert_qat(model: PreTrainedModel) -> PreTrainedModel:
    """Turn a QAT-prepared model into real int8 weights with dynamic int8 activations."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    is_fake_quantized = lambda module, name: isinstance(module, FakeQuantizedLinear)  # noqa: E731
    quantize_(model, QATConfig(step="convert"), filter_fn=is_fake_quantized)
    quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=qat_filter())
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored (int8 data plus scales for quantized layers); tied weights once."""
    total = 0
    unique = {id(tensor): tensor for tensor in model.state_dict(keep_vars=True).values()}
    for tensor in unique.values():
        if isinstance(tensor, torch.Tensor):
            total += _tensor_bytes(tensor)
        elif isinstance(tensor, tuple):  # dynamic-range packed params: (weight, bias)
            total += sum(_tensor_bytes(part) for part in tensor if isinstance(part, torch.Tensor))
    return total


def _tensor_bytes(tensor: torch.Tensor) -> int:
    if tensor.is_quantized:  # per-channel: a float64 scale and an int64 zero point per output channel
        return tensor.numel() * tensor.element_size() + tensor.q_per_channel_scales().numel() * 16
    if hasattr(tensor, "__tensor_flatten__"):  # torchao tensor subclasses: count their inner tensors
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def quantize_main(argv: list[str] | None = None) -> None:
    """`fastgpt quantize CHECKPOINT OUTPUT --scheme SCHEME`: write an int8 copy of a float checkpoint, with its
    tokenizer and generation config.

    OUTPUT must be new or empty, or replaced whole with `--overwrite`; it is written beside its final name and
    renamed into place, under a lock that refuses a second writer. The checkpoint itself, or a folder holding it,
    is refused as OUTPUT even with `--overwrite`. All refusals come before the model is loaded.
    """
    parser = argparse.ArgumentParser(
        prog="fastgpt quantize",
        description="Quantize a FastGPT checkpoint to int8 and save it with the checkpoint's tokenizer.",
    )
    parser.add_argument("checkpoint", help="folder of a float FastGPT checkpoint (save_pretrained output)")
    parser.add_argument("output", help="folder to write the quantized checkpoint to (new or empty)")
    parser.add_argument("--scheme", choices=SCHEMES, default="torchao-int8-weight", help="see fastgpt_hf.quantization")
    parser.add_argument("--overwrite", action="store_true", help="replace what OUTPUT holds with the new checkpoint")
    args = parser.parse_args(argv)
    if not Path(args.checkpoint, "config.json").exists():
        parser.error(f"{args.checkpoint} is not a checkpoint folder (no config.json)")
    output = Path(args.output)
    refuse_unwritable(output, [Path(args.checkpoint)])
    with writer_lock(output):
        if not args.overwrite:
            refuse_occupied(output, "pass --overwrite to replace them, or another output folder")
        model = load_quantized(args.checkpoint, args.scheme)
        with staged_folder(output) as staging:
            if args.scheme == "dynamic-range":
                save_dynamic_range(model, staging)
            else:
                model.save_pretrained(staging)
            copied_tokenizer = copy_tokenizer(Path(args.checkpoint), staging)
    tokenizer_note = "its tokenizer copied" if copied_tokenizer else f"no tokenizer ({args.checkpoint} has none)"
    print(f"{args.scheme}: {weight_bytes(model) / 2**20:.1f} MiB of weights written to {args.output}, {tokenizer_note}")


def copy_tokenizer(checkpoint: Path, folder: Path) -> bool:
    """Save the tokenizer of `checkpoint` (chat template and padding side included) into `folder`, so that the
    quantized folder opens alone in `pipeline(...)` and `fastgpt generate`; False when `checkpoint` has none."""
    if not any((checkpoint / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return False
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(folder)
    return True
