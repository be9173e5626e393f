"""The README's main job (`make demo`): train a small FastGPT and a same-shape Llama side by side, on two CPU cores.

Both models get the same tokens (the shipped WikiText-2 excerpt, the shipped tokenizer), seed, optimizer and
steps. FastGPT is the `small` preset cut down to 6 layers of width 128 (2 sliding with window 64, 2 dynamic with
window 128 and blocks of 16, 2 full), trained on blocks of 256 tokens; the Llama has the same hidden size,
layers, heads and vocabulary. Each model trains and is evaluated in a process of its own, so that its peak memory
(peak resident set size of that process, interpreter and libraries included) is its own. Generation speed is
measured afterwards in one process, the two saved models taking turns at each prompt length, `--repeats` times
each, so that both see the same machine load; the table and the plot give the median, the plot a min-max band.

The default run lasts about a minute on two idle cores and its model writes word salad. `--long` trains 20 times
as many tokens (600 steps of 8 blocks instead of 60 of 4, about 1.8 passes over the excerpt; 574 s in all on two
idle cores, 2026-12-05) for a model that writes looser-but-English text; any flag given beside it still wins.

Each phase prints its name, a progress bar and its wall time; a summary of the phases and the total ends the run.
Printed and written under the run folder (default `runs/demo/`):
- the side-by-side table (`results.md`, `results.json`): parameters, training tokens/s, validation perplexity
  per token and per WikiText word (strided, window 256, stride 128), peak memory, and greedy generation at a
  long prompt with each model's default dynamic cache: time to first token, decode tokens/s, cache MiB;
  results.json also holds the settings, loss curves, every speed measurement, the phases' wall times and, under
  `eval_results`, FastGPT's perplexities for `fastgpt card --results`;
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
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from fastgpt_console import quiet_dependency_logs

STARTED_AT = time.perf_counter()  # the total counts the imports of torch and Transformers too
# Before torch and Transformers are imported (here and in the spawned training processes, which run this file's
# top level as `__mp_main__`): torchao logs its failed extension loads while Transformers imports it.
quiet_dependency_logs()

import matplotlib  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.trainer_callback import ProgressCallback  # noqa: E402

import fastgpt_hf  # noqa: E402, F401  (registers FastGPT with the Auto classes)
from fastgpt_hf.benchmarking import generation_speed, speed_statistics  # noqa: E402
from fastgpt_hf.data import CORPUS_FILES, Perplexity, evaluate_perplexity, load_tokenizer, packed_datasets  # noqa: E402
from fastgpt_hf.model_card import SHIPPED_VALIDATION_DATASET, perplexity_results  # noqa: E402
from fastgpt_hf.training import (  # noqa: E402
    causal_lm_trainer,
    llama_peer,
    logged_losses,
    model_for_tokenizer,
    training_arguments,
)

matplotlib.use("Agg")
from matplotlib import pyplot  # noqa: E402  (after choosing the non-interactive backend)
from matplotlib.figure import Figure  # noqa: E402

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
MODELS = {"fastgpt": "FastGPT", "llama": "Llama"}
# `--long`: 20x the tokens of the default run on the same model and blocks (so its perplexities compare with the
# default run's): batches of 8 blocks, 600 steps, 1.23M tokens, about 1.8 passes over the 670K-token excerpt.
LONG_RUN = {"steps": 600, "batch_size": 8}
SAMPLE_NOTES = {
    False: "a 1-minute model: expect word salad; --long trains ~10 minutes for looser-but-English text",
    True: "a --long run: 20x the default's training tokens; still a small model, so expect loose English",
}
CHILD_TIMEOUT_SECONDS = 3600


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's settings; with `--long`, `LONG_RUN`'s values unless given explicitly."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/demo", help="run folder")
    parser.add_argument(
        "--long", action="store_true", help="train on 20x the tokens (~10 minutes on 2 cores) for a better sample"
    )
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per model")
    parser.add_argument("--batch-size", type=int, default=4, help="blocks per step")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per block (and perplexity window)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine decay)")
    parser.add_argument("--eval-chars", type=int, default=40_000, help="characters of the validation excerpt")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096], help="prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per speed measurement")
    parser.add_argument("--repeats", type=int, default=5, help="speed measurements per model and prompt length")
    parser.add_argument("--prompt", default=" = Robert Boulter = \n \n Robert Boulter is an English", help="sample")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.long:
        parser.set_defaults(**LONG_RUN)
        args = parser.parse_args(argv)
    return args


@contextmanager
def phase(name: str, seconds: dict[str, float]) -> Iterator[None]:
    """Print `name`, run the block (its progress bars print below), then print its wall time into `seconds`."""
    print(f"\n== {name}", flush=True)
    start = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - start
    print(f"== {name}: {seconds[name]:.1f} s", flush=True)


class LossInProgressBar(ProgressCallback):
    """Trainer's progress bar, named, with the latest training loss in it instead of a printed line per log."""

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description("optimizer steps")

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{float(logs['loss']):.3f}")


