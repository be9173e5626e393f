"""Training through Trainer on real text: the loss falls, gradient checkpointing changes nothing, resume continues,
checkpoints and the final model are whole or absent, Ctrl-C stops with a checkpoint."""

import json
import os
import signal

import pytest
import torch
from transformers import TrainerCallback

from fastgpt_hf.data import CORPUS_FILES, load_tokenizer, packed_datasets
from fastgpt_hf.training import (
    causal_lm_trainer,
    choose_precision,
    last_complete_checkpoint,
    llama_peer,
    logged_losses,
    model_for_tokenizer,
    save_final_model,
    train_interruptibly,
    training_arguments,
)

from .conftest import tiny_model

BLOCK_SIZE = 32


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def blocks(tokenizer, tmp_path_factory):
    """Packed blocks of the first lines of the shipped WikiText-2 excerpts."""
    folder = tmp_path_factory.mktemp("text")
    files = {}
    for split, lines in (("train", 80), ("validation", 20)):
        text = "".join(CORPUS_FILES[split].read_text(encoding="utf-8").splitlines(keepends=True)[:lines])
        files[split] = folder / f"{split}.txt"
        files[split].write_text(text, encoding="utf-8")
    return packed_datasets(tokenizer, BLOCK_SIZE, files)


def tiny_trainer(tokenizer, blocks, output_dir, max_steps, seed=0, model_seed=0, **arguments):
    model = model_for_tokenizer("tiny", tokenizer, seed=model_seed)
    args = training_arguments(
        output_dir, max_steps=max_steps, batch_size=4, logging_steps=1, precision="fp32", seed=seed, **arguments
    )
    validation = blocks["validation"].select(range(8))
    return causal_lm_trainer(model, args, blocks["train"], validation)


def test_short_run_on_real_text_lowers_the_loss(tokenizer, blocks, tmp_path):
    trainer = tiny_trainer(tokenizer, blocks, tmp_path, max_steps=25, learning_rate=3e-3, show_progress=False)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert before["eval_loss"] > 9.0  # about ln(16384) = 9.70 at initialisation
    assert after["eval_loss"] < before["eval_loss"] - 1.0
    assert after["eval_perplexity"] == pytest.approx(torch.tensor(after["eval_loss"]).exp().item(), rel=1e-5)


def test_bf16_training_runs_on_this_machine(tokenizer, blocks, tmp_path):
    """`--precision bf16` is what the package suggests on the CPU: Trainer must accept it there too."""
    model = model_for_tokenizer("tiny", tokenizer, seed=0)
    args = training_arguments(tmp_path, max_steps=1, batch_size=4, precision="bf16", show_progress=False)
    trainer = causal_lm_trainer(model, args, blocks["train"], blocks["validation"].select(range(4)))
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    """float64, so recomputation differences would show: loss and every gradient agree to 1e-12."""
    input_ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    results = []
    for checkpointing in (False, True):
        model = tiny_model(stack="mixed", dtype=torch.float64).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        results.append((loss.detach(), {name: param.grad for name, param in model.named_parameters()}))
    (loss, grads), (checkpointed_loss, checkpointed_grads) = results
    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=1e-12)
    assert grads.keys() == checkpointed_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=0, atol=1e-12, msg=name)


def test_trainer_with_gradient_checkpointing_follows_the_same_losses(tokenizer, blocks, tmp_path):
    """Through TrainingArguments: float32 losses of 3 steps agree to 1e-5 relative."""
    plain = tiny_trainer(tokenizer, blocks, tmp_path / "plain", max_steps=3, show_progress=False)
    plain.train()
    checkpointed = tiny_trainer(
        tokenizer, blocks, tmp_path / "ckpt", max_steps=3, gradient_checkpointing=True, show_progress=False
    )
    checkpointed.train()
    assert checkpointed.model.is_activation_checkpointing and not plain.model.is_activation_checkpointing
    assert logged_losses(checkpointed) == pytest.approx(logged_losses(plain), rel=1e-5)


def test_resumed_run_continues_the_same_loss_curve(tokenizer, blocks, tmp_path):
    uninterrupted = tiny_trainer(tokenizer, blocks, tmp_path, max_steps=6, save_steps=3, show_progress=False)
    uninterrupted.train()
    expected = logged_losses(uninterrupted)
    assert (tmp_path / "checkpoint-3").is_dir()
    # Same run settings, a model initialised from another seed: the weights must come from the checkpoint.
    resumed = tiny_trainer(tokenizer, blocks, tmp_path, max_steps=6, save_steps=3, model_seed=1, show_progress=False)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    continued = logged_losses(resumed)  # steps 1-3 come back from the checkpoint's trainer state
    assert sorted(continued) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert [continued[step] for step in (4, 5, 6)] == pytest.approx([expected[step] for step in (4, 5, 6)], rel=1e-5)


