"""The README's main job (`make demo`): train a small FastGPT and a same-shape Llama side by side, on two CPU cores.

Both models get the same tokens (the shipped WikiText-2 excerpt, the shipped tokenizer), seed, optimizer and
steps. FastGPT is the `small` preset cut down to 6 layers of width 128 (2 sliding with window 64, 2 dynamic with
window 128 and blocks of 16, 2 full), trained on blocks of 256 tokens; the Llama has the same hidden size,
layers, heads and vocabulary. Each model trains and is evaluated in a process of its own, so that its peak memory
(peak resident set size of that process, interpreter and libraries included) is its own. Generation speed is
measured afterwards in one process, the two saved models taking turns at each prompt length, so that both see
the same machine load.

Printed and written under the run folder (default `runs/demo/`):
- the side-by-side table (`results.md`, `results.json`): parameters, training tokens/s, validation perplexity
  per token and per WikiText word (strided, window 256, stride 128), peak memory, and greedy generation at a
  long prompt with each model's default dynamic cache: time to first token, decode tokens/s, cache MiB;
- `fastgpt/` and `llama/` (save_pretrained, with the tokenizer); FastGPT is reloaded through
  `AutoModelForCausalLM.from_pretrained` and continues a prompt (seeded top-k sampling);
- `loss_curves.png` and `speed_vs_length.png`.

Seeded: the losses, perplexities and the sample repeat exactly on the same machine; timings vary with its load.
"""

import argparse
import json
import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib
import torch
from transformers import AutoModelForCausalLM

import fastgpt_hf  # noqa: F401  (registers FastGPT with the Auto classes)
from fastgpt_hf.benchmarking import generation_speed
from fastgpt_hf.data import CORPUS_FILES, evaluate_perplexity, load_tokenizer, packed_datasets
from fastgpt_hf.training import causal_lm_trainer, llama_peer, logged_losses, model_for_tokenizer, training_arguments

matplotlib.use("Agg")
from matplotlib import pyplot  # noqa: E402  (after choosing the non-interactive backend)

DEMO_OVERRIDES = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "layer_types": ["local", "local", "dynamic", "dynamic", "global", "global"],
    "sliding_window": 64,
    "dynamic_window": 128,
    "compress_block_size": 16,
    "num_memory_tokens": 8,
    "max_position_embeddings": 8192,
    "attn_implementation": "sdpa",
}
MODELS = ("fastgpt", "llama")
CHILD_TIMEOUT_SECONDS = 1800


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/demo", help="run folder")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per model")
    parser.add_argument("--batch-size", type=int, default=4, help="blocks per step")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per block (and perplexity window)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine decay)")
    parser.add_argument("--eval-chars", type=int, default=40_000, help="characters of the validation excerpt")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096], help="prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per speed measurement")
    parser.add_argument("--prompt", default=" = Robert Boulter = \n \n Robert Boulter is an English", help="sample")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def build_model(name: str, tokenizer, seed: int):
    fastgpt = model_for_tokenizer("small", tokenizer, seed=seed, **DEMO_OVERRIDES)
    return fastgpt if name == "fastgpt" else llama_peer(fastgpt.config, seed=seed)


