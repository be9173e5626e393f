"""FastGPT checkpoints: strict loading, saving with the copied code and the model card, Hub uploads.

`FastGPTCheckpointMixin` gives every registered model class (`FastGPTModel`, `FastGPTForCausalLM`, `FastGPTVLModel`,
`FastGPTForConditionalGeneration`) the same `from_pretrained`, `save_pretrained` and `push_to_hub`:

- Loading is strict. Transformers' `from_pretrained` only warns about missing, unexpected and mis-shaped tensors and
  initialises the missing ones at random; for FastGPT that would silently give random memory slots, compressors or
  gates (and random projections anywhere else). `strict_from_pretrained` asks Transformers for its loading report
  and `check_loading_report` raises one `ValueError` listing every problem tensor. Tied weights (`lm_head` tied to
  the embedding) are not missing: Transformers removes them from the report. A folder of another major.minor
  fastgpt_hf version is refused by its config (`FastGPTConfig.validate_version`, also a captioning model's
  `text_config`) before any weight is read.
- Saving copies this module with the rest of the modeling code (a flat set of files with relative imports) and
  maps every class of `checkpoint_auto_classes` in config.json's `auto_map`, so that the checkpoint loads with
  `trust_remote_code=True` where this package is absent; where it is installed, a README.md model card is written
  (`model_card`, which does not travel with the code).

This module imports the package's `model_card` and `quantization` by name (`optional_package_module`), never with an
import statement: Transformers copies a module's relative imports beside the weights, and those two stay home.
"""

import importlib
import json
import os
from collections.abc import Callable
from types import ModuleType

from safetensors import SafetensorError
from transformers.modeling_utils import PreTrainedModel


def loading_problems(loading_report: dict, ignore_mismatched_sizes: bool) -> list[str]:
    """Lines naming each missing, unexpected and (unless ignored) mis-shaped tensor of a loading report.

    `loading_report` is `from_pretrained(..., output_loading_info=True)`'s dict: `missing_keys` and
    `unexpected_keys` sets of names, `mismatched_keys` a set of (name, checkpoint shape, model shape).
    """
    problems = [f"missing from the checkpoint: {name}" for name in sorted(loading_report["missing_keys"])]
    problems += [f"unexpected in the checkpoint: {name}" for name in sorted(loading_report["unexpected_keys"])]
    if not ignore_mismatched_sizes:
        problems += [
            f"mis-shaped: {name} is {tuple(checkpoint_shape)} in the checkpoint, {tuple(model_shape)} in the model"
            for name, checkpoint_shape, model_shape in sorted(loading_report["mismatched_keys"])
        ]
    return problems


def check_loading_report(
    checkpoint: str | os.PathLike, model_class_name: str, loading_report: dict, ignore_mismatched_sizes: bool
) -> None:
    """Raise a `ValueError` naming every tensor of `checkpoint` that does not fit `model_class_name`."""
    problems = loading_problems(loading_report, ignore_mismatched_sizes)
    if not problems:
        return
    listing = "\n  ".join(problems)
    raise ValueError(
        f"The checkpoint {checkpoint} does not fit {model_class_name} as its config.json describes it:\n  {listing}\n"
        "FastGPT refuses to fill these with random values. Check that config.json belongs to these weights "
        "(layer_types, num_memory_tokens, head sizes); to re-initialise mis-shaped tensors on purpose pass "
        "ignore_mismatched_sizes=True, and to start from partial weights build the model from its config and "
        "call load_state_dict(state_dict, strict=False)."
    )


def strict_from_pretrained(
    load: Callable[..., tuple[PreTrainedModel, dict]],
    model_class_name: str,
    pretrained_model_name_or_path: str | os.PathLike,
    *model_args,
    **kwargs,
):
    """`load` (a class's `PreTrainedModel.from_pretrained`), strict: missing, unexpected or (unless
    `ignore_mismatched_sizes=True`) mis-shaped tensors and unreadable weights files raise a `ValueError` naming them
    instead of leaving random values. Returns the model, or `(model, loading_report)` with `output_loading_info`."""
    output_loading_info = kwargs.pop("output_loading_info", False)
    ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
    # Transformers would raise its own RuntimeError on mis-shaped tensors; let the report reach the check.
    try:
        model, loading_report = load(
            pretrained_model_name_or_path,
            *model_args,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            **kwargs,
        )
    except (SafetensorError, json.JSONDecodeError) as error:
        raise ValueError(
            f"The checkpoint {pretrained_model_name_or_path} could not be read ({type(error).__name__}: {error}): "
            "a weights file or its index is truncated or corrupt; save or download it again."
        ) from error
    check_loading_report(pretrained_model_name_or_path, model_class_name, loading_report, ignore_mismatched_sizes)
    return (model, loading_report) if output_loading_info else model


