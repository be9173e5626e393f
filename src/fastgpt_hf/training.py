"""Training through `transformers.Trainer`: models sized to the tokenizer, precision, arguments, eval perplexity,
checkpoints that are whole or absent, and Ctrl-C that stops with a checkpoint.

- `config_for_tokenizer` checks overrides against `FastGPTConfig` (unknown keys with close matches, refused values
  as one line, a vocabulary smaller than the tokenizer) and gives the vocabulary and special tokens the
  tokenizer's; `model_for_tokenizer` initialises a FastGPT from it. `llama_peer` builds the `LlamaForCausalLM` of
  the same shape (the demo's baseline).
- `choose_precision` turns `auto` into bf16 autocast on CUDA devices that have it, fp16 on older CUDA devices,
  and float32 on the CPU, and logs why when it falls back. bf16 autocast on the CPU may be asked for explicitly.
- `training_arguments` fills `TrainingArguments` for causal-LM training from a few choices (steps, batch,
  accumulation, gradient checkpointing, precision, checkpoint interval); `PerplexityTrainer` adds
  `eval_perplexity = exp(eval_loss)` to every evaluation and writes each `checkpoint-N` folder into a temporary
  folder beside it, renamed into place when complete. `trainer.train(resume_from_checkpoint=...)` continues a run
  where it stopped; `last_complete_checkpoint` finds where, skipping saves cut off by a crash.
- `train_interruptibly` runs `trainer.train` so that a first Ctrl-C stops at the end of the current step with a
  checkpoint (a second one aborts at once); `save_final_model` writes the final model beside the run's checkpoints.
"""

import dataclasses
import difflib
import json
import logging
import math
import os
import re
import signal
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from datasets import Dataset
from huggingface_hub.errors import StrictDataclassError
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    default_data_collator,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from .configuration_fastgpt import FastGPTConfig
from .modeling_fastgpt import FastGPTForCausalLM
from .output_folders import move_into_place, remove, replace_entries, temporary_sibling

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# The fields a LlamaConfig shares with FastGPTConfig: everything but the attention layout.
LLAMA_SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
# Keyword arguments `PreTrainedConfig` takes without a dataclass field of their own.
CONFIG_KEYWORDS = ("attn_implementation", "experts_implementation", "output_attentions", "num_labels", "rope_theta")
# A folder `checkpoint-N` of Trainer's, N its global step; a checkpoint holds one of the weight files.
CHECKPOINT_FOLDER = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)


def config_keys() -> list[str]:
    """Every key `FastGPTConfig` takes: its dataclass fields (PreTrainedConfig's among them) and `CONFIG_KEYWORDS`."""
    return sorted({field.name for field in dataclasses.fields(FastGPTConfig)} | set(CONFIG_KEYWORDS))


def check_config_keys(keys: Iterable[str]) -> None:
    """Raise a ValueError for a key `FastGPTConfig` does not take, naming the keys it may have meant."""
    known = config_keys()
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"did you mean {' or '.join(map(repr, close))}?" if close else f"the keys are {', '.join(known)}."
            raise ValueError(f"FastGPTConfig has no key {key!r}; {hint}")


def config_for_tokenizer(preset: str, tokenizer: PreTrainedTokenizerBase, **overrides) -> FastGPTConfig:
    """`preset` with `overrides`, its vocabulary and special tokens the tokenizer's unless overridden.

    Raises a one-line ValueError for an unknown key, a value the config refuses (its own message), or a
    `vocab_size` below the tokenizer's length (its ids would index past the embedding).
    """
    check_config_keys(overrides)
    vocab_size = overrides.get("vocab_size", len(tokenizer))
    if isinstance(vocab_size, int) and vocab_size < len(tokenizer):
        raise ValueError(
            f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens; leave vocab_size out "
            f"(it defaults to the tokenizer's) or make it at least {len(tokenizer)}."
        )
    special = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    try:
        return FastGPTConfig.from_preset(preset, **{**special, **overrides})
    except (ValueError, TypeError, AttributeError, StrictDataclassError) as error:
        # Strict dataclass errors span lines ("Validation error for field ...:\n    TypeError: ..."); PreTrainedConfig
        # turns a `dtype` string into `getattr(torch, dtype)`, an AttributeError for an unknown name.
        raise ValueError(" ".join(str(error).split())) from None


