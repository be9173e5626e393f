"""FSDP2 worker for tests/test_distributed.py, run under `torchrun --nproc_per_node 2` on CPU (gloo).

accelerate enables FSDP only on accelerators, so on CPU this loads the model through Transformers' own FSDP2
path, `from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=2))`, which applies `fully_shard`
per decoder layer as examples/accelerate/fsdp2.yaml does. Each rank takes its half of a 4-row batch for one
forward and backward; rank 0 writes the batch, the mean loss over ranks and the gathered gradients.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp2_worker.py MODEL_DIR OUTPUT_FILE
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import DistributedConfig

from fastgpt_hf import FastGPTForCausalLM


def main(model_dir: str, output_file: str) -> None:
    model = FastGPTForCausalLM.from_pretrained(model_dir, distributed_config=DistributedConfig(fsdp_size=2))
    model.train()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    input_ids = torch.randint(0, model.config.vocab_size, (4, 37), generator=torch.Generator().manual_seed(0))
    rows = input_ids.chunk(world_size)[rank]
    loss = model(rows, labels=rows, use_cache=False).loss
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    grads = {}
    for name, param in model.named_parameters():
        grads[name] = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
    if rank == 0:
        torch.save({"input_ids": input_ids, "loss": mean_loss.item() / world_size, "grads": grads}, output_file)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
