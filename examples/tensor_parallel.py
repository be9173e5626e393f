"""Tensor-parallel FastGPT: `from_pretrained` with `DistributedConfig(tp_plan="auto")` under torchrun shards by head.

    torchrun --nproc_per_node 2 examples/tensor_parallel.py --model-dir my-fastgpt            # CPU: gloo
    torchrun --nproc_per_node 2 examples/tensor_parallel.py --model-dir my-fastgpt --dtype bfloat16

(`from_pretrained(..., tp_plan="auto")` does the same, with a deprecation warning.) The plan is
`FastGPTConfig.base_model_tp_plan`, plus Transformers' vocabulary-split `embed_tokens` and gathered `lm_head`:
q/k/v and the MLP's gate/up projections column-wise, o_proj and down_proj row-wise (one all-reduce after each),
and in dynamic layers the memory slots `[M, K, D]` split on K with k/v_proj's heads, `mix_gate` column-wise with
q_proj's heads, and `compress_k` / `compress_v` (shared by the heads) whole on every rank, their input split by
head (`fastgpt_shared_by_heads`: Transformers' `SequenceParallel` on the heads-first dim 0) so that DTensor sums
their gradients over the ranks.
The attention reads its head counts from the tensors, so each rank runs the same forward on its heads.
`num_key_value_heads` must be a multiple of the number of processes.

The script runs a forward pass (printing the logits' shape on rank 0), greedy generation (each rank caches its
own heads) and one training step over two accumulated halves of the batch (loss, then the gradients gathered
from their shards). `--save PATH` writes the batch, logits, generated tokens, loss and full gradients from
rank 0, which tests/test_distributed.py compares with the unsharded model.
"""

import argparse

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import DistributedConfig

from fastgpt_hf import FastGPTForCausalLM


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="a saved FastGPT (save_pretrained folder)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16"))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=37)
    parser.add_argument("--new-tokens", type=int, default=12, help="greedy tokens generated after 5 prompt tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", help="rank 0 writes the batch, logits, loss and gradients here")
    return parser.parse_args()


def full_gradients(model: FastGPTForCausalLM) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as a whole tensor on the CPU (collective: every rank must call it)."""
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        grads[name] = grad.cpu()
    return grads


def main() -> None:
    args = parse_args()
    distributed_config = DistributedConfig(tp_plan="auto")
    model = FastGPTForCausalLM.from_pretrained(
        args.model_dir, dtype=getattr(torch, args.dtype), distributed_config=distributed_config
    )
    device = model.device
    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    input_ids = input_ids.to(device)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids, use_cache=False).logits
    generated = model.generate(input_ids[:, :5], max_new_tokens=args.new_tokens, do_sample=False)
    model.train()
    # Two accumulated halves, as gradient accumulation or pipeline microbatches run them.
    loss = 0.0
    for rows in input_ids.chunk(2):
        half_loss = model(rows, labels=rows, use_cache=False).loss / 2
        half_loss.backward()
        loss += half_loss.item()
    grads = full_gradients(model)
    if dist.get_rank() == 0:
        print(f"tensor parallel over {dist.get_world_size()} ranks: logits {tuple(logits.shape)}, loss {loss:.4f}")
        if args.save:
            saved = {"input_ids": input_ids.cpu(), "logits": logits.cpu(), "generated": generated.cpu()}
            saved.update(loss=loss, grads=grads)
            torch.save(saved, args.save)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
