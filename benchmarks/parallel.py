"""Parity and training throughput of FastGPT on one device against DDP, FSDP2, TP and PP over all launched devices.

    torchrun --nproc_per_node 2 benchmarks/bench.py parallel --preset 1b                    # 2 GPUs, NCCL, bf16
    torchrun --nproc_per_node 2 benchmarks/bench.py parallel --preset tiny --device cpu     # smoke test, gloo

Every mode loads the same random checkpoint (saved once by rank 0) the way its example does:
- `single`: one device (rank 0; the others wait), the baseline;
- `ddp`: `DistributedDataParallel`, each rank a slice of the global batch (examples/accelerate/ddp.yaml);
- `fsdp2`: `from_pretrained(distributed_config=DistributedConfig(fsdp_size=N))`, `fully_shard` per layer;
- `tp`: `DistributedConfig(tp_plan="auto")`, every rank the whole batch (examples/tensor_parallel.py);
- `pp`: `DistributedConfig(pp_size=N)` stages under a GPipe schedule of 4 microbatches
  (`fastgpt_hf.pipeline_training`, as examples/pipeline_parallel.py trains).

Parity (float32, unsplit float32 model on each rank as the reference): the largest absolute difference of the loss,
of every gradient (gathered from shards) and, for TP, of the logits. Throughput (`--dtype`, AdamW, pure low
precision): tokens of the global batch per second over the timed steps, after warm-up steps; scaling efficiency
is a mode's tokens/s over (devices x the single device's).
"""

import argparse
import gc
import os
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from models import DeviceUnavailable
from timing import synchronize as synchronize_device
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from transformers import DistributedConfig

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM
from fastgpt_hf.pipeline_training import (
    FastGPTPipelineStage,
    adamw_per_tensor_type,
    causal_lm_loss,
    sum_tied_embedding_grads,
    tied_embedding_group,
)

MODES = ("single", "ddp", "fsdp2", "tp", "pp")
PIPELINE_MICROBATCHES = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="throughput dtype")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--global-batch-size", type=int, default=8, help="rows per step over all ranks")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--parity-seq-len", type=int, default=256)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--timed-steps", type=int, default=5)


def setup(device_type: str) -> torch.device:
    """Join the process group (NCCL on GPUs, gloo on CPUs) and pick this rank's device."""
    if device_type == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def save_random_model(preset: str) -> str:
    """Rank 0 saves a random float32 model of `preset` for every mode to load (collective)."""
    folder = os.path.join(tempfile.gettempdir(), f"bench-parallel-{preset}")
    if dist.get_rank() == 0:
        torch.manual_seed(0)
        FastGPTForCausalLM(FastGPTConfig.from_preset(preset, use_cache=False)).save_pretrained(folder)
    dist.barrier()
    return folder


def random_batch(vocab_size: int, rows: int, seq_len: int, seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (rows, seq_len), generator=generator).to(device)


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def synchronize(device: torch.device, all_ranks: bool) -> None:
    """Wait for this device's queued work, then (for a multi-rank mode) for every rank's."""
    synchronize_device(device)
    if all_ranks:
        dist.barrier()