def build_model(name: str, tokenizer, seed: int):
    fastgpt = model_for_tokenizer("small", tokenizer, seed=seed, **DEMO_OVERRIDES)
    return fastgpt if name == "fastgpt" else llama_peer(fastgpt.config, seed=seed)


def train_and_measure(name: str, args: argparse.Namespace) -> dict:
    """Train, evaluate and save one model, each a phase (run in a process of its own)."""
    seconds: dict[str, float] = {}
    tokenizer = load_tokenizer()
    datasets = packed_datasets(tokenizer, args.block_size)  # the data phase has cached it
    model = build_model(name, tokenizer, args.seed)
    run_folder = Path(args.output) / name
    with phase(
        f"{MODELS[name]}: training ({args.steps} steps of {args.batch_size} x {args.block_size} tokens)", seconds
    ):
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
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LossInProgressBar())
        train_metrics = trainer.train().metrics
    with phase(f"{MODELS[name]}: evaluation (strided perplexity of {args.eval_chars:,} characters)", seconds):
        valid_text = CORPUS_FILES["validation"].read_text(encoding="utf-8")[: args.eval_chars]
        perplexity = evaluate_perplexity(
            model, tokenizer, valid_text, args.block_size, args.block_size // 2, show_progress=True
        )
    with phase(f"{MODELS[name]}: save", seconds):
        model.save_pretrained(run_folder)
        tokenizer.save_pretrained(run_folder)
    return {
        "parameters": model.num_parameters(),
        "train_tokens_per_second": args.steps * args.batch_size * args.block_size / train_metrics["train_runtime"],
        "train_seconds": train_metrics["train_runtime"],
        "perplexity": vars(perplexity),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
        "losses": logged_losses(trainer),
        "phase_seconds": seconds,
    }


