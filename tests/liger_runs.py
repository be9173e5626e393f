"""Runs of a tiny FastGPT with and without Liger's kernels, for tests/test_liger.py: on the GPU in the test's
process, on the CPU in a process of their own under Triton's interpreter:

    TRITON_INTERPRET=1 python -m tests.liger_runs {model,trainer} OUTPUT_FILE    (from the repository root)

The variable must be set before Triton is imported, which importing torch's compiler (hence FastGPT) does once
Triton is installed. There only Liger's rotary and fused linear cross-entropy kernels run: Triton 3.9's interpreter
passes float arguments unconverted and has no libdevice `rsqrt`, which Liger's RMSNorm and SwiGLU kernels use.

Liger's rotary patch replaces the modeling module's function for the whole process, so each comparison runs
without Liger first; callers in a shared process restore the function afterwards.
"""

import sys
import tempfile

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from fastgpt_hf.attention_reference import reference_logits

from .conftest import left_padded_batch, tiny_model

LENGTH = 21  # neither a multiple of the tiny preset's blocks (4) nor of its windows (8, 16)
INTERPRETABLE_KERNELS = {"rms_norm": False, "swiglu": False}


def model_and_batch(device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = tiny_model("mixed", dtype=dtype, initializer_range=0.05).to(device).train()
    input_ids, attention_mask = left_padded_batch(LENGTH)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return model, {name: tensor.to(device) for name, tensor in batch.items()}


def training_and_eval_outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, object]:
    """One training forward and backward with labels, then eval logits and the float64 reference logits."""
    output = model(**batch)
    output.loss.backward()
    model.eval()
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        reference = reference_logits(model, batch["input_ids"], batch["attention_mask"])
    return {
        "loss": output.loss.detach().cpu(),
        "training_logits": output.logits,
        "gradients": {name: parameter.grad.cpu() for name, parameter in model.named_parameters()},
        "logits": logits.cpu(),
        "reference": reference.cpu(),
        "attention_mask": batch["attention_mask"].cpu(),
    }


def compare_models(kernels: dict[str, bool], device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """`training_and_eval_outputs` of the same weights and batch, plain and with `kernels` (Liger's flags)."""
    from fastgpt_hf.liger import apply_liger_kernel_to_fastgpt

    results = {"plain": training_and_eval_outputs(*model_and_batch(device, dtype))}
    model, batch = model_and_batch(device, dtype)
    apply_liger_kernel_to_fastgpt(model=model, **kernels)
    results["liger"] = training_and_eval_outputs(model, batch)
    return results


def trainer_run(liger_kernel_config: dict[str, bool] | None, device: str, output_dir: str) -> dict[str, object]:
    """Three Trainer steps and an evaluation (loss only: with Liger, Trainer asks for `skip_logits`)."""
    tokens = torch.randint(0, 128, (16, LENGTH), generator=torch.Generator().manual_seed(2))
    dataset = Dataset.from_dict({"input_ids": tokens.tolist(), "labels": tokens.tolist()})
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=3,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        prediction_loss_only=True,
        report_to=[],
        use_cpu=device == "cpu",
        seed=0,
        use_liger_kernel=liger_kernel_config is not None,
        liger_kernel_config=liger_kernel_config,
    )
    model = tiny_model("mixed", dtype=torch.float32, initializer_range=0.05)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset.select(range(4)))
    trainer.train()
    return {
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "eval_loss": trainer.evaluate()["eval_loss"],
        "fused_head": "logits_and_loss" in vars(model),
    }


def compare_trainers(liger_kernel_config: dict[str, bool], device: str = "cpu") -> dict:
    """`trainer_run` plain and with `use_liger_kernel=True` and `liger_kernel_config`."""
    with tempfile.TemporaryDirectory() as output_dir:
        return {
            "plain": trainer_run(None, device, output_dir),
            "liger": trainer_run(liger_kernel_config, device, output_dir),
        }


def main(comparison: str, output_file: str) -> None:
    from fastgpt_hf import modeling_fastgpt

    if comparison == "model":
        results = compare_models(INTERPRETABLE_KERNELS)
    else:
        results = compare_trainers(INTERPRETABLE_KERNELS)
    results["rotary_module"] = modeling_fastgpt.apply_rotary_pos_emb.__module__
    torch.save(results, output_file)


if __name__ == "__main__":
    main(*sys.argv[1:])
