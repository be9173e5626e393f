"""Pipeline-parallel FastGPT training with `torch.distributed.pipelining`, optionally with TP and FSDP2 (3D).

    torchrun --nproc_per_node 2 examples/pipeline_parallel.py --preset tiny --steps 2              # PP=2, CPU/gloo
    torchrun --nproc_per_node 8 examples/pipeline_parallel.py --preset 1b --dtype bfloat16 \
        --tp-size 2 --dp-size 2 --schedule 1f1b                                                    # PP=2 x DP=2 x TP=2

Transformers loads the model onto the device mesh `(pp, dp_replicate, fsdp, tp)` of
`DistributedConfig(pp_size, fsdp_size, tp_size)` (pp = processes / (dp x tp)): each pipeline rank keeps its
stage, contiguous decoder layers along `base_model_pp_plan` (embed_tokens -> layers -> norm -> lm_head; the other
layers become `PipelineIdentityLayer`s, names keep their indices), shards it by head with `base_model_tp_plan`
over `tp` and with FSDP2 over `fsdp`. This script then runs the stages with a `torch.distributed.pipelining`
schedule over the `pp` dimension: GPipe runs every microbatch's forward then every backward, 1F1B interleaves
them (less activation memory, same gradients). Each data-parallel rank feeds its own rows. Stages pass
`[B, T, hidden]` activations. With tied embeddings the first and last stages each hold the embedding matrix;
their gradients are summed before the optimizer step, as in Megatron-LM.

Two Transformers 5.24 limits are worked around in `load_stage`: `DistributedConfig` refuses FSDP with PP (its own
pipeline forward is inference-only; this script trains with its own schedule), and with PP and TP together it
applies TP rules naming the other stages' modules (`apply_tensor_parallelism_to_own_stage` drops them).

`--save-first-step PATH` writes each rank's first-step loss, gradients and batch to `PATH.rank<N>.pt`, from
which tests/test_distributed.py checks the loss and gradients against the unsplit model's.
"""

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import transformers.distributed.mixin
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.tensor import DTensor
from transformers import DistributedConfig
from transformers.distributed.pipeline_parallel import PipelineIdentityLayer

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM
from fastgpt_hf.pipeline_training import (
    FastGPTPipelineStage,
    adamw_per_tensor_type,
    causal_lm_loss,
    sum_tied_embedding_grads,
    tied_embedding_group,
)

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
TRANSFORMERS_APPLY_TENSOR_PARALLELISM = transformers.distributed.mixin.apply_tensor_parallelism


def apply_tensor_parallelism_to_own_stage(model: nn.Module, tp_mesh, tp_plan: dict[str, str]) -> nn.Module:
    """Transformers 5.24 splits the pipeline before it applies the TP plan, whose rules still name the other
    stages' modules (KeyError); keep the rules of the modules this stage holds."""
    held = {name for name, module in model.named_modules() if not isinstance(module, PipelineIdentityLayer)}
    held |= {name for name, _ in model.named_parameters()}
    own_plan = {name: style for name, style in tp_plan.items() if name in held}
    return TRANSFORMERS_APPLY_TENSOR_PARALLELISM(model, tp_mesh, own_plan)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="FastGPTConfig preset, when --model-dir is not given")
    parser.add_argument("--model-dir", help="a saved FastGPT to load instead of a random preset")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16"))
    parser.add_argument("--tp-size", type=int, default=1, help="tensor-parallel ranks per stage")
    parser.add_argument("--dp-size", type=int, default=1, help="data-parallel (FSDP2) replicas of the pipeline")
    parser.add_argument("--schedule", default="gpipe", choices=sorted(SCHEDULES))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4, help="rows per step and data-parallel rank")
    parser.add_argument("--microbatches", type=int, default=2, help="microbatches the batch is cut into")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-first-step", help="write the first step's loss, gradients and batch here")
    return parser.parse_args()


def random_model_dir(preset: str, seed: int) -> str:
    """A randomly initialised preset, saved by each node's first process for the node's ranks (collective).

    Seeded initialisation on the CPU gives every node the same weights."""
    folder = os.path.join(tempfile.gettempdir(), f"fastgpt-{preset}-seed{seed}")
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        torch.manual_seed(seed)
        FastGPTForCausalLM(FastGPTConfig.from_preset(preset)).save_pretrained(folder)
    dist.barrier()
    return folder


def load_stage(args: argparse.Namespace) -> FastGPTForCausalLM:
    """This rank's stage, TP- and FSDP-sharded, in training mode."""
    world_size = dist.get_world_size()
    if world_size % (args.tp_size * args.dp_size) != 0:
        raise ValueError(
            f"{world_size} processes do not split into --dp-size {args.dp_size} x --tp-size {args.tp_size}."
        )
    pp_size = world_size // (args.tp_size * args.dp_size)
    if pp_size < 2:
        raise ValueError(
            f"{world_size} processes with --dp-size {args.dp_size} and --tp-size {args.tp_size} leave one pipeline "
            "stage; launch more processes, or use train_distributed.py (DP) or tensor_parallel.py (TP)."
        )
    if args.tp_size > 1 and pp_size > 1:
        transformers.distributed.mixin.apply_tensor_parallelism = apply_tensor_parallelism_to_own_stage
    model_dir = args.model_dir or random_model_dir(args.preset, args.seed)
    distributed_config = DistributedConfig(pp_size=pp_size, tp_size=args.tp_size)
    # Transformers 5.24 refuses FSDP with PP (its own PP forward cannot train); this script's schedule can, so
    # the data-parallel size is set after that check.
    distributed_config.fsdp_size = args.dp_size
    model = FastGPTForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, args.dtype), distributed_config=distributed_config
    )
    return model.train()


def save_step(path: str, stage: FastGPTPipelineStage, input_ids: torch.Tensor, loss: float | None) -> None:
    """This rank's batch, loss (last stage, else None) and gradients by parameter name, before the optimizer step."""
    grads = {}
    for name, param in stage.model.named_parameters():
        grads[name] = (param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad).cpu()
    torch.save({"input_ids": input_ids.cpu(), "loss": loss, "grads": grads}, path)


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    model = load_stage(args)
    stage_module = FastGPTPipelineStage(model)
    pipeline = model._pp_stage
    stage = PipelineStage(stage_module, pipeline.pp_rank, pipeline.pp_size, model.device, group=pipeline.pp_group)
    schedule = SCHEDULES[args.schedule](stage, args.microbatches, loss_fn=causal_lm_loss)
    optimizers = adamw_per_tensor_type(stage_module, args.learning_rate)
    tied_group = tied_embedding_group(model)
    dp_rank = model._mesh_manager.get_mesh("fsdp").get_local_rank()
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        rows = torch.randint(
            0, model.config.vocab_size, (args.dp_size, args.batch_size, args.seq_len), generator=generator
        )
        input_ids = rows[dp_rank].to(model.device)
        losses = []
        schedule.step(*([input_ids] if stage_module.is_first else []), target=input_ids, losses=losses)
        sum_tied_embedding_grads(stage_module, tied_group)
        loss = torch.stack(losses).mean().item() if stage_module.is_last else None
        if step == 0 and args.save_first_step:
            save_step(f"{args.save_first_step}.rank{dist.get_rank()}.pt", stage_module, input_ids, loss)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        if stage_module.is_last:
            print(f"rank {dist.get_rank()} step {step}: loss {loss:.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
