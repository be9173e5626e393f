"""Model cards and Hub uploads of FastGPT checkpoints: `fastgpt card` and `fastgpt push`.

`build_model_card` renders `templates/model_card.md` (the repository's `model_cards/template.md` links to it)
through `huggingface_hub.ModelCard`: the metadata block (library, pipeline, tags, license, datasets and a
model-index of the evaluation results passed in), the layer stack with each layer's window and sparsity,
intended use, limitations, quantization notes and how to load the checkpoint with and without this package.

Results files (`--results results.json`) hold a list of `huggingface_hub.EvalResult` fields, e.g.
`[{"dataset_type": "wikitext", "dataset_name": "WikiText-2", "dataset_split": "test", "metric_type": "perplexity",
"metric_value": 31.4}]` (`task_type` defaults to `text-generation`), as `fastgpt eval --json` and
`fastgpt bench --json` write them (`perplexity_results`, `speed_results`, `write_results`), or a JSON object with
such a list under `eval_results`: the demo's results.json, whose list is FastGPT's validation perplexity.

This module is not part of the code copied beside the weights: `FastGPTPreTrainedModel.save_pretrained` and
`push_to_hub` import it lazily and do without it when the package is absent.
"""

import argparse
import json
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import transformers
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from transformers import AutoModelForCausalLM, PreTrainedModel

from .configuration_fastgpt import DYNAMIC, FASTGPT_HF_VERSION, SLIDING
from .quantization import SCHEMES, precise_module_names

if TYPE_CHECKING:  # both import heavier libraries (datasets) than a card needs; saving a model imports this module
    from .benchmarking import GenerationSpeed
    from .data import Perplexity

CARD_TAGS = ["fastgpt", "custom_code", "efficient-attention", "sliding-window-attention", "long-context"]
SPARSITY_LENGTH = 4096  # DESIGN.md section 3 quotes the stages' sparsity at this length
# Config values the template prints under the layer table.
CARD_CONFIG_FIELDS = (
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "compress_block_size",
)


# EvalResult dataset fields of the WikiText-2 (v1) validation excerpt shipped in `fastgpt_hf/corpus/`.
SHIPPED_VALIDATION_DATASET = {
    "dataset_type": "wikitext",
    "dataset_name": "WikiText-2 (validation excerpt)",
    "dataset_config": "wikitext-2-v1",
    "dataset_split": "validation",
}
RESULTS_FORMATS = (
    "a JSON list of objects with huggingface_hub.EvalResult fields (what `fastgpt eval --json` and "
    "`fastgpt bench --json` write) or a JSON object with such a list under `eval_results` (the demo's results.json)"
)


def read_results(path: str | Path) -> list[EvalResult]:
    """The evaluation results of a results file: any of `RESULTS_FORMATS` (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"results file not found: {path}")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON ({error}); it must hold {RESULTS_FORMATS}.") from None
    entries = content.get("eval_results") if isinstance(content, dict) else content
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ValueError(f"{path} must hold {RESULTS_FORMATS}.")
    try:
        return [EvalResult(**{"task_type": "text-generation", **entry}) for entry in entries]
    except TypeError as error:
        raise ValueError(
            f"{path}: each result needs dataset_type, dataset_name, metric_type and metric_value and may only use "
            f"huggingface_hub.EvalResult's fields ({error})."
        ) from error


def write_results(path: str | Path, results: list[dict]) -> None:
    """Write `results` (EvalResult fields) as the JSON list that `read_results` and `fastgpt card` read."""
    Path(path).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def text_dataset(file: str | Path | None, max_chars: int | None = None) -> dict:
    """EvalResult dataset fields of an evaluated text file; the shipped validation excerpt when `file` is None."""
    dataset = {"dataset_type": "text", "dataset_name": Path(file).name} if file else dict(SHIPPED_VALIDATION_DATASET)
    if max_chars is not None:
        dataset["dataset_args"] = {"max_chars": max_chars}
    return dataset


def perplexity_results(perplexity: "Perplexity", dataset: dict, window: int, stride: int) -> list[dict]:
    """EvalResult fields of a strided perplexity (`fastgpt_hf.data.evaluate_perplexity`) on `dataset`.

    Two results: perplexity per token of the tokenizer and per WikiText word, rounded to 2 decimals; the window
    and stride (tokens) and the token or word count go in `metric_args`.
    """
    return [
        {
            **dataset,
            "metric_type": "perplexity",
            "metric_name": f"perplexity per {unit}",
            "metric_value": round(value, 2),
            "metric_args": {"window": window, "stride": stride, f"{unit}s": count},
        }
        for unit, value, count in (
            ("token", perplexity.per_token, perplexity.tokens),
            ("word", perplexity.per_word, perplexity.words),
        )
    ]


def speed_results(speeds: "list[GenerationSpeed]", new_tokens: int, device: str) -> list[dict]:
    """EvalResult fields of `generation_speed` measurements (batch 1, greedy, random prompt), three per length.

    Seconds to the first new token, decode tokens/s and cache MiB; `device` (e.g. `cpu`) and `new_tokens` go in
    `metric_args`, since wall-clock figures mean nothing without them.
    """
    setting = {"batch_size": 1, "new_tokens": new_tokens, "device": device}
    return [
        {
            "dataset_type": "random-tokens",
            "dataset_name": f"random {speed.prompt_length}-token prompt",
            "metric_type": metric_type,
            "metric_name": metric_name,
            "metric_value": round(value, 3),
            "metric_args": setting,
        }
        for speed in speeds
        for metric_type, metric_name, value in (
            ("seconds", "time to first token (s)", speed.prefill_seconds),
            ("tokens_per_second", "decode tokens/s", speed.decode_tokens_per_second),
            ("mebibytes", "cache MiB", speed.cache_mib),
        )
    ]


def layer_rows(model: PreTrainedModel, sparsity_length: int) -> list[dict]:
    """One row per layer for the card's layer table: index, type, window, global branch, sparsity."""
    config = model.config
    sparsities = model.attention_sparsity(sparsity_length)
    windows = {SLIDING: config.sliding_window, DYNAMIC: config.dynamic_window}
    global_branch = f"{config.num_memory_tokens} memory slots + 1 entry per {config.compress_block_size} positions"
    return [
        {
            "index": index,
            "type": layer_type,
            "window": windows.get(layer_type, "all"),
            "global_branch": global_branch if layer_type == DYNAMIC else "",
            "sparsity": f"{sparsity:.1%}",
        }
        for index, (layer_type, sparsity) in enumerate(zip(config.layer_types, sparsities, strict=True))
    ]


