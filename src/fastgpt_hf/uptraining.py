"""Uptraining a converted FastGPT against its source: `fastgpt uptrain CHECKPOINT --teacher SOURCE`.

A converted model (`conversion`) starts with its dynamic layers' new parameters neutral: the gate local, the
memory slots empty. Uptraining teaches them by distillation, the student's next-token distribution pulled towards
the teacher's (the source, full attention everywhere) by the mean per-token KL(teacher || student), in two
`Trainer` runs:

1. only the new parameters (`conversion.NEW_PARAMETERS`) train, at a high learning rate;
2. every parameter trains at a low one, so that the windowed layers adapt to what they no longer see.

The data are long documents, `block_size`-token blocks of a WikiText-2 stream (the shipped excerpt, or a text
file / a folder holding `train.txt`), mixed with synthetic pass-key sequences (`passkey`) whose needles lie
anywhere in the block, so that retrieval across the windows is part of what the student learns from the teacher.
A pass-key sequence is distilled at its answer alone (the positions predicting the key, as DuoAttention's training
does): averaged over all 8K positions, the key (6 tokens with SmolLM2's tokenizer) is under a thousandth of them. Each
sequence weighs the same in a batch, a text block through its mean over every position.

Stopped by Ctrl-C or SIGTERM (a time limit, a scheduler's preemption), `fastgpt uptrain` ends the stage in progress
at its next step, runs no further stage, and saves what was trained so far, saying how many steps ran: a run cut
short on a rented GPU keeps its work.
"""

import argparse
import contextlib
import random
import signal
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from .conversion import is_new_parameter, load_source
from .data import CORPUS_FILES, load_text_dataset, pack_blocks, tokenize_dataset
from .passkey import PasskeySample, passkey_samples
from .training import PerplexityTrainer, training_arguments


def distillation_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(teacher || student) in nats from logits `[batch, tokens, vocab]` (computed in float32): each sequence's
    mean over the positions where `loss_mask` (`[batch, tokens]`, 0 or 1) is 1 (all of them without it), then the
    mean over sequences."""
    student = F.log_softmax(student_logits.float(), dim=-1)
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    per_position = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
    if loss_mask is None:
        return per_position.mean()
    mask = loss_mask.to(per_position.dtype)
    return ((per_position * mask).sum(-1) / mask.sum(-1)).mean()


class DistillationTrainer(PerplexityTrainer):
    """A `PerplexityTrainer` whose loss is `distillation_kl` against a frozen `teacher` of the same vocabulary."""

    def __init__(self, *args, teacher: PreTrainedModel, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        # The loss is a mean per batch: Trainer divides it by the accumulation steps itself.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss_mask = inputs.get("loss_mask")
        inputs = {name: value for name, value in inputs.items() if name not in ("labels", "loss_mask")}
        self.teacher.to(inputs["input_ids"].device)
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs).logits
        outputs = model(**inputs)
        loss = distillation_kl(outputs.logits, teacher_logits, loss_mask)
        return (loss, outputs) if return_outputs else loss


class StopWhenAsked(TrainerCallback):
    """Ends a `Trainer` run at the end of its current step once `asked` is set."""

    def __init__(self, asked: threading.Event):
        self.asked = asked

    def on_step_end(self, args, state, control, **kwargs):
        if self.asked.is_set():
            control.should_training_stop = True


def text_blocks(
    tokenizer: PreTrainedTokenizerBase, block_size: int, text_file: str | Path, max_blocks: int | None = None
) -> list[list[int]]:
    """`block_size`-token blocks of a text file's token stream (`data.pack_blocks`), at most `max_blocks`."""
    blocks = pack_blocks(tokenize_dataset(load_text_dataset({"train": text_file}), tokenizer), block_size)["train"]
    if len(blocks) == 0:
        raise ValueError(f"{text_file} has fewer tokens than one block of {block_size}; use a smaller block size.")
    count = len(blocks) if max_blocks is None else min(max_blocks, len(blocks))
    return list(blocks.select(range(count))["input_ids"])


def training_text(data: str | Path | None, split: str = "train") -> Path:
    """The text file of `split` ("train" or "valid"): the shipped excerpt without `data`, `data` itself when it is a
    file (training only), or `data/<split>.txt`."""
    if data is None:
        return Path(CORPUS_FILES["train" if split == "train" else "validation"])
    path = Path(data)
    if path.is_file() and split == "train":
        return path
    if (path / f"{split}.txt").is_file():
        return path / f"{split}.txt"
    raise ValueError(f"No {split} text at {data}: pass a text file or a folder with {split}.txt (WikiText-2's layout).")


