"""Train a FastGPT with the Transformers `Trainer`, alone or data parallel (DDP, FSDP2) through accelerate/torchrun.

Self-contained: the model is a random-init preset and the data a synthetic, learnable token stream (each row
counts upward from a random start with a random stride, modulo the vocabulary), so it runs in seconds on a CPU.

    python examples/train_distributed.py --preset tiny --steps 4                        # one process
    torchrun --nproc_per_node 2 examples/train_distributed.py --preset tiny --steps 4  # DDP (gloo on CPU)
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/train_distributed.py
    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/train_distributed.py

FSDP2 through accelerate needs GPUs: on CPUs accelerate 1.15 runs the fsdp2 config as DDP (tests/fsdp2_worker.py
shows the CPU route, Transformers' `DistributedConfig(fsdp_size=N)`). `--global-batch-size` is split evenly over
the processes, so every launch above takes the same optimizer steps on the same rows: the loss of a 2-process run
equals the single-process run's (tests/test_distributed.py).
"""

import argparse
import json
import time

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM

# Seconds without the GIL before the process group is torn down (see the end of main()).
GLOO_CLEANUP_PAUSE_S = 0.2


class CountingSequences(Dataset):
    """Row i: `(start + stride * t) % vocab_size` for t < seq_len; start and stride drawn with seed i."""

    def __init__(self, num_rows: int, seq_len: int, vocab_size: int) -> None:
        self.num_rows, self.seq_len, self.vocab_size = num_rows, seq_len, vocab_size

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(index)
        start, stride = torch.randint(0, self.vocab_size, (2,), generator=generator).tolist()
        input_ids = (start + stride * torch.arange(self.seq_len)) % self.vocab_size
        return {"input_ids": input_ids, "labels": input_ids.clone()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="FastGPTConfig preset (tiny, small, 125m, 1b, 13b)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps")
    parser.add_argument("--global-batch-size", type=int, default=8, help="rows per step over all processes")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per row")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPUs)")
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu trains with gloo between processes; cuda with nccl",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the data order")
    parser.add_argument("--output-dir", default="train_distributed_output", help="Trainer's output folder")
    parser.add_argument("--loss-file", help="write the logged loss of every step here as JSON (main process)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=1,  # set below, once the world size is known
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=args.bf16,
        use_cpu=args.device == "cpu",
        ddp_find_unused_parameters=False,  # every parameter takes part in each forward: no extra graph walk
        seed=args.seed,
        disable_tqdm=True,
    )
    world_size = training_args.world_size
    if args.global_batch_size % world_size != 0:
        raise ValueError(
            f"--global-batch-size {args.global_batch_size} must be a multiple of the {world_size} processes."
        )
    training_args.per_device_train_batch_size = args.global_batch_size // world_size
    torch.manual_seed(args.seed)
    model = FastGPTForCausalLM(FastGPTConfig.from_preset(args.preset))
    dataset = CountingSequences(args.global_batch_size * args.steps, args.seq_len, model.config.vocab_size)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if trainer.is_world_process_zero():
        print(f"world size {world_size}, losses {losses}")
        if args.loss_file:
            with open(args.loss_file, "w") as handle:
                json.dump({"world_size": world_size, "losses": losses}, handle)
    # Teardown: gloo's worker threads free a finished collective's tensors after its waiter has returned, and that
    # needs the GIL. If the process group's destructor (DDP's reducer, at exit) runs first, it joins those threads
    # while holding the GIL: a rank deadlocked, or aborted with "terminate called without an active exception", in
    # about 1 run of 6 (torch 2.13, CPU). So: a last barrier, a pause without the GIL for its clean-up, then the
    # group destroyed.
    trainer.accelerator.wait_for_everyone()
    time.sleep(GLOO_CLEANUP_PAUSE_S)
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