def run_isolated(name: str, args: argparse.Namespace) -> dict:
    """`train_and_measure` in a fresh spawned process, so that its peak memory is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(train_and_measure, name, args).result(timeout=CHILD_TIMEOUT_SECONDS)


def measure_speeds(output: Path, args: argparse.Namespace) -> dict[str, list[dict]]:
    """Greedy generation speed of both saved models at every prompt length, `args.repeats` times, taking turns.

    One `speed_statistics` entry (median, min, max and the values of each figure) per model and length.
    """
    models = {name: AutoModelForCausalLM.from_pretrained(output / name).eval() for name in MODELS}
    runs = [(length, name) for length in args.lengths for _ in range(args.repeats) for name in MODELS]
    measured = {(length, name): [] for length, name in runs}
    for length, name in tqdm(runs, desc="greedy generation", unit="run"):
        measured[length, name].append(generation_speed(models[name], length, args.new_tokens, args.seed))
    return {name: [speed_statistics(measured[length, name]) for length in args.lengths] for name in MODELS}


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
    """(metric, FastGPT, Llama, format) rows of the side-by-side table; speeds are medians over the repeats."""
    at_long = {name: next(s for s in results[name]["speeds"] if s["prompt_length"] == long_length) for name in MODELS}
    repeats = at_long["fastgpt"]["repeats"]
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
        (f"first token after {long_length:,}-token prompt (s, median of {repeats})", "prefill_seconds", "{:.2f}"),
        (f"decode tokens/s at {long_length:,} context (median of {repeats})", "decode_tokens_per_second", "{:.1f}"),
        (f"cache at {long_length:,} context (MiB)", "cache_mib", "{:.2f}"),
    ):
        table.append((label, at_long["fastgpt"][key]["median"], at_long["llama"][key]["median"], fmt))
    return table


def markdown_table(rows: list[tuple[str, float, float, str]]) -> str:
    lines = ["| metric | FastGPT | Llama | FastGPT / Llama |", "| --- | ---: | ---: | ---: |"]
    for label, fastgpt, llama, fmt in rows:
        lines.append(f"| {label} | {fmt.format(fastgpt)} | {fmt.format(llama)} | {fastgpt / llama:.2f} |")
    return "\n".join(lines)


def loss_figure(results: dict) -> Figure:
    figure, axes = pyplot.subplots(figsize=(6, 4))
    for name, label in MODELS.items():
        losses = results[name]["losses"]
        axes.plot(list(losses), list(losses.values()), label=label)
    axes.set(xlabel="optimizer step", ylabel="training loss (nats/token)", title="Same tokens, same steps")
    axes.legend()
    figure.tight_layout()
    return figure


def speed_figure(results: dict) -> Figure:
    """Decode tokens/s and cache MiB against prompt length: the median of the repeats, a min-max band around it."""
    figure, (speed_axes, cache_axes) = pyplot.subplots(1, 2, figsize=(10, 4))
    lengths = [speed["prompt_length"] for speed in results["fastgpt"]["speeds"]]
    for name, label in MODELS.items():
        speeds = results[name]["speeds"]
        for axes, key in ((speed_axes, "decode_tokens_per_second"), (cache_axes, "cache_mib")):
            (line,) = axes.plot(lengths, [speed[key]["median"] for speed in speeds], marker="o", label=label)
            low, high = [speed[key]["min"] for speed in speeds], [speed[key]["max"] for speed in speeds]
            axes.fill_between(lengths, low, high, color=line.get_color(), alpha=0.25, linewidth=0)
    repeats = results["fastgpt"]["speeds"][0]["repeats"]
    speed_axes.set(ylabel="decode tokens/s", title=f"Greedy decoding (median and range of {repeats} runs)")
    cache_axes.set(ylabel="cache MiB", title="Cache size after the prompt and the new tokens")
    for axes in (speed_axes, cache_axes):
        axes.set_xscale("log", base=2)  # doubling lengths, evenly spaced
        axes.set_xticks(lengths, [f"{length:,}" for length in lengths])
        axes.minorticks_off()
        axes.set(xlabel="prompt length (tokens)")
        axes.set_ylim(bottom=0)
        axes.legend()
    figure.tight_layout()
    return figure


def save_figure(figure: Figure, path: Path) -> None:
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def summary(
    args: argparse.Namespace, results: dict, sample: str, seconds: dict[str, float], wall_seconds: float
) -> dict:
    """Everything results.json holds; `eval_results` is what `fastgpt card --results` reads from it."""
    dataset = {**SHIPPED_VALIDATION_DATASET, "dataset_args": {"max_chars": args.eval_chars}}
    perplexity = Perplexity(**results["fastgpt"]["perplexity"])
    return {
        "settings": vars(args),
        "results": results,
        "sample": sample,
        "sample_note": SAMPLE_NOTES[args.long],
        "eval_results": perplexity_results(perplexity, dataset, args.block_size, args.block_size // 2),
        "phase_seconds": seconds,
        "wall_seconds": wall_seconds,
    }


def write_result_files(output: Path, table: str, run: dict) -> None:
    """results.json (`run`, from `summary`) and results.md (the table and the sample with its note)."""
    (output / "results.json").write_text(json.dumps(run, indent=2))
    (output / "results.md").write_text(
        f"{table}\n\nFastGPT sample (seeded top-k sampling; {run['sample_note']}):\n\n```\n{run['sample']}\n```\n"
    )


def main() -> None:
    args = parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    with phase("data: tokenize and pack the WikiText-2 excerpt", seconds):
        # datasets caches the result for the training processes
        excerpt_tokens = len(packed_datasets(load_tokenizer(), args.block_size)["train"]) * args.block_size
        read_tokens = args.steps * args.batch_size * args.block_size
        passes = read_tokens / excerpt_tokens
        print(f"{excerpt_tokens:,} training tokens; each model reads {read_tokens:,}, {passes:.1f} passes over them")
    results = {}
    for name in MODELS:
        results[name] = run_isolated(name, args)
        seconds.update(results[name]["phase_seconds"])
    with phase(f"benchmarks: greedy generation, {len(args.lengths)} lengths x 2 models x {args.repeats}", seconds):
        for name, speeds in measure_speeds(output, args).items():
            results[name]["speeds"] = speeds
    with phase("save/reload: FastGPT through AutoModelForCausalLM, then a sample", seconds):
        sample = reload_and_sample(output / "fastgpt", args.prompt, args.seed)
    with phase("plots", seconds):
        figures = {"loss_curves.png": loss_figure, "speed_vs_length.png": speed_figure}
        for file_name, make_figure in tqdm(figures.items(), desc="plots", unit="plot"):
            save_figure(make_figure(results), output / file_name)
    run = summary(args, results, sample, seconds, time.perf_counter() - STARTED_AT)
    table = markdown_table(table_rows(results, max(args.lengths)))
    write_result_files(output, table, run)
    print(f"\n{table}\n\nFastGPT, reloaded through AutoModelForCausalLM, continues the prompt ({run['sample_note']}):")
    print(f"{sample}\n")
    for name, phase_seconds in seconds.items():
        print(f"{phase_seconds:8.1f} s  {name}")
    print(f"{run['wall_seconds'] - sum(seconds.values()):8.1f} s  starting Python processes and importing libraries")
    print(f"{run['wall_seconds']:8.1f} s  in all")
    print(f"Wrote {output}/results.md, results.json, loss_curves.png, speed_vs_length.png.")


if __name__ == "__main__":
    main()