def initialised_model(config: FastGPTConfig, seed: int = 0) -> FastGPTForCausalLM:
    """A FastGPT of `config` with weights initialised from `seed`."""
    torch.manual_seed(seed)
    return FastGPTForCausalLM(config)


def model_for_tokenizer(
    preset: str, tokenizer: PreTrainedTokenizerBase, seed: int = 0, **overrides
) -> FastGPTForCausalLM:
    """A freshly initialised FastGPT of `preset` (with `overrides`) whose vocabulary is the tokenizer's."""
    return initialised_model(config_for_tokenizer(preset, tokenizer, **overrides), seed)


def llama_config(config: FastGPTConfig) -> LlamaConfig:
    """The `LlamaConfig` of the same shape: FastGPT with every layer full attention."""
    shape = {field: getattr(config, field) for field in LLAMA_SHAPE_FIELDS}
    return LlamaConfig(**shape, attn_implementation=config._attn_implementation)


def llama_peer(config: FastGPTConfig, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised `LlamaForCausalLM` of the same shape (`llama_config`)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(config))


def choose_precision(requested: str = "auto") -> str:
    """`bf16`, `fp16` or `fp32` for `requested` (one of `PRECISIONS`) on this machine."""
    if requested not in PRECISIONS:
        raise ValueError(f"Unknown precision {requested!r}; choose one of {list(PRECISIONS)}.")
    has_cuda = torch.cuda.is_available()
    if requested == "fp16" and not has_cuda:
        raise ValueError("fp16 mixed precision needs a CUDA device; use --precision bf16 or fp32 on the CPU.")
    if requested == "bf16" and has_cuda and not torch.cuda.is_bf16_supported():
        raise ValueError("This CUDA device has no bf16; use --precision fp16 or fp32.")
    if requested != "auto":
        return requested
    if not has_cuda:
        logger.warning("No CUDA device: training in float32 (bf16 autocast on the CPU: --precision bf16).")
        return "fp32"
    if not torch.cuda.is_bf16_supported():
        logger.warning("This CUDA device has no bf16: training with fp16 autocast and loss scaling.")
        return "fp16"
    return "bf16"


def training_arguments(
    output_dir: str | Path,
    max_steps: int,
    batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    learning_rate: float = 1e-3,
    warmup_steps: int = 0,
    eval_steps: int | None = None,
    save_steps: int | None = None,
    logging_steps: int = 10,
    gradient_checkpointing: bool = False,
    precision: str = "auto",
    seed: int = 0,
    show_progress: bool = True,
) -> TrainingArguments:
    """Trainer arguments for causal-LM training: AdamW, cosine decay, no dropout, checkpoints every `save_steps`.

    `eval_steps` / `save_steps` None evaluate / save only where the caller asks; evaluation reports
    `eval_loss` and `eval_perplexity`.
    """
    chosen = choose_precision(precision)
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=0.1,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps,
        logging_steps=logging_steps,
        # Transformers 5.24 renamed `gradient_checkpointing` to `activation_checkpointing`.
        activation_checkpointing=gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        bf16=chosen == "bf16",
        fp16=chosen == "fp16",
        # Trainer takes bf16 without a GPU only when told to stay on the CPU.
        use_cpu=chosen == "bf16" and not torch.cuda.is_available(),
        seed=seed,
        data_seed=seed,
        report_to="none",
        disable_tqdm=not show_progress,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def checkpoint_folder(run_dir: str | Path, step: int | str) -> Path:
    """Where Trainer keeps the checkpoint of global step `step` (or a glob pattern) of the run in `run_dir`."""
    return Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"