def build_model_card(
    model: PreTrainedModel,
    model_id: str,
    results: list[EvalResult] | None = None,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
) -> ModelCard:
    """The README.md card of a FastGPT `model` published as `model_id` (a Hub repo id or a folder name)."""
    config = model.config
    card_data = ModelCardData(
        model_name=model_id,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        datasets=["wikitext"] if datasets is None else datasets,
        tags=[*CARD_TAGS, *(tag for tag in tags or [] if tag not in CARD_TAGS)],
        eval_results=results or None,
    )
    sparsity_length = min(SPARSITY_LENGTH, config.max_position_embeddings)
    template = resources.files(__package__).joinpath("templates/model_card.md").read_text(encoding="utf-8")
    return ModelCard.from_template(
        card_data,
        template_str=template,
        model_id=model_id,
        results=results or [],
        num_parameters=f"{model.num_parameters():,}",
        fastgpt_hf_version=FASTGPT_HF_VERSION,
        transformers_version=transformers.__version__,
        sparsity_length=sparsity_length,
        layers=layer_rows(model, sparsity_length),
        quantization_schemes=", ".join(f"`{scheme}`" for scheme in SCHEMES),
        precise_modules=", ".join(f"`{name}`" for name in precise_module_names()),
        **{field: getattr(config, field) for field in CARD_CONFIG_FIELDS},
    )


def write_model_card(
    model: PreTrainedModel,
    folder: str | Path,
    results: list[EvalResult] | None = None,
    model_id: str | None = None,
    tags: list[str] | None = None,
) -> Path:
    """Write `folder`/README.md, the card of `model` (named after the folder unless `model_id` is given)."""
    folder = Path(folder)
    card = build_model_card(model, model_id or folder.resolve().name, results=results, tags=tags)
    readme = folder / "README.md"
    card.save(readme)
    return readme


def upload_checkpoint(
    folder: str | Path,
    repo_id: str,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> str:
    """Create `repo_id` if needed and upload every file of `folder` in one commit; returns the commit URL."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message or "Upload FastGPT checkpoint",
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
    )
    return commit.commit_url


def push_model(
    model: PreTrainedModel,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
) -> str:
    """`model.push_to_hub`: save the model with its card (replacing the repo's README.md) and upload the folder."""
    tags = [*(model.model_tags or []), *(tags or [])]
    with tempfile.TemporaryDirectory() as folder:
        write_model_card(model, folder, model_id=repo_id, tags=tags)
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        return upload_checkpoint(
            folder, repo_id, private, token, commit_message, commit_description, revision, create_pr
        )


def load_checkpoint(parser: argparse.ArgumentParser, checkpoint: str) -> PreTrainedModel:
    """The model of a checkpoint folder, or a parser error saying that the folder is not one."""
    if not Path(checkpoint, "config.json").exists():
        parser.error(f"{checkpoint} is not a checkpoint folder (no config.json)")
    return AutoModelForCausalLM.from_pretrained(checkpoint)


def card_main(argv: list[str] | None = None) -> None:
    """`fastgpt card CHECKPOINT [--results results.json]`: write the checkpoint's README.md model card."""
    parser = argparse.ArgumentParser(prog="fastgpt card", description="Write a FastGPT checkpoint's model card.")
    parser.add_argument("checkpoint", help="folder of a FastGPT checkpoint (save_pretrained output)")
    parser.add_argument(
        "--results",
        help="evaluation results: the JSON that `fastgpt eval --json` or `fastgpt bench --json` writes, the demo's "
        "results.json, or any JSON list of huggingface_hub.EvalResult fields",
    )
    parser.add_argument("--model-id", help="the name the card uses (default: the folder name)")
    args = parser.parse_args(argv)
    model = load_checkpoint(parser, args.checkpoint)
    results = read_results(args.results) if args.results else None
    readme = write_model_card(model, args.checkpoint, results=results, model_id=args.model_id)
    print(f"wrote {readme}")


def push_main(argv: list[str] | None = None) -> None:
    """`fastgpt push CHECKPOINT REPO_ID [--private] [--token TOKEN]`: upload a checkpoint folder with its card."""
    parser = argparse.ArgumentParser(prog="fastgpt push", description="Upload a FastGPT checkpoint to the Hub.")
    parser.add_argument("checkpoint", help="folder of a FastGPT checkpoint (save_pretrained output)")
    parser.add_argument("repo_id", help="Hub repository, e.g. user/fastgpt-small")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--token", help="Hub token (default: the one `hf auth login` stored)")
    args = parser.parse_args(argv)
    model = load_checkpoint(parser, args.checkpoint)  # also checks that the weights fit the config
    if not Path(args.checkpoint, "README.md").exists():
        write_model_card(model, args.checkpoint, model_id=args.repo_id)
    url = upload_checkpoint(args.checkpoint, args.repo_id, private=args.private or None, token=args.token)
    print(f"pushed {args.checkpoint} to {url}")