def uptraining_dataset(
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    text_file: str | Path,
    num_blocks: int,
    passkey_share: float = 0.25,
    seed: int = 0,
) -> Dataset:
    """`num_blocks` blocks, shuffled: a `passkey_share` of pass-key sequences (`loss_mask` 1 at the positions
    predicting the answer; keys drawn with `seed + 1`, so that a default run never trains on the keys that
    `passkey.passkey_accuracy` checks with its seed 0), the rest WikiText blocks (`loss_mask` 1 everywhere)."""
    passkeys = passkey_samples(tokenizer, block_size, round(num_blocks * passkey_share), seed + 1)
    texts = text_blocks(tokenizer, block_size, text_file, num_blocks - len(passkeys))
    rows = [(block, [1] * len(block)) for block in texts]
    rows += [(sample.input_ids, answer_mask(sample)) for sample in passkeys]
    random.Random(seed).shuffle(rows)
    return Dataset.from_dict({"input_ids": [row[0] for row in rows], "loss_mask": [row[1] for row in rows]})


def answer_mask(sample: PasskeySample) -> list[int]:
    """1 at the positions whose next token belongs to the sample's answer, 0 elsewhere."""
    length = len(sample.input_ids)
    return [int(sample.answer_start - 1 <= position < length - 1) for position in range(length)]


@torch.no_grad()
def mean_kl(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    blocks: list[list[int]],
    loss_masks: list[list[int]] | None = None,
) -> float:
    """`distillation_kl` of the student against the teacher, averaged over `blocks` (one forward pass each), each
    block over the positions its `loss_masks` row marks (all of them without `loss_masks`)."""
    student_mode = student.training
    student.eval()
    device = next(student.parameters()).device
    teacher.to(device)
    total = 0.0
    for block, loss_mask in zip(blocks, loss_masks or [None] * len(blocks), strict=True):
        input_ids = torch.tensor([block], device=device)
        mask = None if loss_mask is None else torch.tensor([loss_mask], device=device)
        total += distillation_kl(student(input_ids).logits, teacher(input_ids).logits, mask).item()
    student.train(student_mode)
    return total / len(blocks)


def held_out_kl(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    blocks: list[list[int]],
    passkeys: list[PasskeySample],
) -> tuple[float, float | None]:
    """`mean_kl` over held-out text `blocks`, and over the answers of held-out pass-key sequences (None without)."""
    text = mean_kl(student, teacher, blocks)
    if not passkeys:
        return text, None
    return text, mean_kl(
        student, teacher, [sample.input_ids for sample in passkeys], [answer_mask(s) for s in passkeys]
    )


def run_stage(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    dataset: Dataset,
    output_dir: Path,
    steps: int,
    learning_rate: float,
    only_new_parameters: bool,
    stop: threading.Event | None = None,
    **arguments,
) -> DistillationTrainer:
    """One distillation run of `steps` optimizer steps (fewer once `stop` is set); with `only_new_parameters`,
    everything else frozen."""
    for name, parameter in student.named_parameters():
        parameter.requires_grad_(is_new_parameter(name) or not only_new_parameters)
    args = training_arguments(output_dir, max_steps=steps, learning_rate=learning_rate, **arguments)
    args.remove_unused_columns = False  # `loss_mask` is the loss's, not the model's
    callbacks = [] if stop is None else [StopWhenAsked(stop)]
    trainer = DistillationTrainer(model=student, args=args, train_dataset=dataset, teacher=teacher, callbacks=callbacks)
    trainer.train()
    student.requires_grad_(True)
    return trainer