class PerplexityTrainer(Trainer):
    """`Trainer` whose evaluations also report perplexity, `exp(eval_loss)` (per token of the tokenizer), whose
    `checkpoint-N` folders are whole or absent, and whose model generates with its cache after training and in
    every folder it saves (`config.use_cache` is `args.use_cache`, False, only while `train` or `evaluate` runs).

    Trainer writes a checkpoint file by file into `<run dir>/checkpoint-N`; here `_get_output_dir` points it at
    `<run dir>/.checkpoint-N.tmp` while it saves, and the finished `checkpoint-N` inside is renamed into place. A
    crash mid-save leaves only the hidden temporary folder, which Trainer's checkpoint search never picks up.
    """

    # The folder Trainer takes for the run's folder while `_save_checkpoint` runs; None otherwise.
    checkpoint_staging: Path | None = None

    def __init__(self, model: PreTrainedModel | None = None, *args, **kwargs) -> None:
        # Trainer sets `config.use_cache` to `args.use_cache` (False: training needs no generation cache) for good.
        # Here that value holds only while `train` and `evaluate` run: the model keeps its own (True unless its
        # config said otherwise) for generation afterwards and in every config.json saved, `checkpoint-N` included.
        self.model_use_cache = getattr(getattr(model, "config", None), "use_cache", None)
        super().__init__(model, *args, **kwargs)
        if self.model_use_cache is not None:
            self.model.config.use_cache = self.model_use_cache

    @contextmanager
    def use_cache_in_config(self, use_cache: bool | None) -> Iterator[None]:
        """While open, the model's `config.use_cache` is `use_cache` (unchanged when None or without a config)."""
        config = getattr(self.model, "config", None)
        if use_cache is None or config is None:
            yield
            return
        previous, config.use_cache = config.use_cache, use_cache
        try:
            yield
        finally:
            config.use_cache = previous

    def train(self, *args, **kwargs):
        with self.use_cache_in_config(self.args.use_cache):
            return super().train(*args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        with self.use_cache_in_config(self.model_use_cache):
            super()._save(output_dir, state_dict)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        with self.use_cache_in_config(self.args.use_cache):
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        loss_key = f"{metric_key_prefix}_loss"
        if loss_key in metrics:
            perplexity = {f"{metric_key_prefix}_perplexity": math.exp(metrics[loss_key])}
            metrics.update(perplexity)
            self.log(perplexity)
        return metrics

    def _get_output_dir(self, trial) -> str:
        # Trainer writes `<this folder>/checkpoint-N`, and reads this only there and where a run ends.
        if self.checkpoint_staging is not None:
            return str(self.checkpoint_staging)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model: torch.nn.Module, trial) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        final = checkpoint_folder(run_dir, self.state.global_step)
        staging = temporary_sibling(final)
        if self.args.should_save:
            remove(staging)  # left by a crash; every rank writes into it once the main one has cleared it
        self.accelerator.wait_for_everyone()
        self.checkpoint_staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.checkpoint_staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self._move_checkpoint_into_place(staging / final.name, final)
            staging.rmdir()
            rotate_checkpoints(
                str(run_dir), self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True
            )

    def _move_checkpoint_into_place(self, written: Path, final: Path) -> None:
        """Rename the written checkpoint to `final`, the best-model path in its trainer state moved with it."""
        if self.state.best_model_checkpoint == str(written):
            self.state.best_model_checkpoint = str(final)
            self.state.save_to_json(str(written / TRAINER_STATE_NAME))
        move_into_place(written, final)


def causal_lm_trainer(
    model: PreTrainedModel,
    args: TrainingArguments,
    train_dataset: Dataset,
    eval_dataset: Dataset | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> PerplexityTrainer:
    """A `PerplexityTrainer` over packed blocks (`input_ids`, `labels`: see `data.pack_blocks`); with `tokenizer`,
    every `checkpoint-N` it saves holds the tokenizer too, so that it opens alone (`pipeline`, `fastgpt generate`)."""
    return PerplexityTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )


class StopRequest(TrainerCallback):
    """Stops training with a checkpoint at the end of the step during which `requested` was set.

    `stopped_at` holds the global step it stopped at (its `checkpoint-N`), None while it has not stopped a run.
    """

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> TrainerControl:
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


@contextmanager
def ctrl_c_requests_stop(stop: StopRequest) -> Iterator[None]:
    """While open, a first Ctrl-C (SIGINT) sets `stop.requested`; a second raises KeyboardInterrupt at once."""

    def handle(signum: int, frame: object) -> None:
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        # os.write: a print could land inside another write to the same stream and raise a reentrancy error.
        os.write(2, b"\nCtrl-C: stopping after this step with a checkpoint; Ctrl-C again aborts without saving\n")

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def train_interruptibly(trainer: Trainer, resume_from_checkpoint: str | Path | None = None) -> int | None:
    """`trainer.train()` in which a first Ctrl-C stops at the end of the current step and saves `checkpoint-N`.

    Returns N, the step it stopped at, or None when the run finished. A second Ctrl-C raises KeyboardInterrupt
    at once (a checkpoint being written then is left as a temporary folder, never as `checkpoint-N`). For one
    process: ranks that each see the signal at another step would stop apart.
    """
    checkpoint = None if resume_from_checkpoint is None else str(resume_from_checkpoint)
    stop = StopRequest()
    trainer.add_callback(stop)
    try:
        with ctrl_c_requests_stop(stop):
            trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        trainer.remove_callback(stop)
    return stop.stopped_at


def checkpoint_problem(folder: Path) -> str | None:
    """What keeps a resume from loading `folder` (a save cut off by a crash), or None when it is complete.

    Trainer writes `trainer_state.json` after the weights, optimizer, scheduler and random states, so a checkpoint
    with weights and a readable trainer state is whole.
    """
    state = folder / TRAINER_STATE_NAME
    if not state.is_file():
        return f"no {TRAINER_STATE_NAME}"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except ValueError:
        return f"an unreadable {TRAINER_STATE_NAME}"
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        return f"no weights ({' or '.join(WEIGHT_FILES)})"
    return None


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The `checkpoint-N` of `run_dir` with the largest N that `checkpoint_problem` passes; None when none does.

    Logs a warning for every newer, incomplete `checkpoint-N` it skips and every temporary folder a crash left.
    """
    for leftover in sorted(run_dir.glob(temporary_sibling(checkpoint_folder(run_dir, "*")).name)):
        logger.warning(f"Skipping {leftover}: a checkpoint save cut off by a crash; it may be deleted.")
    folders = [entry for entry in run_dir.iterdir() if entry.is_dir() and CHECKPOINT_FOLDER.match(entry.name)]
    for folder in sorted(folders, key=lambda entry: int(CHECKPOINT_FOLDER.match(entry.name).group(1)), reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        logger.warning(f"Skipping incomplete {folder} ({problem}): a save cut off by a crash; it may be deleted.")
    return None


def is_run_entry(entry: Path) -> bool:
    """True for what a run's folder holds besides its final model: `checkpoint-N` folders and hidden entries."""
    return entry.name.startswith(".") or (entry.is_dir() and CHECKPOINT_FOLDER.match(entry.name) is not None)


def save_final_model(trainer: Trainer, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Save the trained model and `tokenizer` into `folder` beside its `checkpoint-N` folders.

    Written into `folder/.final-model.tmp` first, then moved in place of the previous final model's files
    (`output_folders.replace_entries`: `config.json` last), so that an old card or weight file never stays beside
    the new model.
    """
    staging = temporary_sibling(folder / "final-model")
    remove(staging)
    trainer.save_model(str(staging))
    tokenizer.save_pretrained(staging)
    replace_entries(staging, folder, keep=is_run_entry)


def logged_losses(trainer: Trainer) -> dict[int, float]:
    """Training loss by step from the trainer's log history."""
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
