"""Quality harness (issue 26): does FastGPT's global branch do what a sliding window cannot?

Trains FastGPT, its Llama peer and the ablations of `fastgpt_hf.ablations.VARIANTS` with equal shape, tokens,
optimizer (AdamW, cosine decay) and seed, for each of `--seeds`, on one mix (`recall_tasks.training_mix`): WikiText
blocks, MQAR blocks and pass-key blocks, each sequence weighing the same in the loss. Then, per run:

- WikiText-2 validation and test perplexity per token and per WikiText word (`data.evaluate_perplexity`, strided,
  window = the training block, stride half of it); the shipped excerpt has no test split;
- retrieval by distance, keys placed `near` (the least distance the task allows) and 1x, 4x and 16x the largest
  window (sliding or dynamic) before the question (pass key: at least its `near`): MQAR (share of queries answered) and
  pass key (share of samples whose whole answer is predicted), teacher-forced argmax;
- training throughput (tokens/s of the training steps, evaluations excluded) and the validation perplexity curve.

Writes into `--output`: `settings.json`, `runs/<variant>-seed<N>.json` as each run finishes, then `results.json`
(settings, runs, summary), `results.md` (mean +- standard deviation over the seeds, the targets of issue 26
checked, the variants not run and why) and, where matplotlib is installed, `quality.png` (accuracy against
distance, perplexity against training tokens). `--report-only` summarizes the finished runs again (after a run
cut short, or elsewhere for the plot). `--recall-probe` trains on MQAR alone instead (`recall_probe.py`).

    python benchmarks/bench.py quality --size cpu --data /work/shared/data/wikitext-2 --output runs/quality-cpu
    python benchmarks/bench.py quality --size gpu --data data/wikitext-2 --output runs/quality-gpu
    python benchmarks/bench.py quality --size cpu --recall-probe --variants llama sliding dynamic fastgpt --seeds 0
    python benchmarks/bench.py quality --size cpu --recall-probe --variants fastgpt --seeds 0 \
        --layer-types full_attention selective_attention selective_attention   # the proposed selective layer

Sizes (`SIZES`): `cpu` (3 layers of width 64, windows 4 / 8) runs every variant x 3 seeds in about 15-20 minutes
on 2 cores; `gpu` (6 layers of width 256, windows 32 / 64) took 5.7 minutes for 4 variants x 3 seeds on one H100,
the seeds in parallel processes (RESULTS.md: too short a run for any model to learn retrieval); `test` is the unit
test's seconds-long run.
"""

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import recall_probe
import torch

from fastgpt_hf.ablations import NOT_EXPRESSIBLE, VARIANTS, variant_model
from fastgpt_hf.cli import positive_int
from fastgpt_hf.data import evaluate_perplexity, load_tokenizer
from fastgpt_hf.passkey import needle_distances, passkey_accuracy, sample_pieces
from fastgpt_hf.recall_tasks import (
    SequenceMeanTrainer,
    mqar_accuracy,
    mqar_distances,
    mqar_vocabulary,
    training_mix,
)
from fastgpt_hf.training import training_arguments
from fastgpt_hf.uptraining import text_blocks, training_text

