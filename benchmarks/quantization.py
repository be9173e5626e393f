"""INT8 against float32 for a FastGPT trained on WikiText: perplexity, weight bytes, CPU generation speed.

Not a test. For a trained float32 checkpoint (the demo's, `runs/demo/fastgpt`, or a longer run) it prints one row
per model, each against float32 as a ratio:
- `fp32`: the checkpoint;
- every post-training scheme of `fastgpt_hf.quantization` (bitsandbytes LLM.int8, torchao int8 weight-only and
  int8 dynamic-activation with per-channel scales, PyTorch dynamic-range for edge export);
- quantization-aware training: the checkpoint trained `--qat-steps` more steps with torchao's fake quantization,
  then converted to int8, beside `fp32 +steps`, the same steps without fake quantization (QAT's own baseline).
Perplexity is WikiText-2 validation (`--valid-file`; the shipped excerpt by default), strided, per token of our
tokenizer and per WikiText word. Speed is greedy decode tokens/s at batch 1 on this machine's CPU.

    python benchmarks/bench.py quantization runs/demo/fastgpt --valid-file ../shared/data/wikitext-2/valid.txt
"""

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from fastgpt_hf import data, quantization, training
from fastgpt_hf.benchmarking import generation_speed


def measure(name: str, model: PreTrainedModel, tokenizer, text: str, args: argparse.Namespace) -> dict:
    model.eval()
    perplexity = data.evaluate_perplexity(model, tokenizer, text, args.window, args.stride)
    speed = generation_speed(model, args.prompt_length, args.new_tokens)
    row = {
        "model": name,
        "ppl_token": perplexity.per_token,
        "ppl_word": perplexity.per_word,
        "weight_mib": quantization.weight_bytes(model) / 2**20,
        "decode_tps": speed.decode_tokens_per_second,
    }
    print(f"  measured {name}: {row}", flush=True)
    return row


def trained_further(
    checkpoint: str, tokenizer, steps: int, block_size: int, fake_quantize: bool, folder: Path
) -> PreTrainedModel:
    """The checkpoint after `steps` more Trainer steps on the shipped train excerpt, with or without QAT."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    if fake_quantize:
        model = quantization.prepare_qat(model)
    blocks = data.packed_datasets(tokenizer, block_size)
    arguments = training.training_arguments(
        folder, max_steps=steps, batch_size=8, learning_rate=3e-4, precision="fp32", show_progress=False
    )
    training.causal_lm_trainer(model, arguments, blocks["train"]).train()
    return quantization.convert_qat(model) if fake_quantize else model


def print_table(rows: list[dict]) -> None:
    fp32, fp32_steps = rows[0], next((row for row in rows if row["model"].startswith("fp32 +")), None)
    print("| model | ppl / token | ppl / word | ppl vs its float | weight MiB | size vs fp32 | decode tok/s | speed |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        baseline = fp32_steps if row["model"].startswith("QAT") else fp32
        print(
            f"| {row['model']} | {row['ppl_token']:.2f} | {row['ppl_word']:.2f} | "
            f"{100 * (row['ppl_word'] / baseline['ppl_word'] - 1):+.2f}% | {row['weight_mib']:.1f} | "
            f"{row['weight_mib'] / fp32['weight_mib']:.2f} | {row['decode_tps']:.1f} | "
            f"{row['decode_tps'] / fp32['decode_tps']:.2f}x |"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="folder of a trained float32 FastGPT (save_pretrained output)")
    parser.add_argument("--valid-file", default=str(data.CORPUS_FILES["validation"]))
    parser.add_argument("--window", type=int, default=512, help="perplexity window (tokens)")
    parser.add_argument("--stride", type=int, default=256, help="perplexity stride (tokens)")
    parser.add_argument("--qat-steps", type=int, default=40, help="extra training steps for QAT and its baseline")
    parser.add_argument("--block-size", type=int, default=256, help="training block length of the extra steps")
    parser.add_argument("--prompt-length", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = data.load_tokenizer(args.checkpoint)
    text = Path(args.valid_file).read_text()
    print(f"{args.checkpoint}: {args.valid_file} ({data.count_words(text)} words), {torch.get_num_threads()} threads")
    rows = [measure("fp32", AutoModelForCausalLM.from_pretrained(args.checkpoint), tokenizer, text, args)]
    for scheme in quantization.SCHEMES:
        rows.append(measure(scheme, quantization.load_quantized(args.checkpoint, scheme), tokenizer, text, args))
    with tempfile.TemporaryDirectory() as folder:
        for fake_quantize, name in ((False, f"fp32 +{args.qat_steps} steps"), (True, "QAT int8")):
            model = trained_further(
                args.checkpoint, tokenizer, args.qat_steps, args.block_size, fake_quantize, Path(folder)
            )
            rows.append(measure(name, model, tokenizer, text, args))
    print_table(rows)
