"""MQAR samples hold what they claim (answers recoverable, queries after the pairs, distances exact), the training
mix has its shares and labels, the sequence-mean loss weighs sequences equally, and MQAR accuracy scores what the
model predicts at the query positions."""

import random

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutput

from fastgpt_hf.data import load_tokenizer
from fastgpt_hf.passkey import FILLER, encode
from fastgpt_hf.recall_tasks import (
    IGNORE_INDEX,
    MQARVocabulary,
    mqar_accuracy,
    mqar_accuracy_by_query,
    mqar_distances,
    mqar_sample,
    mqar_vocabulary,
    sequence_mean_loss,
    training_mix,
)

LENGTH, PAIRS = 96, 6


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def vocabulary(tokenizer) -> MQARVocabulary:
    return mqar_vocabulary(tokenizer, num_keys=16, num_values=16)


def test_vocabulary_is_disjoint_from_values_filler_and_special_tokens(tokenizer, vocabulary):
    keys, values = set(vocabulary.keys), set(vocabulary.values)
    assert len(keys) == len(values) == 16 and not keys & values
    assert not (keys | values) & (set(encode(tokenizer, FILLER)) | set(tokenizer.all_special_ids))
    assert vocabulary.bos == (tokenizer.bos_token_id,)


def test_vocabulary_larger_than_the_tokenizer_is_refused(tokenizer):
    with pytest.raises(ValueError, match="usable"):
        mqar_vocabulary(tokenizer, num_keys=len(tokenizer), num_values=1)


@pytest.mark.parametrize("distance", ["nearest", 20, 47, "farthest"])
def test_sample_answers_are_recoverable_and_placed_at_the_distance(vocabulary, distance):
    nearest, farthest = mqar_distances(vocabulary, LENGTH, PAIRS)
    distance = {"nearest": nearest, "farthest": farthest}.get(distance, distance)
    for seed in range(20):  # many shuffles of the queries
        sample = mqar_sample(vocabulary, LENGTH, PAIRS, distance, random.Random(seed))
        ids = sample.input_ids
        assert len(ids) == len(sample.labels) == LENGTH
        pairs = {ids[key]: ids[key + 1] for key in sample.key_positions}
        assert (
            len(pairs) == PAIRS and set(pairs) <= set(vocabulary.keys) and set(pairs.values()) <= set(vocabulary.values)
        )
        assert min(sample.query_positions) > max(sample.key_positions) + 1  # every query after every pair
        for key, query in zip(sample.key_positions, sample.query_positions, strict=True):
            assert ids[query] == ids[key] and sample.labels[query + 1] == ids[query + 1] == pairs[ids[key]]
        labelled = [position for position, label in enumerate(sample.labels) if label != IGNORE_INDEX]
        assert labelled == sorted(query + 1 for query in sample.query_positions)
        gaps = [query - key for key, query in zip(sample.key_positions, sample.query_positions, strict=True)]
        assert min(gaps) == distance


def test_sample_outside_the_distances_is_refused(vocabulary):
    nearest, farthest = mqar_distances(vocabulary, LENGTH, PAIRS)
    for distance in (nearest - 1, farthest + 1):
        with pytest.raises(ValueError, match="distance must be in"):
            mqar_sample(vocabulary, LENGTH, PAIRS, distance, random.Random(0))


def test_training_mix_has_its_shares_and_labels(tokenizer, vocabulary):
    length = 128
    text = [[7 + index] * length for index in range(10)]
    mix = training_mix(text, tokenizer, vocabulary, 16, mqar_share=0.25, passkey_share=0.25, num_pairs=4)
    rows = list(zip(mix["input_ids"], mix["labels"], strict=True))
    assert len(rows) == 16 and all(len(ids) == length for ids, _ in rows)
    text_rows = [labels for ids, labels in rows if labels == ids]
    answers = [[label for label in labels if label != IGNORE_INDEX] for _, labels in rows]
    mqar_rows = [labels for (_, labels), kept in zip(rows, answers, strict=True) if set(kept) <= set(vocabulary.values)]
    assert all(len([label for label in labels if label != IGNORE_INDEX]) == 4 for labels in mqar_rows)
    assert len(text_rows) == 8 and len(mqar_rows) == 4
    passkey_rows = [(ids, labels) for ids, labels in rows if labels != ids and labels not in mqar_rows]
    assert len(passkey_rows) == 4
    for ids, labels in passkey_rows:  # labelled on the answer, which ends the block
        answer = [label for label in labels if label != IGNORE_INDEX]
        assert labels[-len(answer) :] == ids[-len(answer) :] == answer
    with pytest.raises(ValueError, match="shares"):
        training_mix(text, tokenizer, vocabulary, 16, mqar_share=0.75, passkey_share=0.5, num_pairs=4)


def test_training_mix_takes_the_text_again_when_it_needs_more_blocks(tokenizer, vocabulary):
    """The `gpu` size of the quality harness needs more text blocks than WikiText-2's train split holds at its
    block length: the text is taken again from its first block, each block at most twice here."""
    text = [[7 + index] * 128 for index in range(3)]
    mix = training_mix(text, tokenizer, vocabulary, 10, mqar_share=0.2, passkey_share=0.3, num_pairs=4)
    text_rows = sorted(ids[0] for ids, labels in zip(mix["input_ids"], mix["labels"], strict=True) if ids == labels)
    assert text_rows == [7, 7, 8, 8, 9]
    with pytest.raises(ValueError, match="the text gives none"):
        training_mix([], tokenizer, vocabulary, 10, mqar_share=0.2, passkey_share=0.3, num_pairs=4)


def test_sequence_mean_loss_weighs_each_sequence_equally():
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[1, 2, 3, 4, 5], [IGNORE_INDEX] * 4 + [6]])
    first = F.cross_entropy(logits[0, :-1], labels[0, 1:])
    second = F.cross_entropy(logits[1, 3:4], labels[1, 4:])
    torch.testing.assert_close(sequence_mean_loss(logits, labels), (first + second) / 2)


class NextTokenOracle(torch.nn.Module):
    """Predicts each next input token (teacher forcing makes it visible), or a constant token when `wrong`."""

    def __init__(self, vocab_size: int, wrong: bool = False) -> None:
        super().__init__()
        self.vocab_size, self.wrong = vocab_size, wrong
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor) -> CausalLMOutput:
        following = torch.roll(input_ids, -1, dims=1)
        return CausalLMOutput(
            logits=F.one_hot(torch.zeros_like(following) if self.wrong else following, self.vocab_size).float()
        )


def test_mqar_accuracy_scores_the_predictions_at_the_queries(tokenizer, vocabulary):
    oracle, constant = NextTokenOracle(len(tokenizer)), NextTokenOracle(len(tokenizer), wrong=True)
    assert mqar_accuracy(oracle, vocabulary, LENGTH, PAIRS, 40, trials=5, batch_size=2) == 1.0
    assert mqar_accuracy(constant, vocabulary, LENGTH, PAIRS, 40, trials=5, batch_size=2) == 0.0
    assert mqar_accuracy_by_query(oracle, vocabulary, LENGTH, PAIRS, 40, trials=5) == [1.0] * PAIRS
    assert mqar_accuracy_by_query(constant, vocabulary, LENGTH, PAIRS, 40, trials=5) == [0.0] * PAIRS