SHAPES = {
    "test": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
             "sliding_window": 4, "dynamic_window": 8, "num_memory_tokens": 2, "compress_block_size": 4},
    "cpu": {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "sliding_window": 4, "dynamic_window": 8, "num_memory_tokens": 4,
            "compress_block_size": 4},
    "gpu": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 6, "num_attention_heads": 8,
            "num_key_value_heads": 4, "sliding_window": 32, "dynamic_window": 64, "num_memory_tokens": 8,
            "compress_block_size": 16},
}  # fmt: skip
# Training and evaluation per size. block_size >= 16 x the largest window + the pass key's 40 fixed tokens.
SIZES = {
    "test": {"block_size": 176, "batch_size": 2, "steps": 2, "lr": 3e-3, "num_pairs": 2, "eval_chars": 2_000,
             "curve_blocks": 2, "curve_points": 1, "mqar_trials": 4, "passkey_trials": 2, "workers": 1},
    "cpu": {"block_size": 192, "batch_size": 4, "steps": 160, "lr": 3e-3, "num_pairs": 4, "eval_chars": 20_000,
            "curve_blocks": 8, "curve_points": 4, "mqar_trials": 8, "passkey_trials": 8, "workers": 1},
    "gpu": {"block_size": 1152, "batch_size": 16, "steps": 300, "lr": 2e-3, "num_pairs": 8, "eval_chars": None,
            "curve_blocks": 32, "curve_points": 5, "mqar_trials": 64, "passkey_trials": 32, "workers": 3},
}  # fmt: skip
MQAR_SHARE, PASSKEY_SHARE = 0.25, 0.25
DISTANCE_MULTIPLES = (1, 4, 16)
PASSKEY_CHANCE = 0.0  # three answer tokens out of 16,384 each: about 2e-13 for a uniform guess


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=sorted(SIZES), help="model and run size (default: gpu with CUDA, else cpu)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=positive_int, help="optimizer steps per run (default: the size's)")
    parser.add_argument(
        "--workers",
        type=positive_int,
        help="processes: one seed each at a time, or with --recall-probe one run each (default: the size's)",
    )
    parser.add_argument(
        "--data", help="WikiText-2 folder with train.txt, valid.txt, test.txt (default: the shipped excerpt, no test)"
    )
    parser.add_argument("--output", default="runs/quality", help="output folder")
    parser.add_argument("--eval-chars", type=int, help="characters of each evaluation text (default: the size's)")
    parser.add_argument(
        "--report-only", action="store_true", help="summarize the finished runs of --output again (results.*, plot)"
    )
    recall_probe.add_arguments(parser)


def run(args: argparse.Namespace) -> None:
    output = Path(args.output)
    if args.recall_probe:
        size = chosen_size(args)
        block_size = recall_probe.RECALL_PROBES[size]["block_size"]
        recall_probe.run(args, size, model_shape(size, load_tokenizer(), block_size), output)
        return
    if not args.report_only:
        settings = run_settings(args)
        print(
            f"quality harness: {settings['size']} size, {len(args.variants)} variants x seeds {args.seeds}", flush=True
        )
        setup = prepare(settings)
        (output / "settings.json").write_text(json.dumps(settings, indent=1), encoding="utf-8")
        started = time.perf_counter()
        workers = min(settings["workers"], len(args.seeds))
        if workers == 1:
            for seed in args.seeds:
                run_seed(seed, setup)
        else:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                list(pool.map(run_seed, args.seeds, [setup] * len(args.seeds)))
        settings["wall_seconds"] = time.perf_counter() - started
        (output / "settings.json").write_text(json.dumps(settings, indent=1), encoding="utf-8")
    write_report(collect(output), output)


def collect(output: Path) -> dict:
    """settings.json and every `runs/*.json` of `output` (a run cut short leaves the finished ones), summarized and
    written to results.json."""
    settings = json.loads((output / "settings.json").read_text(encoding="utf-8"))
    found = {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in (output / "runs").glob("*.json")}
    records = [found[f"{name}-seed{seed}"] for name in settings["variants"] for seed in settings["seeds"]
               if f"{name}-seed{seed}" in found]  # fmt: skip
    if not records:
        raise ValueError(f"{output / 'runs'} holds no finished run; run the harness first.")
    results = {"settings": settings, "runs": records, "summary": summarize(records)}
    (output / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    return results


def chosen_size(args: argparse.Namespace) -> str:
    return args.size or ("gpu" if torch.cuda.is_available() else "cpu")


def run_settings(args: argparse.Namespace) -> dict:
    """Everything a run depends on, as plain data (it travels to the worker processes and into results.json)."""
    size = chosen_size(args)
    settings = {**SIZES[size], "size": size, "variants": args.variants, "seeds": args.seeds, "data": args.data}
    settings["steps"] = args.steps or settings["steps"]
    settings["workers"] = args.workers or settings["workers"]
    settings["eval_chars"] = args.eval_chars or settings["eval_chars"]
    settings["output"] = str(args.output)
    settings["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    settings["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return settings


def model_shape(size: str, tokenizer, block_size: int) -> dict:
    """The FastGPTConfig keyword arguments of `size`'s shape for the shipped tokenizer and `block_size` positions."""
    return {
        **SHAPES[size],
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "max_position_embeddings": block_size,
        "attn_implementation": "sdpa",
    }


def prepare(settings: dict) -> dict:
    """The shape, the training mix, the curve's validation blocks, the evaluation texts and the distances."""
    tokenizer = load_tokenizer()
    shape = model_shape(settings["size"], tokenizer, settings["block_size"])
    block_size, count = settings["block_size"], settings["steps"] * settings["batch_size"]
    vocabulary = mqar_vocabulary(tokenizer)
    train_text = text_blocks(tokenizer, block_size, training_text(settings["data"]), count)
    mix = training_mix(train_text, tokenizer, vocabulary, count, MQAR_SHARE, PASSKEY_SHARE, settings["num_pairs"])
    valid_file = training_text(settings["data"], "valid")
    curve = text_blocks(tokenizer, block_size, valid_file, settings["curve_blocks"])
    texts = {"validation": valid_file.read_text(encoding="utf-8")[: settings["eval_chars"]]}
    if settings["data"] is not None:
        texts["test"] = (Path(settings["data"]) / "test.txt").read_text(encoding="utf-8")[: settings["eval_chars"]]
    window = max(shape["sliding_window"], shape["dynamic_window"])
    distances = {f"{multiple}x": multiple * window for multiple in DISTANCE_MULTIPLES}
    settings.update(
        shape=shape, largest_window=window, distances=distances, mqar_vocabulary_size=len(vocabulary.values)
    )
    Path(settings["output"], "runs").mkdir(parents=True, exist_ok=True)
    return {"settings": settings, "mix": mix, "curve": curve, "texts": texts}


def run_seed(seed: int, setup: dict) -> None:
    """Every variant at one seed, one after the other, each record written to `runs/` as soon as it is done."""
    settings = setup["settings"]
    for name in settings["variants"]:
        record = train_and_evaluate(name, seed, setup)
        path = Path(settings["output"], "runs", f"{name}-seed{seed}.json")
        path.write_text(json.dumps(record, indent=1), encoding="utf-8")
        print(f"{name} seed {seed}: {one_line(record)}", flush=True)


def train_and_evaluate(name: str, seed: int, setup: dict) -> dict:
    settings = setup["settings"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = variant_model(name, settings["shape"], seed)
    steps, batch, block = settings["steps"], settings["batch_size"], settings["block_size"]
    curve_blocks = setup["curve"]
    from datasets import Dataset

    curve_dataset = Dataset.from_dict({"input_ids": curve_blocks, "labels": curve_blocks})
    with tempfile.TemporaryDirectory() as scratch:
        args = training_arguments(
            scratch,
            max_steps=steps,
            batch_size=batch,
            learning_rate=settings["lr"],
            warmup_steps=steps // 10,
            eval_steps=max(1, steps // settings["curve_points"]),
            logging_steps=max(1, steps // 20),
            seed=seed,
            show_progress=False,
        )
        trainer = SequenceMeanTrainer(model=model, args=args, train_dataset=setup["mix"], eval_dataset=curve_dataset)
        metrics = trainer.train().metrics
    history = trainer.state.log_history
    eval_seconds = sum(entry["eval_runtime"] for entry in history if "eval_runtime" in entry)
    model = trainer.model.to(device).eval()
    # Evaluated as trained: bf16 autocast on CUDA (the perplexity's cross-entropy is float32), float32 on the CPU.
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.device.type == "cuda"):
        perplexity, retrieved = evaluate_texts(model, setup["texts"], block), retrieval(model, settings)
    return {
        "variant": name,
        "seed": seed,
        "parameters": model.num_parameters(),
        "trainable_parameters": model.num_parameters(only_trainable=True),
        "train_tokens": steps * batch * block,
        "train_seconds": metrics["train_runtime"] - eval_seconds,
        "tokens_per_second": steps * batch * block / (metrics["train_runtime"] - eval_seconds),
        "curve": [
            {"tokens": entry["step"] * batch * block, "perplexity": entry["eval_perplexity"]}
            for entry in history
            if "eval_perplexity" in entry
        ],
        "final_train_loss": metrics["train_loss"],
        "perplexity": perplexity,
        **retrieved,
    }


def evaluate_texts(model, texts: dict[str, str], block_size: int) -> dict[str, dict]:
    tokenizer = load_tokenizer()
    results = {}
    for split, text in texts.items():
        perplexity = evaluate_perplexity(model, tokenizer, text, block_size, block_size // 2)
        results[split] = {"per_token": perplexity.per_token, "per_word": perplexity.per_word,
                          "tokens": perplexity.tokens, "words": perplexity.words}  # fmt: skip
    return results


def retrieval(model, settings: dict) -> dict[str, dict[str, float]]:
    """MQAR and pass-key accuracy at `near` and at each multiple of the largest window."""
    tokenizer, block, pairs = load_tokenizer(), settings["block_size"], settings["num_pairs"]
    vocabulary = mqar_vocabulary(tokenizer)
    mqar_at = {"near": mqar_distances(vocabulary, block, pairs)[0], **settings["distances"]}
    near = passkey_nearest(tokenizer, block)
    passkey_at = {"near": near, **{label: max(near, distance) for label, distance in settings["distances"].items()}}
    mqar = {
        label: mqar_accuracy(model, vocabulary, block, pairs, distance, settings["mqar_trials"], seed=1)
        for label, distance in mqar_at.items()
    }
    passkey = {
        label: passkey_accuracy(model, tokenizer, block, distance, settings["passkey_trials"], seed=1)
        for label, distance in passkey_at.items()
    }
    return {"mqar": mqar, "passkey": passkey, "mqar_distances": mqar_at, "passkey_distances": passkey_at}


def passkey_nearest(tokenizer, length: int) -> int:
    """The least needle distance that every pass key allows (the needle and question's length varies with the key's
    tokens): distances below it are raised to it."""
    return max(needle_distances(sample_pieces(tokenizer, key), length)[0] for key in range(10000, 100000, 997))


def one_line(record: dict) -> str:
    words = ", ".join(f"{split} ppl/word {value['per_word']:.1f}" for split, value in record["perplexity"].items())
    mqar = " ".join(f"{label} {value:.2f}" for label, value in record["mqar"].items())
    passkey = " ".join(f"{label} {value:.2f}" for label, value in record["passkey"].items())
    return f"{words}; MQAR {mqar}; pass key {passkey}; {record['tokens_per_second']:,.0f} tokens/s"


def mean_and_spread(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(records: list[dict]) -> dict[str, dict]:
    """Per variant: parameters, and mean / spread over the seeds of every figure."""
    summary = {}
    for name in dict.fromkeys(record["variant"] for record in records):
        runs = [record for record in records if record["variant"] == name]
        figures = {"tokens_per_second": [run["tokens_per_second"] for run in runs]}
        for split in runs[0]["perplexity"]:
            for unit in ("per_token", "per_word"):
                figures[f"{split}_{unit}"] = [run["perplexity"][split][unit] for run in runs]
        for task in ("mqar", "passkey"):
            for label in runs[0][task]:
                figures[f"{task}_{label}"] = [run[task][label] for run in runs]
        curve = [
            {"tokens": point["tokens"], **mean_and_spread([run["curve"][index]["perplexity"] for run in runs])}
            for index, point in enumerate(runs[0]["curve"])
        ]
        summary[name] = {
            "parameters": runs[0]["parameters"],
            "trainable_parameters": runs[0]["trainable_parameters"],
            "seeds": [run["seed"] for run in runs],
            "curve": curve,
            **{figure: mean_and_spread(values) for figure, values in figures.items()},
        }
    return summary


def cell(entry: dict, digits: int = 1, scale: float = 1.0) -> str:
    return f"{entry['mean'] * scale:.{digits}f} ± {entry['std'] * scale:.{digits}f}"


def markdown_tables(results: dict) -> str:
    summary = results["summary"]
    splits = [split for split in ("validation", "test") if f"{split}_per_word" in next(iter(summary.values()))]
    header = ["variant", "parameters", "training tokens/s"]
    header += [f"{split} ppl/{unit}" for split in splits for unit in ("word", "token")]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for name, entry in summary.items():
        row = [f"`{name}`", f"{entry['parameters']:,}", cell(entry["tokens_per_second"], 0)]
        row += [cell(entry[f"{split}_per_{unit}"], 2) for split in splits for unit in ("word", "token")]
        lines.append("| " + " | ".join(row) + " |")
    for task, title in (("mqar", "MQAR: share of queries answered (%)"), ("passkey", "pass key: share retrieved (%)")):
        distances = results["runs"][0][f"{task}_distances"]
        labels = list(distances)
        lines += ["", f"{title}, by key-to-question distance in tokens:", ""]
        lines.append("| variant | " + " | ".join(f"{label} ({distances[label]})" for label in labels) + " |")
        lines.append("| --- |" + " ---: |" * len(labels))
        for name, entry in summary.items():
            lines.append(
                f"| `{name}` | " + " | ".join(cell(entry[f"{task}_{label}"], 1, 100) for label in labels) + " |"
            )
    return "\n".join(lines)


def target_checks(results: dict) -> list[str]:
    """Issue 26's targets, each checked against the measured means; a target whose variants did not run is skipped."""
    summary, checks = results["summary"], []
    split = "test" if "test_per_word" in next(iter(summary.values())) else "validation"
    if {"fastgpt", "llama"} <= summary.keys():
        fastgpt, llama = summary["fastgpt"][f"{split}_per_word"]["mean"], summary["llama"][f"{split}_per_word"]["mean"]
        verdict = "met" if fastgpt <= llama else "not met"
        checks.append(f"FastGPT {split} perplexity per word <= Llama's: {fastgpt:.2f} vs {llama:.2f} "
                      f"({100 * (fastgpt / llama - 1):+.1f}%): {verdict}.")  # fmt: skip
    chance = 1 / results["settings"]["mqar_vocabulary_size"]
    beyond = [f"{multiple}x" for multiple in DISTANCE_MULTIPLES[1:]]
    for task, floor in (("mqar", chance), ("passkey", PASSKEY_CHANCE)):
        for label in beyond:
            means = {name: entry[f"{task}_{label}"]["mean"] for name, entry in summary.items()}
            if {"fastgpt", "llama"} <= means.keys():
                gap = 100 * (means["fastgpt"] - means["llama"])
                verdict = "met" if gap >= -2 else "not met"
                if means["llama"] <= floor + 0.02:  # the peer does not retrieve either: nothing is compared
                    verdict = "not informative, Llama is within 2 points of chance"
                checks.append(f"{task} at {label}: FastGPT within 2 points of Llama: {100 * means['fastgpt']:.1f}% vs "
                              f"{100 * means['llama']:.1f}% ({gap:+.1f} points): {verdict}.")  # fmt: skip
            if "sliding" in means:
                checks.append(f"{task} at {label}: all-sliding {100 * means['sliding']:.1f}% (chance "
                              f"{100 * floor:.1f}%).")  # fmt: skip
    if "dynamic" in summary:
        base = summary["dynamic"]
        for name in (name for name in summary if name.startswith("dynamic-")):
            entry = summary[name]
            deltas = ", ".join(
                f"{task} {label} {100 * (entry[f'{task}_{label}']['mean'] - base[f'{task}_{label}']['mean']):+.1f} pts"
                for task in ("mqar", "passkey")
                for label in beyond
            )
            ppl = entry[f"{split}_per_word"]["mean"] - base[f"{split}_per_word"]["mean"]
            checks.append(f"`{name}` against `dynamic`: {split} ppl/word {ppl:+.2f}, {deltas}.")
    return checks


def write_report(results: dict, output: Path) -> None:
    settings = results["settings"]
    shape = settings["shape"]
    evaluated = (
        "" if settings["eval_chars"] is None else f", evaluated on the first {settings['eval_chars']:,} characters"
    )
    lines = [
        f"# Quality harness ({settings['size']} size), {settings['date']}, {settings['device']}",
        "",
        f"Shape: {shape['num_hidden_layers']} layers of width {shape['hidden_size']}, {shape['num_attention_heads']} "
        f"heads, sliding window {shape['sliding_window']}, dynamic window {shape['dynamic_window']}, blocks of "
        f"{shape['compress_block_size']}, {shape['num_memory_tokens']} memory slots; every run {settings['steps']} "
        f"steps of {settings['batch_size']} x {settings['block_size']} tokens (1/2 WikiText, 1/4 MQAR with "
        f"{settings['num_pairs']} pairs, 1/4 pass key), AdamW lr {settings['lr']}, seeds {settings['seeds']} "
        f"(mean ± standard deviation). Data: {settings['data'] or 'the shipped WikiText-2 excerpt'}{evaluated}.",
        f"Wall time {settings.get('wall_seconds', 0) / 60:.1f} min with {settings['workers']} worker process(es).",
        "",
        markdown_tables(results),
        "",
        f"Chance: MQAR {100 / settings['mqar_vocabulary_size']:.1f}% (1 of {settings['mqar_vocabulary_size']} values), "
        "pass key ~0% (three answer tokens).",
        "",
        "## Targets (issue 26)",
        "",
        *[f"- {check}" for check in target_checks(results)],
        "",
        "## Variants",
        "",
        *[f"- `{name}`: {VARIANTS[name].description}" for name in results["summary"]],
        *[f"- not run: {name}: {why}" for name, why in NOT_EXPRESSIBLE.items()],
    ]
    (output / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines), flush=True)
    plot(results, output / "quality.png")


def plot(results: dict, path: Path) -> None:
    """Accuracy against distance (MQAR, pass key) and validation perplexity against tokens; skipped without
    matplotlib (the `demo` extra)."""
    panels = recall_probe.three_panel_figure()
    if panels is None:
        return
    figure, axes = panels
    summary = results["summary"]
    for axis, task in zip(axes[:2], ("mqar", "passkey"), strict=True):
        distances = results["runs"][0][f"{task}_distances"]
        for name, entry in summary.items():
            means = [100 * entry[f"{task}_{label}"]["mean"] for label in distances]
            spreads = [100 * entry[f"{task}_{label}"]["std"] for label in distances]
            axis.errorbar(list(distances.values()), means, yerr=spreads, marker="o", capsize=3, label=name)
        axis.axvline(results["settings"]["largest_window"], color="grey", linestyle=":", label="largest window")
        if task == "mqar":
            axis.axhline(
                100 / results["settings"]["mqar_vocabulary_size"], color="black", linestyle="--", label="chance"
            )
        axis.set(xscale="log", xlabel="key-to-question distance (tokens)", ylabel="accuracy (%)",
                 ylim=(-2, 102), title="MQAR" if task == "mqar" else "pass key")  # fmt: skip
    for name, entry in summary.items():
        axes[2].plot([point["tokens"] for point in entry["curve"]], [point["mean"] for point in entry["curve"]],
                     marker="o", label=name)  # fmt: skip
    axes[2].set(yscale="log", xlabel="training tokens", ylabel="validation perplexity per token", title="perplexity")
    axes[2].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"plot: {path}")
