"""Every folder the package or a README snippet writes opens alone, with `pipeline("text-generation", model=FOLDER)`
and with `fastgpt generate FOLDER`, and generates with its cache: `fastgpt train`'s final model and `checkpoint-N`,
`fastgpt quantize`'s output (each scheme that runs on the CPU), a model saved after `Trainer` as the demo saves it,
and the README's `my-fastgpt`."""

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import pipeline

from fastgpt_hf.cli import main
from fastgpt_hf.data import load_tokenizer, packed_datasets
from fastgpt_hf.training import causal_lm_trainer, model_for_tokenizer, training_arguments

from .conftest import write_text_files

README = Path(__file__).resolve().parents[1] / "README.md"
PROMPT = " = Valkyria Chronicles = \n"
NEW_TOKENS = 6
QUANTIZE_SCHEMES = ("dynamic-range", "torchao-int8-weight")
PACKAGE_FOLDER_KINDS = ("train", "checkpoint", *(f"quantize {scheme}" for scheme in QUANTIZE_SCHEMES), "demo")


def readme_python_snippets(containing: str) -> list[str]:
    """The README's ```python blocks that mention `containing`, in order."""
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)
    return [block for block in blocks if containing in block]


def save_like_the_demo(folder: Path, text_files: dict[str, Path]) -> None:
    """Train with `causal_lm_trainer`, then `model.save_pretrained` and `tokenizer.save_pretrained` (the demo)."""
    tokenizer = load_tokenizer()
    model = model_for_tokenizer("tiny", tokenizer, seed=0)
    blocks = packed_datasets(tokenizer, 32, text_files)
    arguments = training_arguments(folder / "trainer", max_steps=2, batch_size=2, precision="fp32", show_progress=False)
    causal_lm_trainer(model, arguments, blocks["train"]).train()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("folders")
    text_files = write_text_files(root)
    run = root / "run"
    train = ["train", "--preset", "tiny", "--output", str(run), "--max-steps", "2", "--batch-size", "2"]
    train += ["--block-size", "32", "--eval-blocks", "2", "--save-steps", "2", "--precision", "fp32"]
    main([*train, "--train-file", str(text_files["train"]), "--valid-file", str(text_files["validation"])])
    written = {"train": run, "checkpoint": run / "checkpoint-2"}
    for scheme in QUANTIZE_SCHEMES:
        written[f"quantize {scheme}"] = root / scheme
        main(["quantize", str(run), str(written[f"quantize {scheme}"]), "--scheme", scheme])
    written["demo"] = root / "demo"
    save_like_the_demo(written["demo"], text_files)
    return written


@pytest.fixture(scope="module")
def readme_folder(tmp_path_factory) -> Path:
    """Run the README's `my-fastgpt` snippets in a fresh folder; the folder they write."""
    workdir = tmp_path_factory.mktemp("readme")
    snippets = readme_python_snippets("my-fastgpt")
    assert snippets, "the README has no python snippet that writes my-fastgpt"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        namespace = {}
        for snippet in snippets:
            exec(compile(snippet, str(README), "exec"), namespace)
    return workdir / "my-fastgpt"


def forward_lengths(model: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """A list that collects the length of `input_ids` of every forward call of `model`, and the hook's handle."""
    lengths = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    return lengths, handle


def assert_opens_alone_and_generates_with_its_cache(folder: Path, capsys, cached_equals_uncached: bool = True) -> None:
    """`pipeline` and `fastgpt generate` open `folder` alone, print the same greedy text, and decode with the cache."""
    assert json.loads((folder / "config.json").read_text())["use_cache"] is True
    generator = pipeline("text-generation", model=str(folder))
    assert generator.tokenizer.padding_side == "left"
    lengths, handle = forward_lengths(generator.model)
    try:
        text = generator(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)[0]["generated_text"]
    finally:
        handle.remove()
    # The prompt goes through once; every later step feeds the one new token: the cache holds the rest.
    assert len(lengths) == NEW_TOKENS and lengths[0] > 1 and lengths[1:] == [1] * (NEW_TOKENS - 1), lengths

    main(["generate", str(folder), "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS)])
    assert capsys.readouterr().out == text + "\n"

    if cached_equals_uncached:
        inputs = generator.tokenizer(PROMPT, return_tensors="pt")
        uncached = generator.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False)
        assert generator.tokenizer.decode(uncached[0], skip_special_tokens=True) == text


@pytest.mark.parametrize("kind", PACKAGE_FOLDER_KINDS)
def test_every_folder_the_package_writes_opens_alone_and_generates_with_its_cache(kind, folders, capsys):
    # Dynamic-range int8 scales activations per call, by the tokens in it: with and without a cache differ there by
    # design, so only its cached greedy text is compared (pipeline against `fastgpt generate`).
    assert_opens_alone_and_generates_with_its_cache(folders[kind], capsys, kind != "quantize dynamic-range")


@pytest.mark.slow  # the README's snippet builds the `small` preset (27M parameters) and runs 1,000 tokens
def test_the_readme_snippets_folder_opens_alone_and_generates_with_its_cache(readme_folder, capsys):
    assert_opens_alone_and_generates_with_its_cache(readme_folder, capsys)
