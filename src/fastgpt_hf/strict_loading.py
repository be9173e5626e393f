"""Strict checkpoint loading: tensors that do not match the model are an error that names them.

Transformers' `from_pretrained` only warns about missing, unexpected and mis-shaped tensors and initialises the
missing ones at random; for FastGPT that would silently give random memory slots, compressors or gates (and
random projections anywhere else). The `from_pretrained` of every FastGPT model class (text and captioning) goes
through `strict_from_pretrained`, which asks Transformers for its loading report and passes it to
`check_loading_report`, which raises one `ValueError` listing every problem tensor.
Tied weights (`lm_head` tied to the embedding) are not missing: Transformers removes them from the report.
"""

import json
import os
from collections.abc import Callable

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