def train_and_measure(name: str, args: argparse.Namespace) -> dict:
    """Train, evaluate and save one model (run in a process of its own)."""
    tokenizer = load_tokenizer()
    datasets = packed_datasets(tokenizer, args.block_size)
    model = build_model(name, tokenizer, args.seed)
    run_folder = Path(args.output) / name
    trainer_args = training_arguments(
        run_folder / "trainer",
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=args.steps // 10,
        logging_steps=5,
        seed=args.seed,
    )
    trainer = causal_lm_trainer(model, trainer_args, datasets["train"])
    train_metrics = trainer.train().metrics
    valid_text = CORPUS_FILES["validation"].read_text(encoding="utf-8")[: args.eval_chars]
    perplexity = evaluate_perplexity(model, tokenizer, valid_text, args.block_size, args.block_size // 2)
    model.save_pretrained(run_folder)
    tokenizer.save_pretrained(run_folder)
    return {
        "parameters": model.num_parameters(),
        "train_tokens_per_second": args.steps * args.batch_size * args.block_size / train_metrics["train_runtime"],
        "train_seconds": train_metrics["train_runtime"],
        "perplexity": vars(perplexity),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
        "losses": logged_losses(trainer),
    }


def run_isolated(name: str, args: argparse.Namespace) -> dict:
    """`train_and_measure` in a fresh spawned process, so that its peak memory is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(train_and_measure, name, args).result(timeout=CHILD_TIMEOUT_SECONDS)


def measure_speeds(output: Path, args: argparse.Namespace) -> dict[str, list[dict]]:
    """Greedy generation speed of both saved models at every prompt length, the models taking turns."""
    models = {name: AutoModelForCausalLM.from_pretrained(output / name).eval() for name in MODELS}
    speeds = {name: [] for name in MODELS}
    for length in args.lengths:
        for name, model in models.items():
            speeds[name].append(generation_speed(model, length, args.new_tokens, args.seed).as_dict())
    return speeds


def reload_and_sample(folder: Path, prompt: str, seed: int, new_tokens: int = 48) -> str:
    """Reload FastGPT through `AutoModelForCausalLM` and continue `prompt` (seeded top-k sampling)."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = load_tokenizer(folder)
    inputs = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(seed)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=True, temperature=0.8, top_k=50)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def table_rows(results: dict, long_length: int) -> list[tuple[str, float, float, str]]:
    """(metric, FastGPT, Llama, format) rows of the side-by-side table."""
    at_long = {name: next(s for s in results[name]["speeds"] if s["prompt_length"] == long_length) for name in MODELS}
    rows = [
        ("parameters", "parameters", "{:,.0f}"),
        ("training tokens/s", "train_tokens_per_second", "{:,.0f}"),
        ("validation perplexity per token", ("perplexity", "per_token"), "{:.1f}"),
        ("validation perplexity per word", ("perplexity", "per_word"), "{:.1f}"),
        ("peak memory (process RSS, MiB)", "peak_rss_mib", "{:,.0f}"),
    ]
    table = []
    for label, key, fmt in rows:
        values = [results[name][key[0]][key[1]] if isinstance(key, tuple) else results[name][key] for name in MODELS]
        table.append((label, *values, fmt))
    for label, key, fmt in (
        (f"first token after {long_length}-token prompt (s)", "prefill_seconds", "{:.2f}"),
        (f"decode tokens/s at {long_length} context", "decode_tokens_per_second", "{:.1f}"),
        (f"cache at {long_length} context (MiB)", "cache_mib", "{:.2f}"),
    ):
        table.append((label, at_long["fastgpt"][key], at_long["llama"][key], fmt))
    return table


def markdown_table(rows: list[tuple[str, float, float, str]]) -> str:
    lines = ["| metric | FastGPT | Llama | FastGPT / Llama |", "| --- | ---: | ---: | ---: |"]
    for label, fastgpt, llama, fmt in rows:
        lines.append(f"| {label} | {fmt.format(fastgpt)} | {fmt.format(llama)} | {fastgpt / llama:.2f} |")
    return "\n".join(lines)


def plot_losses(results: dict, path: Path) -> None:
    figure, axes = pyplot.subplots(figsize=(6, 4))
    for name in MODELS:
        losses = results[name]["losses"]
        axes.plot(list(losses), list(losses.values()), label=name)
    axes.set(xlabel="optimizer step", ylabel="training loss (nats/token)", title="Same tokens, same steps")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def plot_speeds(results: dict, path: Path) -> None:
    figure, (speed_axes, cache_axes) = pyplot.subplots(1, 2, figsize=(10, 4))
    for name in MODELS:
        speeds = results[name]["speeds"]
        lengths = [speed["prompt_length"] for speed in speeds]
        speed_axes.plot(lengths, [speed["decode_tokens_per_second"] for speed in speeds], marker="o", label=name)
        cache_axes.plot(lengths, [speed["cache_mib"] for speed in speeds], marker="o", label=name)
    speed_axes.set(xlabel="prompt length (tokens)", ylabel="decode tokens/s", xscale="log", title="Greedy decoding")
    cache_axes.set(xlabel="prompt length (tokens)", ylabel="cache MiB", xscale="log", title="Cache size")
    for axes in (speed_axes, cache_axes):
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    results = {name: run_isolated(name, args) for name in MODELS}
    for name, speeds in measure_speeds(output, args).items():
        results[name]["speeds"] = speeds
    sample = reload_and_sample(output / "fastgpt", args.prompt, args.seed)
    table = markdown_table(table_rows(results, max(args.lengths)))
    plot_losses(results, output / "loss_curves.png")
    plot_speeds(results, output / "speed_vs_length.png")
    wall_seconds = time.perf_counter() - start
    summary = {"settings": vars(args), "results": results, "sample": sample, "wall_seconds": wall_seconds}
    (output / "results.json").write_text(json.dumps(summary, indent=2))
    (output / "results.md").write_text(f"{table}\n\nFastGPT sample (seeded top-k sampling):\n\n```\n{sample}\n```\n")
    print(f"\n{table}\n\nFastGPT, reloaded through AutoModelForCausalLM, continues the prompt:\n{sample}\n")
    print(
        f"Wrote {output}/results.md, results.json, loss_curves.png, speed_vs_length.png; {wall_seconds:.0f} s in all."
    )


if __name__ == "__main__":
    main()
