"""Synthetic pass-key retrieval (Mohtashami and Jaggi, 2023): a five-digit number hidden in filler text, asked for
at the end. Training sequences for `fastgpt uptrain`, and the retrieval check of a converted model.

A sample is `[BOS] introduction, filler, needle, filler, question, answer` in token ids, each piece tokenized on its
own (so the needle's position is exact): `needle_distance` tokens separate the needle's first token from the end of
the question, which is what a windowed layer must bridge; the filler is cut to the token to give exact lengths.
The check is teacher-forced: a sample counts as retrieved when the model's argmax predicts every answer token,
which is what greedy decoding would write.
"""

import random
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

INTRODUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about it."
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}"


@dataclass
class PasskeySample:
    """Token ids of one sample (answer included) and where its answer starts."""

    input_ids: list[int]
    answer_start: int


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def repeated(unit: list[int], count: int) -> list[int]:
    """The first `count` tokens of `unit` repeated."""
    return (unit * (count // len(unit) + 1))[:count]


def filler_tokens(tokenizer: PreTrainedTokenizerBase, count: int) -> list[int]:
    """The first `count` tokens of the filler sentence repeated."""
    return repeated(encode(tokenizer, FILLER), count)


def sample_pieces(tokenizer: PreTrainedTokenizerBase, key: int) -> dict[str, list[int]]:
    """The token ids of a sample's fixed pieces for `key`: bos (empty without a BOS token), introduction, needle,
    question and answer."""
    return {
        "bos": [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id],
        "introduction": encode(tokenizer, INTRODUCTION),
        "needle": encode(tokenizer, NEEDLE.format(key=key)),
        "question": encode(tokenizer, QUESTION),
        "answer": encode(tokenizer, ANSWER.format(key=key)),
    }


def needle_distances(pieces: dict[str, list[int]], length: int) -> tuple[int, int]:
    """The least and the greatest needle distance a sample of `length` tokens with these pieces can have."""
    nearest = len(pieces["needle"]) + len(pieces["question"])
    farthest = length - len(pieces["bos"]) - len(pieces["introduction"]) - len(pieces["answer"])
    return nearest, farthest


def passkey_sample(tokenizer: PreTrainedTokenizerBase, length: int, needle_distance: int, key: int) -> PasskeySample:
    """A sample of exactly `length` tokens, answer included, whose needle starts `needle_distance` tokens before the
    end of the question; a ValueError when the pieces do not fit."""
    pieces = sample_pieces(tokenizer, key)
    nearest, farthest = needle_distances(pieces, length)
    if not nearest <= needle_distance <= farthest:
        raise ValueError(
            f"A pass-key sample of {length} tokens cannot put its needle {needle_distance} tokens before the "
            f"question's end: the distance must be in [{nearest}, {farthest}]."
        )
    before, after = farthest - needle_distance, needle_distance - nearest
    prompt = pieces["bos"] + pieces["introduction"] + filler_tokens(tokenizer, before) + pieces["needle"]
    prompt += filler_tokens(tokenizer, after) + pieces["question"]
    return PasskeySample(prompt + pieces["answer"], len(prompt))


def passkey_samples(
    tokenizer: PreTrainedTokenizerBase, block_size: int, count: int, seed: int = 0
) -> list[PasskeySample]:
    """`count` training samples of `block_size` tokens with random keys and needles anywhere in the block."""
    rng = random.Random(seed)
    samples = []
    for _ in range(count):
        key = rng.randint(10000, 99999)
        nearest, farthest = needle_distances(sample_pieces(tokenizer, key), block_size)
        if farthest < nearest:
            raise ValueError(
                f"Pass-key sequences need blocks of at least {block_size + nearest - farthest} tokens with this "
                f"tokenizer, not {block_size}; use longer blocks or no pass-key sequences."
            )
        distance = rng.randint(nearest, farthest)
        samples.append(passkey_sample(tokenizer, block_size, distance, key))
    return samples


@torch.no_grad()
def passkey_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    needle_distance: int,
    trials: int = 5,
    seed: int = 0,
) -> float:
    """Share of `trials` samples (random keys) whose answer the model predicts in full (teacher-forced argmax)."""
    rng = random.Random(seed)
    device = next(model.parameters()).device
    retrieved = 0
    for _ in range(trials):
        sample = passkey_sample(tokenizer, length, needle_distance, rng.randint(10000, 99999))
        input_ids = torch.tensor([sample.input_ids], device=device)
        logits = model(input_ids).logits[0]
        predicted = logits[sample.answer_start - 1 : -1].argmax(-1).tolist()
        retrieved += predicted == sample.input_ids[sample.answer_start :]
    return retrieved / trials
