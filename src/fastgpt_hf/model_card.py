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

Uploads send only what a model repository needs (`MODEL_REPO_FILES`, `MODEL_REPO_FOLDERS`): a `.env`, notes,
`training_args.bin` or `checkpoint-N/` folders beside the weights stay home unless `fastgpt push --include` names
them, and the files left out are reported.

This module is not part of the code copied beside the weights: `FastGPTCheckpointMixin.save_pretrained` and
`push_to_hub` (`checkpoints`) import it lazily and do without it when the package is absent.
"""

import argparse
import glob
import json
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import transformers
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects
from transformers import PreTrainedModel
from transformers.utils import logging

from .configuration_fastgpt import FASTGPT_HF_VERSION, GLOBAL_BRANCH_TYPES, SELECTIVE
from .quantization import DYNAMIC_RANGE_CONFIG, SCHEMES, load_checkpoint_model, precise_module_names

logger = logging.get_logger(__name__)

if TYPE_CHECKING:  # both import heavier libraries (datasets) than a card needs; saving a model imports this module
    from .benchmarking import GenerationSpeed
    from .data import Perplexity

CARD_TAGS = ["fastgpt", "custom_code", "efficient-attention", "sliding-window-attention", "long-context"]
# The card's pipeline tag, by the Auto class of the model's task (`checkpoint_auto_classes`).
PIPELINE_TAGS = {"AutoModelForCausalLM": "text-generation", "AutoModelForImageTextToText": "image-text-to-text"}
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
# What a model repository needs: fnmatch patterns for the names of the files at the top of a checkpoint folder
# (weights, configs, tokenizer and processor files, the modeling code save_pretrained copied, the card and its
# results), then patterns for the folders Transformers writes (relative paths).
MODEL_REPO_FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "adapter_config.json",
    "*.py",
    "README.md",
    "*results.json",
    DYNAMIC_RANGE_CONFIG,
)
MODEL_REPO_FOLDERS = ("additional_chat_templates/*.jinja",)


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
    """One row per layer of the (language) model for the card's layer table: index, type, window (and the attention
    sinks every window also sees), global branch, sparsity."""
    config = model.config.get_text_config(decoder=True)
    sparsities = model.get_decoder().attention_sparsity(sparsity_length)
    global_branch = f"{config.num_memory_tokens} memory slots + 1 entry per {config.compress_block_size} positions"
    selected = f" + the tokens of its top {config.num_selected_blocks} blocks"
    sinks = f" + the first {config.num_sink_tokens} tokens" if config.num_sink_tokens else ""
    return [
        {
            "index": index,
            "type": layer_type,
            "window": f"{window}{sinks}" if (window := config.attention_window(layer_type)) else "all",
            "global_branch": global_branch + (selected if layer_type == SELECTIVE else "")
            if layer_type in GLOBAL_BRANCH_TYPES
            else "",
            "sparsity": f"{sparsity:.1%}",
        }
        for index, (layer_type, sparsity) in enumerate(zip(config.layer_types, sparsities, strict=True))
    ]


def model_description(model: PreTrainedModel) -> str:
    """What the card's first sentence calls `model`: a causal language model, or a captioning model and its
    vision encoder."""
    if model.config.get_text_config(decoder=True) is model.config:
        return "FastGPT causal language model"
    vision_type = model.config.vision_config.model_type
    return f"FastGPT captioning model (a FastGPT language model reading a `{vision_type}` vision encoder's features)"


def build_model_card(
    model: PreTrainedModel,
    model_id: str,
    results: list[EvalResult] | None = None,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
) -> ModelCard:
    """The README.md card of a FastGPT `model` (text or captioning) published as `model_id` (a Hub repo id or a
    folder name)."""
    config = model.config.get_text_config(decoder=True)
    auto_class = next(name for name in model.checkpoint_auto_classes if name != "AutoModel")
    card_data = ModelCardData(
        model_name=model_id,
        library_name="transformers",
        pipeline_tag=PIPELINE_TAGS[auto_class],
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
        description=model_description(model),
        auto_class=auto_class,
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


@dataclass(frozen=True)
class UploadSelection:
    """The files of a checkpoint folder that an upload sends and those it leaves out (POSIX paths relative to the
    folder, sorted); `uploaded` maps each path to its size in bytes."""

    folder: Path
    uploaded: dict[str, int]
    left_out: list[str]


def select_upload(folder: str | Path, include: Sequence[str] = ()) -> UploadSelection:
    """Split the files of `folder` into what a model repository needs plus what `include` adds, and the rest.

    Needed: the top-level files matching `MODEL_REPO_FILES` and the files matching `MODEL_REPO_FOLDERS`.
    `include` holds fnmatch patterns matched against paths relative to `folder`; as in `hf upload --include`,
    `*` crosses folders (`*.txt` takes every text file, `checkpoint-2/*` a whole folder). huggingface_hub's
    default ignores (`.git/`, `.cache/huggingface/`) always apply.
    """
    folder = Path(folder)
    paths = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    paths = list(filter_repo_objects(paths, ignore_patterns=DEFAULT_IGNORE_PATTERNS))
    top_level = [path for path in paths if "/" not in path]
    chosen = {
        *filter_repo_objects(top_level, allow_patterns=list(MODEL_REPO_FILES)),
        *filter_repo_objects(paths, allow_patterns=[*MODEL_REPO_FOLDERS, *include]),
    }
    uploaded = {path: (folder / path).stat().st_size for path in paths if path in chosen}
    return UploadSelection(folder, uploaded, [path for path in paths if path not in chosen])


def left_out_summary(left_out: list[str]) -> str:
    """One line naming the files an upload leaves out, a folder's files counted under the folder's name."""
    entries = Counter(f"{path.split('/')[0]}/" if "/" in path else path for path in left_out)
    names = ", ".join(f"{entry} ({count} files)" if entry.endswith("/") else entry for entry, count in entries.items())
    return f"left out {len(left_out)} files that a model repository does not need: {names}"


def upload_selection(
    selection: UploadSelection,
    repo_id: str,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> str:
    """Create `repo_id` if needed and upload the selected files in one commit; returns the commit URL.

    `token` None uses `HF_TOKEN` or the token `hf auth login` stored."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=selection.folder,
        # Exact paths, not the patterns: fnmatch's `*` crosses folders, so `*.safetensors` would also send
        # checkpoint-N/model.safetensors.
        allow_patterns=[glob.escape(path) for path in selection.uploaded],
        commit_message=commit_message or "Upload FastGPT checkpoint",
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
    )
    return commit.commit_url


