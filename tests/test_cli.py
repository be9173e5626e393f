"""`fastgpt` console script: every subcommand's help, a tiny train / eval / generate / bench, clear errors."""

import importlib.util
import subprocess
import sys

import pytest
import torch

from fastgpt_hf import quantization
from fastgpt_hf.cli import COMMANDS, main
from fastgpt_hf.data import CORPUS_FILES, evaluate_perplexity, load_tokenizer

from .conftest import tiny_model

HAS_MODEL_CARD = importlib.util.find_spec("fastgpt_hf.model_card") is not None


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of `fastgpt *argv`."""
    try:
        main(argv)
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_top_level_help_lists_every_command(capsys):
    status, out, _ = run_cli(["--help"], capsys)
    assert status == 0
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("command", COMMANDS)
def test_each_subcommand_explains_itself(command, capsys):
    if command in ("card", "push") and not HAS_MODEL_CARD:
        status, _, err = run_cli([command, "--help"], capsys)
        assert status == 2 and "has no model_card module" in err
        return
    status, out, _ = run_cli([command, "--help"], capsys)
    assert status == 0
    assert f"usage: fastgpt {command}" in out


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    files = {}
    for split, lines in (("train", 30), ("validation", 10)):
        text = "".join(CORPUS_FILES[split].read_text(encoding="utf-8").splitlines(keepends=True)[:lines])
        files[split] = folder / f"{split}.txt"
        files[split].write_text(text, encoding="utf-8")
    return files


def test_train_eval_generate_on_a_tiny_preset(text_files, tmp_path, capsys):
    output = tmp_path / "run"
    train = ["train", "--preset", "tiny", "--output", str(output), "--max-steps", "2", "--batch-size", "2"]
    train += ["--block-size", "32", "--eval-blocks", "2", "--save-steps", "2", "--set", "num_hidden_layers=3"]
    train += ["--train-file", str(text_files["train"]), "--valid-file", str(text_files["validation"])]
    status, out, err = run_cli(train, capsys)
    assert status == 0, err
    assert "eval_perplexity" in out
    for name in ("config.json", "model.safetensors", "tokenizer.json", "checkpoint-2"):
        assert (output / name).exists(), name

    status, out, err = run_cli(["eval", str(output), "--file", str(text_files["validation"]), "--window", "32"], capsys)
    assert status == 0, err
    assert "perplexity per token" in out and "per word" in out

    status, out, err = run_cli(["generate", str(output), "--prompt", " The game", "--max-new-tokens", "5"], capsys)
    assert status == 0, err
    assert out.startswith(" The game") and len(out) > len(" The game\n")


def test_bench_prints_both_models(capsys):
    status, out, err = run_cli(["bench", "--preset", "tiny", "--lengths", "40", "--new-tokens", "3"], capsys)
    assert status == 0, err
    assert "FastGPT" in out and "Llama" in out


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_missing_checkpoint_is_a_clear_error(command, tmp_path, capsys):
    status, _, err = run_cli([command, str(tmp_path / "absent")], capsys)
    assert status == 2
    assert "is not a checkpoint folder (no config.json)" in err
    assert "Traceback" not in err


def test_unknown_preset_and_missing_file_are_clear_errors(tmp_path, capsys):
    status, _, err = run_cli(["train", "--preset", "huge"], capsys)
    assert status == 2 and "invalid choice: 'huge'" in err
    status, _, err = run_cli(["train", "--train-file", str(tmp_path / "absent.txt")], capsys)
    assert status == 2 and "file not found" in err
    status, _, err = run_cli(["bench", "--checkpoint", str(tmp_path)], capsys)
    assert status == 2 and "not a checkpoint folder" in err


def test_bad_override_is_a_clear_error(capsys):
    status, _, err = run_cli(["train", "--preset", "tiny", "--set", "sliding_window=-1", "--max-steps", "1"], capsys)
    assert status == 2
    assert "sliding_window must be a positive integer" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--grad-accum", "0"], "argument --grad-accum: must be a positive integer, got 0"),
        (["train", "--eval-blocks", "-1"], "argument --eval-blocks: must be a positive integer, got -1"),
        (["eval", "somewhere", "--max-chars", "0"], "argument --max-chars: must be a positive integer, got 0"),
        (["bench", "--lengths", "x"], "argument --lengths: must be a positive integer, got 'x'"),
    ],
    ids=["grad-accum", "eval-blocks", "max-chars", "lengths"],
)
def test_counts_that_are_not_positive_are_clear_errors(argv, message, capsys):
    status, _, err = run_cli(argv, capsys)
    assert status == 2 and message in err


def test_text_too_short_for_one_block_and_empty_text_are_clear_errors(text_files, tmp_path, capsys):
    train = ["train", "--preset", "tiny", "--output", str(tmp_path / "run"), "--max-steps", "1", "--block-size"]
    train += ["100000", "--train-file", str(text_files["train"]), "--valid-file", str(text_files["validation"])]
    status, _, err = run_cli(train, capsys)
    assert status == 2 and "The train text has fewer tokens than one block of 100000" in err
    tokenizer = load_tokenizer()
    model = tiny_model("mixed", dtype=torch.float32, vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="The text to evaluate has no words"):
        evaluate_perplexity(model, tokenizer, "", window=32, stride=16)


def test_module_runs_as_a_script():
    finished = subprocess.run([sys.executable, "-m", "fastgpt_hf.cli", "--help"], capture_output=True, text=True)
    assert finished.returncode == 0 and "train" in finished.stdout


def test_checkpoint_without_its_tokenizer_and_a_smaller_vocabulary_is_a_clear_error(tmp_path, capsys):
    tiny_model("mixed", dtype=torch.float32).save_pretrained(tmp_path)  # 128 tokens, no tokenizer.json
    status, _, err = run_cli(["generate", str(tmp_path)], capsys)
    assert status == 2 and "has a vocabulary of 128 tokens but the shipped tokenizer" in err


def test_dynamic_range_folder_opens_with_generate_eval_bench_and_card(text_files, tmp_path, capsys):
    tokenizer = load_tokenizer()
    model = quantization.dynamic_range_quantize(tiny_model("mixed", dtype=torch.float32, vocab_size=len(tokenizer)))
    quantization.save_dynamic_range(model, tmp_path)
    prompt = tokenizer(" The game", return_tensors="pt")
    expected = model.generate(**prompt, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    status, out, err = run_cli(["generate", str(tmp_path), "--prompt", " The game", "--max-new-tokens", "3"], capsys)
    assert status == 0, err
    assert out == tokenizer.decode(expected[0], skip_special_tokens=True) + "\n"
    evaluate = ["eval", str(tmp_path), "--file", str(text_files["validation"]), "--window", "16", "--max-chars", "300"]
    status, out, err = run_cli(evaluate, capsys)
    assert status == 0 and "perplexity per token" in out, err
    bench = ["bench", "--checkpoint", str(tmp_path), "--lengths", "8", "--new-tokens", "2", "--no-llama"]
    status, out, err = run_cli(bench, capsys)
    assert status == 0 and "FastGPT" in out, err
    if HAS_MODEL_CARD:
        status, out, err = run_cli(["card", str(tmp_path)], capsys)
        assert status == 0 and (tmp_path / "README.md").is_file(), err


def test_dynamic_range_pickle_of_older_versions_is_refused(tmp_path, capsys):
    tiny_model("mixed", dtype=torch.float32).config.save_pretrained(tmp_path)
    (tmp_path / quantization.PICKLED_DYNAMIC_RANGE_WEIGHTS).write_bytes(b"not opened")
    status, _, err = run_cli(["generate", str(tmp_path)], capsys)
    assert status == 2 and "dynamic_range_int8.pt is a pickle" in err and "re-quantize" in err
