"""The pair every subcommand compares: a FastGPT of a preset's shape and the LlamaForCausalLM of the same shape
(`fastgpt_hf.training.llama_config`), random weights, on one device; and the options that choose them.

`--preset` names a shape of `fastgpt_hf.presets`; `--set KEY=VALUE` overrides any config field (VALUE read as JSON
when it parses, else as a string: `--set sliding_window=256 'layer_types=["sliding_attention"]'`); `--layers N`
keeps N layers; `--layer-kind K` makes every layer of kind K.
"""

import argparse
import json

import torch
from transformers import LlamaForCausalLM, PreTrainedModel

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM
from fastgpt_hf.configuration_fastgpt import LAYER_TYPES
from fastgpt_hf.presets import PRESETS
from fastgpt_hf.training import llama_config

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


class DeviceUnavailable(Exception):
    """The subcommand was asked for a device this machine does not have; bench.py reports it as a skip."""


def config_override(text: str) -> tuple[str, object]:
    """`"KEY=VALUE"` -> (KEY, VALUE read as JSON, or the string itself)."""
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE, got {text!r}.")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_model_arguments(parser: argparse.ArgumentParser, preset: str) -> None:
    """--preset, --set, --layers, --layer-kind, --device, --dtype and --threads."""
    parser.add_argument("--preset", default=preset, choices=sorted(PRESETS), help=f"model shape (default {preset})")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        type=config_override,
        metavar="KEY=VALUE",
        help="config fields over the preset's",
    )
    parser.add_argument("--layers", type=int, help="fewer layers than the preset (its default layer layout of that)")
    parser.add_argument("--layer-kind", choices=LAYER_TYPES, help="every layer of this kind")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when there is one, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")


def fastgpt_config(args: argparse.Namespace) -> FastGPTConfig:
    """The preset with `--set`, `--layers` and `--layer-kind` applied."""
    overrides = dict(args.set)
    if args.layers is not None:
        overrides["num_hidden_layers"] = args.layers
    config = FastGPTConfig.from_preset(args.preset, **overrides)
    if args.layer_kind is not None:
        overrides["layer_types"] = [args.layer_kind] * config.num_hidden_layers
        config = FastGPTConfig.from_preset(args.preset, **overrides)
    return config


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """The device and dtype asked for (or their defaults); sets --threads. Raises DeviceUnavailable for cuda without
    a GPU."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("--device cuda: this machine has no CUDA device; --device cpu runs it on the CPU.")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if name == "cuda" else torch.float32)
    return torch.device(name), dtype


def model_pair(config: FastGPTConfig, device: torch.device, dtype: torch.dtype) -> dict[str, PreTrainedModel]:
    """{"Llama": ..., "FastGPT": ...}: random weights initialised straight on `device` in `dtype` (seconds even at
    13b on a GPU), in eval mode, seeded."""
    default_dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            fastgpt = FastGPTForCausalLM(config).eval()
            llama = LlamaForCausalLM(llama_config(config)).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    return {"Llama": llama, "FastGPT": fastgpt}


def parse_shape(text: str) -> tuple[int, int]:
    """`"2048"` -> (1, 2048); `"8x2048"` (or the old `"8:2048"`) -> (8, 2048)."""
    batch, _, length = text.replace(":", "x").rpartition("x")
    try:
        return int(batch or 1), int(length)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is T or BxT (e.g. 2048, 8x2048), got {text!r}.") from None