# What `save_pretrained(..., push_to_hub=True)` passes on to the upload (`model_card.upload_checkpoint`).
HUB_OPTIONS = ("repo_id", "private", "token", "commit_message", "commit_description", "revision", "create_pr")


def optional_package_module(name: str) -> ModuleType | None:
    """The module `name` of fastgpt_hf, or None where this file runs as a checkpoint's copied code without it.

    Imported by name, not by an import statement, so that Transformers does not copy it beside the weights.
    """
    try:
        return importlib.import_module(f".{name}", __package__)
    except ModuleNotFoundError as error:
        if error.name != f"{__package__}.{name}":
            raise
        return None


class FastGPTCheckpointMixin:
    """`from_pretrained`, `save_pretrained` and `push_to_hub` of every FastGPT model class (before `PreTrainedModel`
    among the bases). A class using it declares `checkpoint_auto_classes`: Auto class name -> name of a model class
    of its own module, the classes a saved checkpoint's `auto_map` points at in the copied code."""

    checkpoint_auto_classes: dict[str, str]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, strict: missing, unexpected or (unless `ignore_mismatched_sizes=True`)
        mis-shaped tensors raise a `ValueError` naming them (`strict_from_pretrained`) instead of random
        initialisation.

        A folder written by `fastgpt quantize --scheme dynamic-range` loads through the package's
        `quantization.load_dynamic_range` (where the package is installed), so that `pipeline(...)` opens it too; it
        stays a float32 CPU model whatever loading options are passed."""
        quantization = optional_package_module("quantization")
        if (
            quantization is not None
            and pretrained_model_name_or_path is not None  # None: a config-only load (Transformers' tests do it)
            and quantization.is_dynamic_range_folder(pretrained_model_name_or_path)
        ):
            return quantization.load_dynamic_range(pretrained_model_name_or_path)
        return strict_from_pretrained(
            super().from_pretrained, cls.__name__, pretrained_model_name_or_path, *model_args, **kwargs
        )

    def save_pretrained(self, save_directory: str | os.PathLike, *args, push_to_hub: bool = False, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained` (code and `auto_map` included), plus a README.md model card when the
        folder has none and the fastgpt_hf package is installed (the card generator does not travel with the code).

        With `push_to_hub=True` (and `repo_id`, `token`, `private`, `commit_message`, ... as in Transformers) the
        files of the folder that a model repository needs are then uploaded (`model_card.upload_checkpoint`, which
        warns about the rest): Transformers' own push would replace the card with a generic one."""
        model_card = optional_package_module("model_card")
        hub_options = {}
        if push_to_hub and model_card is not None:
            hub_options = {key: kwargs.pop(key) for key in HUB_OPTIONS if key in kwargs}
            hub_options.setdefault("repo_id", os.path.basename(os.path.normpath(save_directory)))
        if self.is_remote_code():  # the code is copied: map every model class it holds, not only this one
            self.config.auto_map = {**getattr(self.config, "auto_map", {}), **self.copied_code_auto_map()}
        super().save_pretrained(save_directory, *args, push_to_hub=push_to_hub and not hub_options, **kwargs)
        if model_card is None or not kwargs.get("is_main_process", True):
            return
        if not os.path.exists(os.path.join(save_directory, "README.md")):
            model_card.write_model_card(self, save_directory, model_id=hub_options.get("repo_id"))
        if hub_options:
            model_card.upload_checkpoint(save_directory, **hub_options)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """`PreTrainedModel.push_to_hub` with the FastGPT model card as README.md when the package is installed."""
        model_card = optional_package_module("model_card")
        if model_card is None:
            return super().push_to_hub(repo_id, **kwargs)
        return model_card.push_model(self, repo_id, **kwargs)

    @classmethod
    def copied_code_auto_map(cls) -> dict[str, str]:
        """`auto_map` entries of `checkpoint_auto_classes`: Auto class -> `module.Class` among the copied files."""
        module = cls.__module__.rsplit(".", 1)[-1]
        return {auto_class: f"{module}.{name}" for auto_class, name in cls.checkpoint_auto_classes.items()}
