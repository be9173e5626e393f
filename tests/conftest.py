"""Shared builders: tiny random FastGPT models and left-padded batches."""

from pathlib import Path

import pytest
import torch

import fastgpt_hf  # noqa: F401  (registers the Auto classes)
from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM
from fastgpt_hf.cli import main
from fastgpt_hf.data import CORPUS_FILES

STACKS = {
    "sliding": ["sliding_attention"] * 2,
    "dynamic": ["dynamic_attention"] * 2,
    "full": ["full_attention"] * 2,
    "mixed": ["sliding_attention", "dynamic_attention", "full_attention", "dynamic_attention"],
}


def tiny_model(
    stack: str | list[str] = "mixed",
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    **overrides,
) -> FastGPTForCausalLM:
    """A `tiny` preset model (windows 8 / 16, blocks of 4, 2 memory slots) with random weights, in eval mode; `stack`
    names one of `STACKS` or is the layer types themselves.

    Weights get a larger init than training uses so that attention is far from uniform and masks matter.
    """
    torch.manual_seed(seed)
    layer_types = STACKS[stack] if isinstance(stack, str) else stack
    config = FastGPTConfig.from_preset(
        "tiny",
        layer_types=layer_types,
        num_hidden_layers=len(layer_types),
        attn_implementation=attn_implementation,
        **{"initializer_range": 0.2, **overrides},
    )
    return FastGPTForCausalLM(config).to(dtype).eval()


def left_padded_batch(length: int, vocab_size: int = 128, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of `length` tokens: unpadded, 3 pads, half pads (at least one real token each)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (3, length), generator=generator)
    attention_mask = torch.ones(3, length, dtype=torch.long)
    attention_mask[1, : min(3, length - 1)] = 0
    attention_mask[2, : length // 2] = 0
    return input_ids, attention_mask


@pytest.fixture
def tiny_config() -> FastGPTConfig:
    return FastGPTConfig.from_preset("tiny")


def write_text_files(folder: Path) -> dict[str, Path]:
    """The first lines of the shipped excerpt's splits, as text files: seconds of training."""
    files = {}
    for split, lines in (("train", 30), ("validation", 10)):
        text = "".join(CORPUS_FILES[split].read_text(encoding="utf-8").splitlines(keepends=True)[:lines])
        files[split] = folder / f"{split}.txt"
        files[split].write_text(text, encoding="utf-8")
    return files


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of `fastgpt *argv`."""
    try:
        main(argv)
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err
