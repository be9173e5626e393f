"""`fastgpt` console script: every subcommand's help, a tiny train / eval / generate / bench, clear errors, output
folders never clobbered or shared, Ctrl-C during training saves a checkpoint that `--resume last` continues."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM, data, quantization, training
from fastgpt_hf.cli import COMMANDS
from fastgpt_hf.data import evaluate_perplexity, load_tokenizer
from fastgpt_hf.output_folders import writer_lock

from .conftest import run_cli, tiny_model, write_text_files

HAS_MODEL_CARD = importlib.util.find_spec("fastgpt_hf.model_card") is not None


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
    return write_text_files(tmp_path_factory.mktemp("text"))


def tiny_train(output: Path, text_files: dict[str, Path], *options: str, max_steps: int = 2) -> list[str]:
    """`fastgpt train` arguments for a 3-layer tiny model on the tiny text files, blocks of 32, batches of 2."""
    argv = ["train", "--preset", "tiny", "--output", str(output), "--max-steps", str(max_steps), "--batch-size", "2"]
    argv += ["--block-size", "32", "--eval-blocks", "2", "--set", "num_hidden_layers=3"]
    return argv + ["--train-file", str(text_files["train"]), "--valid-file", str(text_files["validation"]), *options]


def test_train_eval_generate_on_a_tiny_preset(text_files, tmp_path, capsys):
    output = tmp_path / "run"
    status, out, err = run_cli(tiny_train(output, text_files, "--save-steps", "2"), capsys)
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


@pytest.mark.parametrize("preset", ["small", "1b"])
def test_info_prints_each_layer_with_its_sparsity_and_the_parameters(preset, capsys):
    status, out, err = run_cli(["info", "--preset", preset, "--length", "4096"], capsys)
    assert status == 0, err
    config = FastGPTConfig.from_preset(preset)
    with torch.device("meta"):
        model, llama = FastGPTForCausalLM(config), training.llama_peer(config)
    layer_lines = out.splitlines()[2 : 2 + config.num_hidden_layers]
    assert [line.split()[1] for line in layer_lines] == config.layer_types
    assert [line.split()[-1] for line in layer_lines] == [f"{share:.1%}" for share in model.attention_sparsity(4096)]
    assert f"FastGPT {model.num_parameters():,}, Llama of the same shape {llama.num_parameters():,}" in out


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


@pytest.mark.slow
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


def fail_if_called(*args, **kwargs):
    raise AssertionError("the command went on to load a model or read data before refusing")


@pytest.fixture
def no_work(monkeypatch):
    """Reading training text or loading a checkpoint to quantize fails the test: refusals must come first."""
    monkeypatch.setattr(data, "packed_datasets", fail_if_called)
    monkeypatch.setattr(data, "load_tokenizer", fail_if_called)
    monkeypatch.setattr(quantization, "load_quantized", fail_if_called)


@pytest.fixture
def float_checkpoint(tmp_path) -> Path:
    folder = tmp_path / "float"
    tiny_model("mixed", dtype=torch.float32).save_pretrained(folder)
    return folder


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("where", ["itself", "its parent"])
def test_quantize_into_its_own_checkpoint_is_refused_even_with_overwrite(float_checkpoint, where, no_work, capsys):
    output = float_checkpoint if where == "itself" else float_checkpoint.parent
    before = folder_contents(float_checkpoint)
    argv = ["quantize", str(float_checkpoint), str(output), "--scheme", "dynamic-range", "--overwrite"]
    status, _, err = run_cli(argv, capsys)
    relation = "is" if where == "itself" else "holds"
    assert status == 2
    assert f"error: {output} {relation} {float_checkpoint}, which this command reads" in err
    assert folder_contents(float_checkpoint) == before


def test_quantize_refuses_an_occupied_folder_and_replaces_it_whole_with_overwrite(float_checkpoint, tmp_path, capsys):
    output = tmp_path / "int8"
    output.mkdir()
    (output / "stale.bin").write_bytes(b"an older run")
    argv = ["quantize", str(float_checkpoint), str(output), "--scheme", "dynamic-range"]
    status, _, err = run_cli(argv, capsys)
    assert status == 2 and f"{output} already holds files (stale.bin); pass --overwrite to replace them" in err
    status, _, err = run_cli([*argv, "--overwrite"], capsys)
    assert status == 0, err
    written = os.listdir(output)
    assert "stale.bin" not in written and {"config.json", quantization.DYNAMIC_RANGE_WEIGHTS} <= set(written)
    assert sorted(os.listdir(tmp_path)) == ["float", "int8"]  # no temporary or lock file left beside it


def test_quantize_cut_off_mid_save_leaves_no_output_folder(float_checkpoint, tmp_path, monkeypatch):
    def save_then_crash(model, folder):
        (Path(folder) / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(quantization, "save_dynamic_range", save_then_crash)
    output = tmp_path / "int8"
    with pytest.raises(RuntimeError, match="disk full"):
        quantization.quantize_main([str(float_checkpoint), str(output), "--scheme", "dynamic-range"])
    assert sorted(os.listdir(tmp_path)) == ["float"]


@pytest.mark.parametrize("command", ["train", "quantize"])
def test_a_second_writer_of_the_same_folder_is_refused(command, float_checkpoint, text_files, tmp_path, capsys):
    output = tmp_path / "out"
    argv = tiny_train(output, text_files) if command == "train" else ["quantize", str(float_checkpoint), str(output)]
    with writer_lock(output):
        status, _, err = run_cli(argv, capsys)
    assert status == 2
    assert f"error: {output} is being written by process {os.getpid()} (lock {tmp_path / '.out.lock'})" in err
    assert not output.exists()


def test_train_refuses_a_folder_holding_a_model_and_overwrite_replaces_it_whole(
    float_checkpoint, text_files, capsys, monkeypatch
):
    (float_checkpoint / "README.md").write_text("stale card of another model")
    (float_checkpoint / "notes.txt").write_text("not part of the new run")
    (float_checkpoint / "checkpoint-7").mkdir()  # of another run: the final save alone would keep it
    with monkeypatch.context() as patched:
        patched.setattr(data, "packed_datasets", fail_if_called)
        status, _, err = run_cli(tiny_train(float_checkpoint, text_files), capsys)
    assert status == 2
    assert f"error: {float_checkpoint} already holds files (README.md, " in err
    assert "pass --overwrite to replace them, --resume last to continue that run, or another --output." in err
    status, _, err = run_cli(tiny_train(float_checkpoint, text_files, "--overwrite"), capsys)
    assert status == 0, err
    assert not (float_checkpoint / "notes.txt").exists() and not (float_checkpoint / "checkpoint-7").exists()
    assert "stale card" not in (float_checkpoint / "README.md").read_text()
    assert json.loads((float_checkpoint / "config.json").read_text())["num_hidden_layers"] == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--overwrite", "--resume", "last"], "--overwrite replaces OUTPUT's run and --resume last continues it"),
        (["--overwrite", "--tokenizer", "{output}"], "error: {output} is {output}, which this command reads"),
        (["--overwrite", "--resume", "{output}/checkpoint-2"], "error: {output} holds {output}/checkpoint-2"),
        (["--resume", "last"], "error: {output} holds no complete checkpoint-N folder to resume from"),
    ],
    ids=["overwrite-and-resume", "tokenizer-inside", "checkpoint-inside", "nothing-to-resume"],
)
def test_train_output_conflicts_are_refused_before_any_work(options, message, text_files, tmp_path, no_work, capsys):
    output = tmp_path / "run"
    (output / "checkpoint-2").mkdir(parents=True)  # a save cut off by a crash: no trainer state, no weights
    options = [option.format(output=output) for option in options]
    status, _, err = run_cli(tiny_train(output, text_files, *options), capsys)
    assert status == 2 and message.format(output=output) in err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("hiden_size=64", "FastGPTConfig has no key 'hiden_size'; did you mean 'hidden_size' or 'hidden_act'?"),
        (
            "hidden_size=abc",
            "Validation error for field 'hidden_size': TypeError: Field 'hidden_size' expected int, got str "
            "(value: 'abc')",
        ),
        (
            "vocab_size=100",
            "vocab_size 100 is smaller than the tokenizer's 16384 tokens; leave vocab_size out (it defaults to the "
            "tokenizer's) or make it at least 16384.",
        ),
    ],
    ids=["unknown-key", "bad-type", "vocabulary-below-tokenizer"],
)
def test_set_is_checked_against_the_config_before_reading_data(override, message, text_files, tmp_path, capsys):
    too_short = tiny_train(tmp_path / "run", text_files, "--set", override, "--block-size", "100000")
    status, _, err = run_cli(too_short, capsys)  # the data would be refused too: the override must be refused first
    assert status == 2
    assert err.splitlines()[-1] == f"fastgpt train: error: {message}"
    assert "Traceback" not in err


class CtrlCAtStep(TrainerCallback):
    """Sends this process SIGINT `presses` times at the end of optimizer step `step`, as Ctrl-C would."""

    def __init__(self, step: int, presses: int) -> None:
        self.step = step
        self.presses = presses

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            for _ in range(self.presses):
                signal.raise_signal(signal.SIGINT)
        return control


def press_ctrl_c(monkeypatch, step: int, presses: int = 1) -> None:
    """Make the trainers `fastgpt train` builds from now on receive Ctrl-C during `step`."""
    build = training.causal_lm_trainer

    def build_with_ctrl_c(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(CtrlCAtStep(step, presses))
        return trainer

    monkeypatch.setattr(training, "causal_lm_trainer", build_with_ctrl_c)


def logged_losses(checkpoint: Path) -> dict[int, float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def test_ctrl_c_saves_a_checkpoint_that_resume_last_continues_on_the_same_curve(
    text_files, tmp_path, capsys, caplog, monkeypatch
):
    uninterrupted = tmp_path / "uninterrupted"
    status, _, err = run_cli(tiny_train(uninterrupted, text_files, "--save-steps", "4", max_steps=4), capsys)
    assert status == 0, err

    output = tmp_path / "interrupted"
    with monkeypatch.context() as patched:
        press_ctrl_c(patched, step=2)
        status, _, err = run_cli(tiny_train(output, text_files, "--save-steps", "4", max_steps=4), capsys)
    assert status == 130
    checkpoint = output / "checkpoint-2"
    assert f"interrupted at step 2; checkpoint saved to {checkpoint}; continue with --resume last" in err
    assert sorted(os.listdir(output)) == ["checkpoint-2"]  # no final model of a run that did not finish

    (output / "checkpoint-9").mkdir()  # a later save cut off by a crash: weights but no trainer state
    (output / "checkpoint-9" / "model.safetensors").write_bytes(b"")
    with caplog.at_level("WARNING", logger="fastgpt_hf.training"):
        resume = tiny_train(output, text_files, "--save-steps", "4", "--resume", "last", max_steps=4)
        status, _, err = run_cli(resume, capsys)
    assert status == 0, err
    assert f"Skipping incomplete {output / 'checkpoint-9'} (no trainer_state.json)" in caplog.text
    resumed, expected = logged_losses(output / "checkpoint-4"), logged_losses(uninterrupted / "checkpoint-4")
    assert sorted(resumed) == [1, 2, 3, 4]
    assert resumed == pytest.approx(expected, rel=1e-5)
    assert (output / "config.json").is_file()


def test_a_second_ctrl_c_aborts_at_once_without_saving(text_files, tmp_path, capsys, monkeypatch):
    handler = signal.getsignal(signal.SIGINT)
    press_ctrl_c(monkeypatch, step=2, presses=2)
    output = tmp_path / "run"
    status, _, err = run_cli(tiny_train(output, text_files, max_steps=4), capsys)
    assert status == 130 and "fastgpt train: aborted by Ctrl-C" in err
    assert os.listdir(output) == []
    assert signal.getsignal(signal.SIGINT) is handler  # the training loop's handler is gone with it
