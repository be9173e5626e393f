"""Synthetic recall tasks and the training mix of the quality harness (`benchmarks/quality.py`).

- Multi-query associative recall (MQAR, Zoology: Arora et al., 2023): `num_pairs` key-value pairs, a filler gap,
  then every key again as a query, in shuffled order, each followed by its value (the answer). Keys and values are
  two disjoint sets of ordinary token ids of the tokenizer, none of them a special token or a token of the
  filler (`passkey.FILLER` repeated); a sample's keys are distinct and so are its values. Only the answers are
  labelled. `distance` places the pairs: every query comes at least `distance` tokens after its key, the nearest
  exactly `distance`.
- The training mix: WikiText blocks (every token labelled), MQAR blocks whose gap is drawn uniformly over what the
  block allows, and pass-key blocks (`passkey.passkey_samples`, needle anywhere) labelled on the answer alone.
- `SequenceMeanTrainer` averages the loss over each sequence's labelled tokens and then over the sequences, so
  that a recall block's few answers weigh as much as a text block's hundreds of tokens; for text blocks of one
  length it is the usual per-token mean.
- `mqar_accuracy`: the share of queries whose answer the model's argmax predicts (teacher-forced, as
  `passkey.passkey_accuracy`, which scores the pass key); `mqar_accuracy_by_query` the share for the first, second,
  ... query asked, which tells key-value association from elimination (a model that copies any value not yet
  answered, without matching keys, scores 1/n, 1/(n-1), ..., 1 for n pairs: 52% overall for 4).
"""

import itertools
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .passkey import FILLER, encode, passkey_samples, repeated
from .training import PerplexityTrainer

IGNORE_INDEX = -100  # the label of a position that carries no loss (Transformers' convention)


@dataclass(frozen=True)
class MQARVocabulary:
    """Token ids of an MQAR task: keys, values (disjoint), the filler sentence and the BOS prefix (empty or one)."""

    keys: tuple[int, ...]
    values: tuple[int, ...]
    filler: tuple[int, ...]
    bos: tuple[int, ...]


def mqar_vocabulary(
    tokenizer: PreTrainedTokenizerBase, num_keys: int = 64, num_values: int = 64, first_id: int = 1000
) -> MQARVocabulary:
    """The first `num_keys` then `num_values` ids from `first_id` on that are neither special nor filler tokens."""
    filler = encode(tokenizer, FILLER)
    excluded = set(filler) | set(tokenizer.all_special_ids)
    ids = [token for token in range(first_id, len(tokenizer)) if token not in excluded][: num_keys + num_values]
    if len(ids) < num_keys + num_values or min(num_keys, num_values) < 1:
        raise ValueError(
            f"An MQAR task needs at least one key and one value and {num_keys + num_values} token ids from "
            f"{first_id} on; this tokenizer has {len(ids)} usable ones. Use fewer keys / values or a lower first_id."
        )
    bos = () if tokenizer.bos_token_id is None else (tokenizer.bos_token_id,)
    return MQARVocabulary(tuple(ids[:num_keys]), tuple(ids[num_keys:]), tuple(filler), bos)


@dataclass
class MQARSample:
    """One sample: token ids, labels (`IGNORE_INDEX` but at the answers), where each pair's key stands and where it
    is asked (its answer follows at the next position)."""

    input_ids: list[int]
    labels: list[int]
    key_positions: list[int]
    query_positions: list[int]


def mqar_distances(vocabulary: MQARVocabulary, length: int, num_pairs: int) -> tuple[int, int]:
    """The least and the greatest key-to-query distance an MQAR sample of `length` tokens takes for any order."""
    return 2 * num_pairs, length - len(vocabulary.bos) - 4 * num_pairs + 2


def mqar_sample(
    vocabulary: MQARVocabulary, length: int, num_pairs: int, distance: int, rng: random.Random
) -> MQARSample:
    """A sample of exactly `length` tokens: BOS, the pairs, filler, the queries with their answers, filler.

    The gap is chosen so that the nearest query is exactly `distance` tokens after its key; a ValueError when
    `distance` is outside `mqar_distances`.
    """
    if not 1 <= num_pairs <= min(len(vocabulary.keys), len(vocabulary.values)):
        raise ValueError(f"num_pairs must be in [1, {min(len(vocabulary.keys), len(vocabulary.values))}].")
    nearest, farthest = mqar_distances(vocabulary, length, num_pairs)
    if not nearest <= distance <= farthest:
        raise ValueError(
            f"An MQAR sample of {length} tokens with {num_pairs} pairs cannot put its queries {distance} tokens "
            f"after their keys: the distance must be in [{nearest}, {farthest}]."
        )
    keys, values = rng.sample(vocabulary.keys, num_pairs), rng.sample(vocabulary.values, num_pairs)
    asked = rng.sample(range(num_pairs), num_pairs)  # asked[slot] = the pair asked in that query slot
    slot_of = {pair: slot for slot, pair in enumerate(asked)}
    # Pair i's key stands at start + 2i and is asked at start + 2n + gap + 2 * slot(i).
    gap = distance - 2 * num_pairs - min(2 * slot_of[pair] - 2 * pair for pair in range(num_pairs))
    start = len(vocabulary.bos)
    input_ids = list(vocabulary.bos) + [token for pair in zip(keys, values, strict=True) for token in pair]
    input_ids += repeated(list(vocabulary.filler), gap)
    queries_start = len(input_ids)
    input_ids += [token for pair in asked for token in (keys[pair], values[pair])]
    input_ids += repeated(list(vocabulary.filler), length - len(input_ids))
    labels = [IGNORE_INDEX] * length
    query_positions = [queries_start + 2 * slot_of[pair] for pair in range(num_pairs)]
    for pair, position in enumerate(query_positions):
        labels[position + 1] = values[pair]
    key_positions = [start + 2 * pair for pair in range(num_pairs)]
    return MQARSample(input_ids, labels, key_positions, query_positions)