def upload_checkpoint(
    folder: str | Path,
    repo_id: str,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    include: Sequence[str] = (),
) -> str:
    """Upload the files of `folder` that a model repository needs, plus those matching `include` (see
    `select_upload`), to `repo_id` in one commit, warning about the files left out; returns the commit URL.

    `model.push_to_hub` and `save_pretrained(push_to_hub=True)` upload through here."""
    selection = select_upload(folder, include)
    if selection.left_out:
        logger.warning(left_out_summary(selection.left_out))
    return upload_selection(selection, repo_id, private, token, commit_message, commit_description, revision, create_pr)


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
    """`model.push_to_hub`: save the model with its card (replacing the repo's README.md) in a temporary folder and
    upload it through `upload_checkpoint`."""
    tags = [*(model.model_tags or []), *(tags or [])]
    with tempfile.TemporaryDirectory() as folder:
        write_model_card(model, folder, model_id=repo_id, tags=tags)
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        return upload_checkpoint(
            folder, repo_id, private, token, commit_message, commit_description, revision, create_pr
        )


def load_checkpoint(parser: argparse.ArgumentParser, checkpoint: str) -> PreTrainedModel:
    """The model of a checkpoint folder (float or dynamic-range int8), or a parser error saying that the folder is
    not one."""
    if not Path(checkpoint, "config.json").exists():
        parser.error(f"{checkpoint} is not a checkpoint folder (no config.json)")
    return load_checkpoint_model(checkpoint)


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
    """`fastgpt push CHECKPOINT REPO_ID [--include PATTERN] [--dry-run] [--private]`: upload what a model repository
    needs from a checkpoint folder, with its card; prints the files and their sizes first, and the files left out."""
    parser = argparse.ArgumentParser(
        prog="fastgpt push",
        description="Upload a FastGPT checkpoint to the Hub: config, weights, tokenizer and processor files, "
        "generation config, the modeling code, the card and results; nothing else (.env, notes, training_args.bin, "
        "checkpoint-N/ ...) unless --include names it. The token comes from HF_TOKEN or `hf auth login`.",
    )
    parser.add_argument("checkpoint", help="folder of a FastGPT checkpoint (save_pretrained output)")
    parser.add_argument("repo_id", help="Hub repository, e.g. user/fastgpt-small")
    parser.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also upload the files matching this fnmatch pattern, relative to the folder (repeatable; `*` crosses "
        "folders as in `hf upload --include`)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print what would be uploaded; upload nothing")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument(
        "--token",
        help="Hub token (default: HF_TOKEN, else the one `hf auth login` stored); a command line is visible to other "
        "users of this machine, so prefer HF_TOKEN",
    )
    args = parser.parse_args(argv)
    model = load_checkpoint(parser, args.checkpoint)  # also checks that the weights fit the config
    card_missing = not Path(args.checkpoint, "README.md").exists()
    if card_missing and not args.dry_run:
        write_model_card(model, args.checkpoint, model_id=args.repo_id)
    selection = select_upload(args.checkpoint, args.include)
    print(f"{'would upload' if args.dry_run else 'uploading'} {len(selection.uploaded)} files to {args.repo_id}:")
    for path, size in selection.uploaded.items():
        print(f"{size:>15,}  {path}")
    if card_missing and args.dry_run:
        print(f"{'':>15}  README.md (the model card, written before uploading)")
    if selection.left_out:
        print(f"{left_out_summary(selection.left_out)} (upload one with --include PATTERN)")
    if args.dry_run:
        return
    try:
        url = upload_selection(selection, args.repo_id, private=args.private or None, token=args.token)
    except HfHubHTTPError as error:
        raise ValueError(
            f"the Hub refused the upload to {args.repo_id} ({str(error).strip().splitlines()[0]}); check the "
            "repository name and that the token (HF_TOKEN, `hf auth login` or --token) may write to it"
        ) from None
    print(f"pushed {args.checkpoint} to {url}")
