"""Training through `transformers.Trainer`: models sized to the tokenizer, precision, arguments, eval perplexity.

- `model_for_tokenizer` builds a FastGPT from a preset with the tokenizer's vocabulary and special tokens;
  `llama_peer` builds the `LlamaForCausalLM` of the same shape (the demo's baseline).
- `choose_precision` turns `auto` into bf16 autocast on CUDA devices that have it, fp16 on older CUDA devices,
  and float32 on the CPU, and logs why when it falls back. bf16 autocast on the CPU may be asked for explicitly.
- `training_arguments` fills `TrainingArguments` for causal-LM training from a few choices (steps, batch,
  accumulation, gradient checkpointing, precision, checkpoint interval); `PerplexityTrainer` adds
  `eval_perplexity = exp(eval_loss)` to every evaluation. Checkpoints are Trainer's own (`checkpoint-N`
  folders), so `trainer.train(resume_from_checkpoint=...)` continues a run where it stopped.
"""

import logging
import math
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from .configuration_fastgpt import FastGPTConfig
from .modeling_fastgpt import FastGPTForCausalLM

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


def model_for_tokenizer(
    preset: str, tokenizer: PreTrainedTokenizerBase, seed: int = 0, **overrides
) -> FastGPTForCausalLM:
    """A freshly initialised FastGPT of `preset` (with `overrides`) whose vocabulary is the tokenizer's."""
    special = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = FastGPTConfig.from_preset(preset, **{**special, **overrides})
    torch.manual_seed(seed)
    return FastGPTForCausalLM(config)


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


class PerplexityTrainer(Trainer):
    """`Trainer` whose evaluations also report perplexity, `exp(eval_loss)` (per token of the tokenizer)."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        loss_key = f"{metric_key_prefix}_loss"
        if loss_key in metrics:
            perplexity = {f"{metric_key_prefix}_perplexity": math.exp(metrics[loss_key])}
            metrics.update(perplexity)
            self.log(perplexity)
        return metrics


def causal_lm_trainer(
    model: PreTrainedModel, args: TrainingArguments, train_dataset: Dataset, eval_dataset: Dataset | None = None
) -> PerplexityTrainer:
    """A `PerplexityTrainer` over packed blocks (`input_ids`, `labels`: see `data.pack_blocks`)."""
    return PerplexityTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=default_data_collator,
    )


def logged_losses(trainer: Trainer) -> dict[int, float]:
    """Training loss by step from the trainer's log history."""
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