def mqar_samples(
    vocabulary: MQARVocabulary, length: int, num_pairs: int, count: int, seed: int = 0
) -> list[MQARSample]:
    """`count` training samples with distances drawn uniformly over what `length` allows."""
    rng = random.Random(seed)
    nearest, farthest = mqar_distances(vocabulary, length, num_pairs)
    return [mqar_sample(vocabulary, length, num_pairs, rng.randint(nearest, farthest), rng) for _ in range(count)]


def answer_labels(input_ids: list[int], answer_start: int) -> list[int]:
    """Labels that keep only the tokens from `answer_start` on."""
    return [IGNORE_INDEX] * answer_start + input_ids[answer_start:]


def training_mix(
    text_blocks: list[list[int]],
    tokenizer: PreTrainedTokenizerBase,
    vocabulary: MQARVocabulary,
    count: int,
    mqar_share: float,
    passkey_share: float,
    num_pairs: int,
    seed: int = 0,
) -> Dataset:
    """`count` blocks of the text blocks' length (`input_ids`, `labels`), shuffled: an `mqar_share` of MQAR samples,
    a `passkey_share` of pass-key samples (labelled on the answer), the rest the `text_blocks` in order (from the
    first again where the mix needs more: a second epoch of the text)."""
    if not (0 <= mqar_share and 0 <= passkey_share and mqar_share + passkey_share <= 1):
        raise ValueError(f"The shares must be >= 0 with a sum <= 1, got MQAR {mqar_share}, pass key {passkey_share}.")
    if not text_blocks:
        raise ValueError("The mix takes its block length from the text blocks and the text gives none; give more text.")
    length = len(text_blocks[0])
    num_mqar, num_passkey = round(count * mqar_share), round(count * passkey_share)
    num_text = count - num_mqar - num_passkey
    rows = [(block, block) for block in itertools.islice(itertools.cycle(text_blocks), num_text)]
    rows += [
        (sample.input_ids, sample.labels) for sample in mqar_samples(vocabulary, length, num_pairs, num_mqar, seed)
    ]
    rows += [
        (sample.input_ids, answer_labels(sample.input_ids, sample.answer_start))
        for sample in passkey_samples(tokenizer, length, num_passkey, seed)
    ]
    random.Random(seed).shuffle(rows)
    input_ids = np.array([row[0] for row in rows], dtype=np.int64)
    labels = np.array([row[1] for row in rows], dtype=np.int64)
    return Dataset.from_dict({"input_ids": input_ids, "labels": labels})


def sequence_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (float32) averaged over each row's labelled positions, then over the rows that have
    any. logits `[B, T, vocab]`, labels `[B, T]` (`IGNORE_INDEX` for no loss)."""
    targets = labels[:, 1:]
    token_losses = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )  # [B, T - 1]
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    has_labels = counts > 0
    return (token_losses.sum(dim=1)[has_labels] / counts[has_labels]).mean()


class SequenceMeanTrainer(PerplexityTrainer):
    """A `PerplexityTrainer` whose loss is `sequence_mean_loss`: each sequence weighs the same."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # The loss is a mean per batch: Trainer divides it by the accumulation steps itself.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        outputs = model(**{name: value for name, value in inputs.items() if name != "labels"})
        loss = sequence_mean_loss(outputs.logits, labels)
        return (loss, outputs) if return_outputs else loss


@torch.no_grad()
def mqar_accuracy(
    model: PreTrainedModel,
    vocabulary: MQARVocabulary,
    length: int,
    num_pairs: int,
    distance: int,
    trials: int = 16,
    seed: int = 0,
    batch_size: int = 4,
) -> float:
    """Share of the queries of `trials` samples at `distance` whose answer the model's argmax predicts."""
    by_query = mqar_accuracy_by_query(model, vocabulary, length, num_pairs, distance, trials, seed, batch_size)
    return sum(by_query) / num_pairs


def mqar_accuracy_by_query(
    model: PreTrainedModel,
    vocabulary: MQARVocabulary,
    length: int,
    num_pairs: int,
    distance: int,
    trials: int = 16,
    seed: int = 0,
    batch_size: int = 4,
) -> list[float]:
    """For k = 1 .. `num_pairs`: the share of `trials` samples at `distance` whose k-th query (in the order asked;
    the earlier answers are in the context, teacher-forced) the model's argmax answers."""
    rng = random.Random(seed)
    samples = [mqar_sample(vocabulary, length, num_pairs, distance, rng) for _ in range(trials)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = [0] * num_pairs
    for first in range(0, trials, batch_size):
        batch = samples[first : first + batch_size]
        logits = model(torch.tensor([sample.input_ids for sample in batch], device=device)).logits
        for row, sample in enumerate(batch):
            asked = sorted(sample.query_positions)
            predicted = logits[row, asked].argmax(-1).tolist()
            for query, (guess, position) in enumerate(zip(predicted, asked, strict=True)):
                correct[query] += guess == sample.input_ids[position + 1]
    model.train(was_training)
    return [count / trials for count in correct]