class ModeRun:
    """One parallel mode, loaded: `step(input_ids)` runs forward and backward on the global batch `[B, T]` and
    returns the loss averaged over it (on every rank); `model` is the (sharded) causal LM whose gradients it fills."""

    def __init__(self, mode: str, folder: str, dtype: torch.dtype, device: torch.device) -> None:
        self.mode, self.device = mode, device
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.step: Callable[[torch.Tensor], float] = getattr(self, f"load_{mode}")(folder, dtype)

    def load_single(self, folder: str, dtype: torch.dtype) -> Callable[[torch.Tensor], float]:
        self.model = FastGPTForCausalLM.from_pretrained(folder, dtype=dtype).to(self.device).train()
        self.trained = self.model
        return self.whole_batch_step

    def load_ddp(self, folder: str, dtype: torch.dtype) -> Callable[[torch.Tensor], float]:
        self.model = FastGPTForCausalLM.from_pretrained(folder, dtype=dtype).to(self.device).train()
        self.trained = DistributedDataParallel(self.model)
        return self.batch_slice_step

    def load_fsdp2(self, folder: str, dtype: torch.dtype) -> Callable[[torch.Tensor], float]:
        distributed_config = DistributedConfig(fsdp_size=self.world_size)
        self.model = FastGPTForCausalLM.from_pretrained(folder, dtype=dtype, distributed_config=distributed_config)
        self.trained = self.model.train()
        return self.batch_slice_step

    def load_tp(self, folder: str, dtype: torch.dtype) -> Callable[[torch.Tensor], float]:
        distributed_config = DistributedConfig(tp_plan="auto")
        self.model = FastGPTForCausalLM.from_pretrained(folder, dtype=dtype, distributed_config=distributed_config)
        self.trained = self.model.train()
        return self.whole_batch_step

    def load_pp(self, folder: str, dtype: torch.dtype) -> Callable[[torch.Tensor], float]:
        distributed_config = DistributedConfig(pp_size=self.world_size)
        self.model = FastGPTForCausalLM.from_pretrained(folder, dtype=dtype, distributed_config=distributed_config)
        self.trained = FastGPTPipelineStage(self.model.train())
        pipeline = self.model._pp_stage
        stage = PipelineStage(self.trained, pipeline.pp_rank, pipeline.pp_size, self.device, group=pipeline.pp_group)
        self.schedule = ScheduleGPipe(stage, PIPELINE_MICROBATCHES, loss_fn=causal_lm_loss)
        self.tied_group = tied_embedding_group(self.model)
        return self.pipeline_step

    def whole_batch_step(self, input_ids: torch.Tensor) -> float:
        loss = self.trained(input_ids, labels=input_ids).loss
        loss.backward()
        return loss.item()

    def batch_slice_step(self, input_ids: torch.Tensor) -> float:
        rows = input_ids.chunk(self.world_size)[self.rank]
        loss = self.trained(rows, labels=rows).loss
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        return mean_loss.item() / self.world_size

    def pipeline_step(self, input_ids: torch.Tensor) -> float:
        losses = []
        self.schedule.step(*([input_ids] if self.trained.is_first else []), target=input_ids, losses=losses)
        sum_tied_embedding_grads(self.trained, self.tied_group)
        loss = torch.stack(losses).mean().float() if self.trained.is_last else torch.zeros((), device=self.device)
        dist.broadcast(loss, src=self.world_size - 1)
        return loss.item()

    def gradients(self) -> dict[str, torch.Tensor]:
        """This rank's parameters' gradients, whole (collective for sharded modes)."""
        return {name: full(param.grad) for name, param in self.model.named_parameters() if param.grad is not None}


def reference_step(folder: str, input_ids: torch.Tensor, device: torch.device):
    """Logits, loss and gradients of the unsplit float32 model on this rank's device."""
    model = FastGPTForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).train()
    with torch.no_grad():
        logits = model(input_ids).logits
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    return logits, loss.item(), {name: param.grad for name, param in model.named_parameters()}


def parity(mode: str, folder: str, input_ids: torch.Tensor, reference, device: torch.device) -> dict[str, float]:
    """Largest absolute errors of one float32 step of `mode` against the unsplit reference (max over ranks)."""
    reference_logits, reference_loss, reference_grads = reference
    run = ModeRun(mode, folder, torch.float32, device)
    errors = {"loss": abs(run.step(input_ids) - reference_loss)}
    grads = run.gradients()
    errors["grads"] = max((grads[name] - reference_grads[name]).abs().max().item() for name in grads)
    if mode == "tp":
        with torch.no_grad():
            logits = run.model.eval()(input_ids).logits
        errors["logits"] = (logits - reference_logits).abs().max().item()
    maxima = torch.tensor([errors.get(key, 0.0) for key in ("loss", "grads", "logits")], device=device)
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    del run
    return dict(zip(("loss", "grads", "logits"), maxima.tolist(), strict=True))