def test_use_cache_is_off_only_while_the_trainer_runs_and_every_save_says_true(tokenizer, blocks, tmp_path):
    trainer = tiny_trainer(tokenizer, blocks, tmp_path, max_steps=2, save_steps=2, show_progress=False)
    config = trainer.model.config
    seen_while_training = []

    class RecordUseCache(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen_while_training.append(config.use_cache)

    trainer.add_callback(RecordUseCache())
    assert config.use_cache is True  # Trainer's own __init__ would have left it False
    trainer.train()
    assert seen_while_training == [False, False]
    assert config.use_cache is True
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "checkpoint-2", tmp_path / "final"):
        assert json.loads((folder / "config.json").read_text())["use_cache"] is True, folder


def test_llama_peer_has_the_same_shape(tokenizer):
    fastgpt = model_for_tokenizer("tiny", tokenizer)
    llama = llama_peer(fastgpt.config)
    assert fastgpt.config.vocab_size == llama.config.vocab_size == len(tokenizer)
    fastgpt_names = {name for name, _ in fastgpt.named_parameters()}
    llama_names = {name for name, _ in llama.named_parameters()}
    # FastGPT adds only its dynamic layers' global branch.
    extra = {name.split(".")[4] for name in fastgpt_names - llama_names}  # model.layers.N.self_attn.<name>
    assert llama_names < fastgpt_names and extra == {"memory_k", "memory_v", "compress_k", "compress_v", "mix_gate"}


def test_precision_choice_on_this_machine(caplog):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallback; on CUDA auto picks bf16 or fp16")
    with caplog.at_level("WARNING"):
        assert choose_precision("auto") == "fp32"
    assert "No CUDA device: training in float32" in caplog.text
    with pytest.raises(ValueError, match="fp16 mixed precision needs a CUDA device"):
        choose_precision("fp16")
    with pytest.raises(ValueError, match="Unknown precision 'fp8'"):
        choose_precision("fp8")


def test_checkpoint_save_cut_off_leaves_no_checkpoint_folder(tokenizer, blocks, tmp_path, monkeypatch, caplog):
    trainer = tiny_trainer(tokenizer, blocks, tmp_path, max_steps=2, save_steps=1, show_progress=False)
    save_optimizer = trainer._save_optimizer_and_scheduler

    def crash_at_step_2(output_dir):
        if trainer.state.global_step == 2:
            raise RuntimeError("killed mid-save")
        save_optimizer(output_dir)

    monkeypatch.setattr(trainer, "_save_optimizer_and_scheduler", crash_at_step_2)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        trainer.train()
    assert sorted(os.listdir(tmp_path)) == [".checkpoint-2.tmp", "checkpoint-1"]
    with caplog.at_level("WARNING", logger="fastgpt_hf.training"):
        assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    assert f"Skipping {tmp_path / '.checkpoint-2.tmp'}: a checkpoint save cut off by a crash" in caplog.text


def test_last_complete_checkpoint_skips_incomplete_ones(tmp_path, caplog):
    for step, files in {3: {"trainer_state.json": "{}", "model.safetensors": ""}, 9: {"model.safetensors": ""}}.items():
        (tmp_path / f"checkpoint-{step}").mkdir()
        for name, text in files.items():
            (tmp_path / f"checkpoint-{step}" / name).write_text(text)
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text('{"log_hist')
    (tmp_path / "checkpoint-11").mkdir()
    (tmp_path / "checkpoint-11" / "trainer_state.json").write_text("{}")
    with caplog.at_level("WARNING", logger="fastgpt_hf.training"):
        assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    problems = {11: "no weights", 10: "an unreadable trainer_state.json", 9: "no trainer_state.json"}
    for step, problem in problems.items():
        assert f"Skipping incomplete {tmp_path / f'checkpoint-{step}'} ({problem}" in caplog.text
    (tmp_path / "checkpoint-3" / "trainer_state.json").unlink()
    assert last_complete_checkpoint(tmp_path) is None


class CtrlCAtStep(TrainerCallback):
    """Sends this process SIGINT at the end of optimizer step `step`, as Ctrl-C would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            signal.raise_signal(signal.SIGINT)
        return control


def test_ctrl_c_stops_at_the_end_of_the_step_with_a_checkpoint(tokenizer, blocks, tmp_path):
    handler = signal.getsignal(signal.SIGINT)
    trainer = tiny_trainer(tokenizer, blocks, tmp_path, max_steps=4, show_progress=False)
    trainer.add_callback(CtrlCAtStep(2))
    assert train_interruptibly(trainer) == 2
    assert trainer.state.global_step == 2
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert signal.getsignal(signal.SIGINT) is handler


def test_final_model_replaces_the_previous_one_whole_and_keeps_checkpoints(tokenizer, blocks, tmp_path, monkeypatch):
    trainer = tiny_trainer(tokenizer, blocks, tmp_path, max_steps=1, save_steps=1, show_progress=False)
    trainer.train()
    (tmp_path / "README.md").write_text("stale card of an earlier model")
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"a shard of an earlier model")
    save_final_model(trainer, tokenizer, tmp_path)
    assert "stale card" not in (tmp_path / "README.md").read_text()
    assert not (tmp_path / "model-00002-of-00002.safetensors").exists()
    assert (tmp_path / "checkpoint-1" / "trainer_state.json").is_file()
    saved = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-save")

    monkeypatch.setattr(tokenizer, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        save_final_model(trainer, tokenizer, tmp_path)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == saved