def uptrain(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    dataset: Dataset,
    output_dir: str | Path,
    stage1_steps: int = 100,
    stage2_steps: int = 100,
    stage1_lr: float = 3e-3,
    stage2_lr: float = 1e-5,
    stop: threading.Event | None = None,
    **arguments,
) -> tuple[int, int]:
    """Stage 1 (new parameters, `stage1_lr`) then stage 2 (everything, `stage2_lr`), distilling `teacher` into
    `student` (trained in place) on `dataset` (`input_ids` blocks); a stage of 0 steps is skipped, and once `stop`
    is set the stage in progress ends at its next step and no later one runs. `arguments` go to
    `training.training_arguments` (batch_size, gradient_accumulation_steps, warmup_steps, precision, seed, ...).
    Trainer writes nothing into `output_dir` (no checkpoints). Returns the steps each stage ran."""
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError(
            f"The teacher has {teacher.config.vocab_size} tokens and the student {student.config.vocab_size}; "
            "uptrain a converted checkpoint against the source it was converted from."
        )
    arguments.setdefault("logging_steps", max(1, min(10, (stage1_steps + stage2_steps) // 10)))
    stages = ((stage1_steps, stage1_lr, True), (stage2_steps, stage2_lr, False))
    steps_run = []
    for steps, learning_rate, only_new_parameters in stages:
        if steps == 0 or (stop is not None and stop.is_set()):
            steps_run.append(0)
            continue
        trainer = run_stage(
            student, teacher, dataset, Path(output_dir), steps, learning_rate, only_new_parameters, stop, **arguments
        )
        steps_run.append(trainer.state.global_step)
    student.eval()
    return steps_run[0], steps_run[1]


def uptrain_main(argv: list[str] | None = None) -> None:
    """`fastgpt uptrain CHECKPOINT --teacher SOURCE`: distil the source into its converted FastGPT, save to OUTPUT."""
    from .cli import existing_checkpoint, load_checkpoint, positive_int
    from .output_folders import refuse_occupied, refuse_unwritable, staged_folder, writer_lock

    parser = argparse.ArgumentParser(
        prog="fastgpt uptrain",
        description="Teach a converted FastGPT (fastgpt convert) its new parameters by distilling the source model: "
        "stage 1 trains only the dynamic layers' gates, memory slots and compressors, stage 2 every parameter at a "
        "low learning rate, on WikiText-2 blocks and synthetic pass-key sequences. Prints the mean KL to the "
        "teacher on held-out blocks before and after, and saves the model with its tokenizer to --output.",
    )
    parser.add_argument("checkpoint", help="the converted FastGPT checkpoint folder")
    parser.add_argument("--teacher", required=True, help="the source it was converted from (folder or .gguf file)")
    parser.add_argument("--output", required=True, help="folder for the uptrained checkpoint (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace what --output holds")
    parser.add_argument(
        "--data", help="a text file, or a folder with train.txt and valid.txt (default: the shipped WikiText-2 excerpt)"
    )
    parser.add_argument("--block-size", type=positive_int, default=2048, help="tokens per training sequence")
    parser.add_argument("--blocks", type=positive_int, default=256, help="training sequences in the data set")
    parser.add_argument("--passkey-share", type=float, default=0.25, help="share of pass-key sequences")
    parser.add_argument("--stage1-steps", type=int, default=100, help="steps training only the new parameters")
    parser.add_argument("--stage2-steps", type=int, default=100, help="steps training every parameter")
    parser.add_argument("--stage1-lr", type=float, default=3e-3)
    parser.add_argument("--stage2-lr", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=positive_int, default=1)
    parser.add_argument("--grad-accum", type=positive_int, default=1)
    parser.add_argument("--eval-blocks", type=positive_int, default=4, help="held-out blocks for the KL figures")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    checkpoint = existing_checkpoint(parser, args.checkpoint)
    if not 0 <= args.passkey_share <= 1:
        parser.error(f"--passkey-share must be in [0, 1], got {args.passkey_share}")
    output = Path(args.output)
    refuse_unwritable(output, [checkpoint, Path(args.teacher)])
    with writer_lock(output):
        if not args.overwrite:
            refuse_occupied(output, "pass --overwrite to replace them, or another --output")
        student, tokenizer = load_checkpoint(checkpoint)
        teacher, _ = load_source(args.teacher)
        dataset = uptraining_dataset(
            tokenizer, args.block_size, training_text(args.data), args.blocks, args.passkey_share, args.seed
        )
        held_out = text_blocks(tokenizer, args.block_size, training_text(args.data, "valid"), args.eval_blocks)
        # Other keys and needles than the training sequences' (seed + 1) and the retrieval check's (0).
        held_out_passkeys = (
            []
            if args.passkey_share == 0
            else passkey_samples(tokenizer, args.block_size, args.eval_blocks, args.seed + 2)
        )
        before = held_out_kl(student, teacher, held_out, held_out_passkeys)
        stop = threading.Event()
        with staged_folder(output) as staging, stop_on_signals(stop):
            steps_run = uptrain(
                student,
                teacher,
                dataset,
                staging,
                args.stage1_steps,
                args.stage2_steps,
                args.stage1_lr,
                args.stage2_lr,
                stop,
                batch_size=args.batch_size,
                gradient_accumulation_steps=args.grad_accum,
                gradient_checkpointing=args.gradient_checkpointing,
                precision=args.precision,
                seed=args.seed,
            )
            after = held_out_kl(student, teacher, held_out, held_out_passkeys)
            student.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    if stop.is_set():
        print(
            f"Stopped when asked, after {steps_run[0]} of {args.stage1_steps} stage 1 steps and {steps_run[1]} of "
            f"{args.stage2_steps} stage 2 steps; the model trained so far is saved."
        )
    if held_out_passkeys:
        print(
            f"KL to the teacher on the answers of {len(held_out_passkeys)} held-out pass-key sequences: "
            f"{before[1]:.4f} -> {after[1]:.4f} nats/token"
        )
    print(
        f"KL to the teacher on {len(held_out)} held-out blocks: {before[0]:.4f} -> {after[0]:.4f} nats/token -> "
        f"{output}"
    )


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event):
    """While inside, SIGINT (Ctrl-C) and SIGTERM set `stop` instead of ending the process; a second one ends it."""

    def ask_to_stop(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print(
            f"{signal.Signals(signum).name}: stopping after this step; what is trained so far will be saved.",
            flush=True,
        )

    previous = {number: signal.signal(number, ask_to_stop) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
