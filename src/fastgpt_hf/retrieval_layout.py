"""Which layers of a source model retrieve, and the FastGPT layout that keeps them full: `fastgpt convert
--full-layers K`.

A converted model sees a token beyond its windows only through its full layers and the dynamic layers' block
summaries, so which layers stay full decides whether it keeps the source's retrieval. Retrieval heads sit in a
few layers, not the deepest ones: SmolLM2-135M converted with its 15 deepest layers full and attention sinks finds
no pass key 3,000 to 8,000 tokens back, with the 15 layers that retrieve most full it finds those up to 5,000
back as the source does (benchmarks/RESULTS.md, "convert").

`retrieval_scores` runs the source with eager attention on pass-key samples (`passkey`) that it answers and scores
each layer by its most retrieving head: the share of attention the head gives, from the positions that predict the
answer, to the needle (the sentence holding the key), averaged over the samples. `retrieval_layout` keeps the K
highest-scoring layers full; of the others, those below the first full layer are sliding (FastGPT's lowest stage)
and the rest dynamic.
"""

import random

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .configuration_fastgpt import DYNAMIC, FULL, SLIDING
from .passkey import needle_distances, passkey_sample, sample_pieces

SCORING_LENGTH = 2048  # tokens of each scoring sample: every attention map fits in memory on a CPU


@torch.no_grad()
def retrieval_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    samples: int = 6,
    length: int | None = None,
    seed: int = 0,
) -> list[float]:
    """Per layer of `model` (a causal LM that can return attention weights), the largest over heads of the mean
    attention share from the answer-predicting positions to the needle, over `samples` pass-key samples of `length`
    tokens (default: `SCORING_LENGTH` or the model's positions if fewer) with the needle in the first half. A
    ValueError if the model answers none of them (its scores would show where it looks, not where it retrieves)."""
    if model.config._attn_implementation != "eager":
        raise ValueError("Retrieval scores need attention weights: set the model's attn_implementation to 'eager'.")
    length = length or min(SCORING_LENGTH, model.config.max_position_embeddings)
    rng = random.Random(seed)
    device = next(model.parameters()).device
    totals, answered = None, 0
    for _ in range(samples):
        key = rng.randint(10000, 99999)
        pieces = sample_pieces(tokenizer, key)
        nearest, farthest = needle_distances(pieces, length)
        if max(nearest, length // 2) > farthest:
            raise ValueError(
                f"Pass-key samples of {length} tokens cannot put the needle in their first half (needle to question "
                f"{nearest} to {farthest} tokens); score with a longer length (a few hundred tokens or more)."
            )
        distance = rng.randint(max(nearest, length // 2), farthest)
        sample = passkey_sample(tokenizer, length, distance, key)
        needle_start = sample.answer_start - distance  # the distance runs from the needle's start to the question's end
        needle = slice(needle_start, needle_start + len(pieces["needle"]))
        answer_rows = slice(sample.answer_start - 1, length - 1)
        output = model(torch.tensor([sample.input_ids], device=device), output_attentions=True)
        predicted = output.logits[0, answer_rows].argmax(-1).tolist()
        if predicted != sample.input_ids[sample.answer_start :]:
            continue
        answered += 1
        # Each layer's weights [1, H, T, T] -> per head, the mean over answer rows of the mass on the needle.
        shares = torch.stack([weights[0, :, answer_rows, needle].sum(-1).mean(-1) for weights in output.attentions])
        totals = shares.float() if totals is None else totals + shares.float()
    if not answered:
        raise ValueError(
            f"The source retrieved none of {samples} pass keys at {length} tokens, so its attention cannot show "
            "which layers retrieve; choose the layout with --layer-types instead."
        )
    return (totals / answered).max(dim=1).values.tolist()


def retrieval_layout(scores: list[float], full_layers: int) -> list[str]:
    """Layer types: the `full_layers` layers of highest score full, the other layers below the first full one
    sliding, the rest dynamic."""
    if not 0 < full_layers <= len(scores):
        raise ValueError(f"--full-layers must be between 1 and the source's {len(scores)} layers, not {full_layers}.")
    full = set(sorted(range(len(scores)), key=lambda layer: -scores[layer])[:full_layers])
    first_full = min(full)
    return [FULL if layer in full else SLIDING if layer < first_full else DYNAMIC for layer in range(len(scores))]