def throughput(mode: str, folder: str, args: argparse.Namespace, device: torch.device) -> float:
    """Tokens per second of the global batch over `--timed-steps` optimizer steps in `--dtype`."""
    run = ModeRun(mode, folder, getattr(torch, args.dtype), device)
    optimizers = adamw_per_tensor_type(run.model, learning_rate=1e-4)
    vocab_size = run.model.config.vocab_size
    input_ids = random_batch(vocab_size, args.global_batch_size, args.seq_len, seed=1, device=device)
    all_ranks = mode != "single"
    for step in range(args.warmup_steps + args.timed_steps):
        if step == args.warmup_steps:
            synchronize(device, all_ranks)
            start = time.perf_counter()
        run.step(input_ids)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    synchronize(device, all_ranks)
    seconds = time.perf_counter() - start
    del run, optimizers
    return args.global_batch_size * args.seq_len * args.timed_steps / seconds


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_mode(
    mode: str, folder: str, args: argparse.Namespace, parity_ids: torch.Tensor, reference, device: torch.device
) -> dict:
    """Parity and tokens/s of one mode; `single` runs on rank 0 while the other ranks wait."""
    result = {"mode": mode, "devices": 1 if mode == "single" else dist.get_world_size()}
    if mode == "single":
        if dist.get_rank() == 0:
            result["tokens_per_s"] = throughput(mode, folder, args, device)
    else:
        result.update(parity(mode, folder, parity_ids, reference, device))
        free_memory(device)
        result["tokens_per_s"] = throughput(mode, folder, args, device)
    free_memory(device)
    dist.barrier()
    return result


TABLE_HEADER = (
    f"{'mode':<7}{'devices':>8}{'loss err':>11}{'grad err':>11}{'logit err':>11}{'tokens/s':>12}{'scaling':>9}"
)


def table_row(result: dict, single_tokens_per_s: float | None) -> str:
    errors = [f"{result[key]:>11.2e}" if key in result else f"{'-':>11}" for key in ("loss", "grads", "logits")]
    if result["mode"] != "tp":
        errors[2] = f"{'-':>11}"
    scaling = result["tokens_per_s"] / (result["devices"] * single_tokens_per_s) if single_tokens_per_s else None
    efficiency = "-" if scaling is None else f"{scaling:.0%}"
    return f"{result['mode']:<7}{result['devices']:>8}{''.join(errors)}{result['tokens_per_s']:>12.0f}{efficiency:>9}"


def run(args: argparse.Namespace) -> None:
    if "RANK" not in os.environ:
        raise SystemExit(
            "bench.py parallel runs under torchrun: torchrun --nproc_per_node N benchmarks/bench.py parallel"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("--device cuda: this machine has no CUDA device; --device cpu runs it on gloo.")
    device = setup(args.device)
    folder = save_random_model(args.preset)
    vocab_size = FastGPTConfig.from_pretrained(folder).vocab_size
    parity_ids = random_batch(vocab_size, args.global_batch_size, args.parity_seq_len, 0, device)
    reference = reference_step(folder, parity_ids, device)
    free_memory(device)
    if dist.get_rank() == 0:
        print(f"preset {args.preset}, {args.dtype}, global batch {args.global_batch_size} x {args.seq_len} tokens")
        print(TABLE_HEADER, flush=True)
    single_tokens_per_s = None
    for mode in args.modes:
        # Each row as soon as its mode ends, so that a mode that fails later leaves the others' figures.
        result = run_mode(mode, folder, args, parity_ids, reference, device)
        if mode == "single":
            single_tokens_per_s = result.get("tokens_per_s")
        if dist.get_rank() == 0:
            print(table_row(result, single_tokens_per_s), flush=True)
    dist.destroy_process_group()
