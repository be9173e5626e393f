"""Pipeline-parallel training of a FastGPT with `torch.distributed.pipelining`: the stage module a schedule runs, its
loss, the tied-embedding gradient sum between the first and last stages, and an optimizer that takes sharded
parameters. `examples/pipeline_parallel.py` trains with them; `benchmarks/bench.py parallel` times them.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from transformers.loss.loss_utils import ForCausalLMLoss

from .modeling_fastgpt import FastGPTForCausalLM


class FastGPTPipelineStage(nn.Module):
    """The stage of a `FastGPTForCausalLM` that Transformers' pipeline split left on this rank.

    Stage 0 maps token ids `[B, T]` to hidden states `[B, T, hidden]`, a middle stage hidden states to hidden
    states, the last stage hidden states to logits `[B, T, vocab]`: on the other stages `norm` and `lm_head` are
    identities, so the causal LM's forward returns its hidden states. Positions are `0..T-1`: pipeline training
    takes unpadded rows.
    """

    def __init__(self, model: FastGPTForCausalLM) -> None:
        super().__init__()
        # Transformers wraps the instance's forward with its own inference-only sends between stages; the schedule
        # does the sending here, so the class's forward runs (called through the module, so FSDP2's hooks run).
        del model.forward
        self.model = model
        self.is_first, self.is_last = model._pp_stage.pp_is_first_stage, model._pp_stage.pp_is_last_stage

    def forward(self, stage_input: torch.Tensor) -> torch.Tensor:
        inputs = {"input_ids": stage_input} if self.is_first else {"inputs_embeds": stage_input}
        return self.model(**inputs, use_cache=False).logits


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over the tokens of one microbatch (Transformers' causal LM loss)."""
    return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1])


def tied_embedding_group(model: FastGPTForCausalLM) -> dist.ProcessGroup | None:
    """This rank's pair (first stage, last stage) of one pipeline, which both hold the tied embedding matrix; None
    when the embeddings are not tied across stages. Collective: every rank creates every pair."""
    mesh = model._mesh_manager.get_mesh(("pp", "dp_replicate", "fsdp", "tp")).mesh  # [pp, 1, fsdp, tp] ranks
    pipelines = mesh.reshape(mesh.shape[0], -1).T.tolist()  # one list of stage ranks per pipeline
    if not model.config.tie_word_embeddings or len(pipelines[0]) == 1:
        return None
    group, _ = dist.new_subgroups_by_enumeration([[stages[0], stages[-1]] for stages in pipelines])
    return group


def sum_tied_embedding_grads(stage: FastGPTPipelineStage, group: dist.ProcessGroup | None) -> None:
    """Sum the first stage's embedding gradient and the last stage's tied `lm_head` gradient (the same matrix)."""
    if group is None or not (stage.is_first or stage.is_last):
        return
    weight = stage.model.model.embed_tokens.weight if stage.is_first else stage.model.lm_head.weight
    grad = weight.grad
    if isinstance(grad, DTensor):
        # DTensor's embedding backward may leave the gradient replicated; shard it as the weight (no communication)
        # so that both stages hold the same slices, then sum the local slices.
        if grad.placements != weight.placements:
            weight.grad = grad = grad.redistribute(placements=weight.placements)
        grad = grad.to_local()
    dist.all_reduce(grad, group=group)


def adamw_per_tensor_type(model: nn.Module, learning_rate: float) -> list[torch.optim.AdamW]:
    """AdamW over the DTensor parameters and another over the plain ones: a multi-tensor (foreach) step, the
    default on GPUs, cannot mix the two, and TP without FSDP leaves the norms plain."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    groups = ([p for p in parameters if isinstance(p, DTensor)], [p for p in parameters if not isinstance(p, DTensor)])
    return [torch.optim.AdamW(group, lr=learning_rate) for group in groups if group]
