"""The quality harness's recall probe (`bench.py quality --recall-probe`): can each layout learn MQAR at all?

Each variant of `--variants` at each seed is trained on MQAR samples alone (`RECALL_PROBES[size]`; `--steps` and
`--num-pairs` override its steps and pairs) at the `--size` shape (`--layer-types`: another base layout, which
`fastgpt` takes as it is), then asked 1x and 4x the largest window after each key. One process per run
(`--workers`); each writes `probe-runs/<variant>-seed<N>.json` when it is done, beside `probe-settings.json`.

The report gathers every finished run of `--output` (so runs of several calls, e.g. seeds on different days, add
up; `--report-only` rebuilds it): `recall-probe.json`, `recall-probe.md` (one row per run, then the mean over the
seeds per variant) and, where matplotlib is installed, `recall-probe.png`: the loss against steps, the share of
queries answered against distance, and the share by query asked, beside what a model scores that copies a value
not yet answered without matching keys (1 in n, 1 in n - 1, ..., 1 for n pairs: the elimination level).
"""

import argparse
import json
import math
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from fastgpt_hf.ablations import VARIANTS, variant_config, variant_model
from fastgpt_hf.cli import positive_int
from fastgpt_hf.data import load_tokenizer
from fastgpt_hf.recall_tasks import mqar_accuracy_by_query, mqar_distances, mqar_samples, mqar_vocabulary

# MQAR blocks only, short and many, so that a model that can retrieve learns it: a plain AdamW loop, one-cycle
# schedule. The CPU's within minutes on 2 cores; the GPU's (block: 4x the largest window and the pairs) one process
# per run on one card.
CPU_RECALL_PROBE = {"block_size": 64, "batch_size": 32, "steps": 1500, "lr": 3e-3, "num_pairs": 4, "trials": 64,
                    "workers": 1}  # fmt: skip
RECALL_PROBES = {
    "test": CPU_RECALL_PROBE,
    "cpu": CPU_RECALL_PROBE,
    "gpu": {"block_size": 320, "batch_size": 32, "steps": 2000, "lr": 2e-3, "num_pairs": 8, "trials": 128,
            "workers": 8},
}  # fmt: skip
DISTANCE_MULTIPLES = (1, 4)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The probe's own options (the harness's `--size`, `--variants`, `--seeds`, `--steps`, `--workers`, `--output`
    and `--report-only` apply to it too)."""
    parser.add_argument(
        "--recall-probe",
        action="store_true",
        help="instead: can each variant learn MQAR at all? MQAR-only training at the size's shape (RECALL_PROBES)",
    )
    parser.add_argument(
        "--layer-types",
        nargs="+",
        help="--recall-probe: the base layout the variants derive from (default: the shape's own), e.g. "
        "sliding_attention full_attention full_attention",
    )
    parser.add_argument(
        "--num-pairs", type=positive_int, help="--recall-probe: key-value pairs per block (default: the size's)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="--recall-probe: each run's training forward compiled (torch.compile), fewer and fused kernels a step",
    )


def run(args: argparse.Namespace, size: str, shape: dict, output: Path) -> None:
    """Train and evaluate every (variant, seed) of `args` with `size`'s probe at `shape` (FastGPTConfig keyword
    arguments for the probe's block size), then write the report of every finished run in `output`."""
    if args.report_only:
        report(output)
        return
    probe = {**RECALL_PROBES[size], "size": size, "compile": args.compile}
    probe["steps"] = args.steps or probe["steps"]
    probe["num_pairs"] = args.num_pairs or probe["num_pairs"]
    if args.layer_types:
        shape = {**shape, "layer_types": args.layer_types}
    window = max(shape["sliding_window"], shape["dynamic_window"])
    distances = {f"{multiple}x": multiple * window for multiple in DISTANCE_MULTIPLES}
    steps, batch, block, pairs = probe["steps"], probe["batch_size"], probe["block_size"], probe["num_pairs"]
    vocabulary = mqar_vocabulary(load_tokenizer())
    nearest, farthest = mqar_distances(vocabulary, block, pairs)
    if not nearest <= min(distances.values()) <= max(distances.values()) <= farthest:
        raise ValueError(
            f"{pairs} pairs in blocks of {block} tokens put every key {nearest} to {farthest} tokens before its "
            f"query; the probe asks at {sorted(distances.values())}. Use fewer --num-pairs."
        )
    chance = 100 / len(vocabulary.values)
    print(f"recall probe: {size} shape, {steps} steps of {batch} MQAR blocks of {block} tokens, {pairs} pairs; "
          f"chance {chance:.2f}%", flush=True)  # fmt: skip
    setup = {"probe": probe, "shape": shape, "distances": distances, "output": str(output),
             "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
    settings_path = output / "probe-settings.json"
    if settings_path.is_file():
        earlier = json.loads(settings_path.read_text(encoding="utf-8"))
        if any(earlier[key] != setup[key] for key in ("probe", "shape", "distances")):
            raise ValueError(
                f"{output} holds recall-probe runs of other settings ({settings_path}); their report would mix "
                "the two. Give this probe another --output."
            )
    (output / "probe-runs").mkdir(parents=True, exist_ok=True)
    settings_path.write_text(json.dumps(setup, indent=1), encoding="utf-8")
    jobs = [(name, seed) for seed in args.seeds for name in args.variants]
    workers = min(args.workers or probe["workers"], len(jobs))
    started = time.perf_counter()
    if workers == 1:
        for name, seed in jobs:
            probe_run(name, seed, setup)
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(probe_run, *zip(*jobs, strict=True), [setup] * len(jobs)))
    print(f"recall probe: {len(jobs)} runs in {time.perf_counter() - started:.0f} s", flush=True)
    report(output)


def probe_run(name: str, seed: int, setup: dict) -> dict:
    """One variant at one seed through the recall probe: a plain AdamW loop (one-cycle schedule, bf16 autocast on
    CUDA, float32 on the CPU; with `compile` the model's forward compiled, its time in `train_seconds`), then its
    accuracy by query at each distance, eager; the loss is printed ten times a run."""
    probe, distances = setup["probe"], setup["distances"]
    steps, batch, block, pairs = probe["steps"], probe["batch_size"], probe["block_size"], probe["num_pairs"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocabulary = mqar_vocabulary(load_tokenizer())
    samples = mqar_samples(vocabulary, block, pairs, steps * batch, seed=seed)
    model = variant_model(name, setup["shape"], seed).to(device)
    forward = torch.compile(model) if probe["compile"] else model
    started = time.perf_counter()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=probe["lr"],
                                  weight_decay=0.01)  # fmt: skip
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, probe["lr"], total_steps=steps, pct_start=0.1)
    model.train()
    curve = []
    for step in range(steps):
        chunk = samples[step * batch : (step + 1) * batch]
        input_ids = torch.tensor([sample.input_ids for sample in chunk], device=device)
        labels = torch.tensor([sample.labels for sample in chunk], device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = forward(input_ids, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "loss": loss.item()})
            print(f"{name} seed {seed}: step {step + 1}, loss {curve[-1]['loss']:.3f}", flush=True)
    train_seconds = time.perf_counter() - started
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        by_query = {
            label: mqar_accuracy_by_query(model, vocabulary, block, pairs, distance, probe["trials"], seed=1)
            for label, distance in distances.items()
        }
    accuracy = {label: sum(shares) / pairs for label, shares in by_query.items()}
    record = {"variant": name, "seed": seed, "layer_types": variant_config(name, setup["shape"]).layer_types,
              "final_loss": curve[-1]["loss"], "curve": curve, "accuracy": accuracy, "accuracy_by_query": by_query,
              "train_seconds": train_seconds, "tokens_per_second": steps * batch * block / train_seconds}  # fmt: skip
    Path(setup["output"], "probe-runs", f"{name}-seed{seed}.json").write_text(json.dumps(record, indent=1))
    shares = ", ".join(
        f"{label} {100 * accuracy[label]:.1f}% (by query asked: "
        f"{' / '.join(f'{100 * share:.1f}' for share in by_query[label])})"
        for label in accuracy
    )
    print(f"{name} seed {seed}: loss {record['final_loss']:.3f}, MQAR {shares}, "
          f"{record['tokens_per_second']:,.0f} tokens/s", flush=True)  # fmt: skip
    return record


def elimination_by_query(num_pairs: int) -> list[float]:
    """What a model scores on the k-th query asked when it copies a value of the sample not yet answered, without
    matching keys: 1 / num_pairs, 1 / (num_pairs - 1), ..., 1."""
    return [1 / (num_pairs - asked) for asked in range(num_pairs)]


def report(output: Path) -> dict:
    """`probe-settings.json` and every `probe-runs/*.json` of `output` (variants in `VARIANTS` order, then seeds)
    into recall-probe.json, recall-probe.md and recall-probe.png; the table is printed."""
    settings_path = output / "probe-settings.json"
    if not settings_path.is_file():
        raise ValueError(f"{output} holds no recall probe (no probe-settings.json); run --recall-probe first.")
    setup = json.loads(settings_path.read_text(encoding="utf-8"))
    runs = [json.loads(path.read_text(encoding="utf-8")) for path in (output / "probe-runs").glob("*.json")]
    if not runs:
        raise ValueError(f"{output / 'probe-runs'} holds no finished run; run --recall-probe first.")
    runs.sort(key=lambda run: (list(VARIANTS).index(run["variant"]), run["seed"]))
    results = {**setup, "runs": runs, "means": variant_means(runs)}
    (output / "recall-probe.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    table = probe_table(results)
    (output / "recall-probe.md").write_text(table, encoding="utf-8")
    print(table, end="", flush=True)
    plot(results, output / "recall-probe.png")
    return results


def variant_means(runs: list[dict]) -> dict[str, dict]:
    """Per variant: its seeds and the mean over them of the loss curve, the accuracy and the accuracy by query."""
    means = {}
    for name in dict.fromkeys(run["variant"] for run in runs):
        own = [run for run in runs if run["variant"] == name]
        labels, points = list(own[0]["accuracy"]), range(len(own[0]["curve"]))
        queries = range(len(own[0]["accuracy_by_query"][labels[0]]))
        means[name] = {
            "seeds": [run["seed"] for run in own],
            "curve": [{"step": own[0]["curve"][point]["step"],
                       "loss": statistics.fmean(run["curve"][point]["loss"] for run in own)} for point in points],
            "accuracy": {label: statistics.fmean(run["accuracy"][label] for run in own) for label in labels},
            "accuracy_by_query": {
                label: [statistics.fmean(run["accuracy_by_query"][label][asked] for run in own) for asked in queries]
                for label in labels
            },
        }  # fmt: skip
    return means


def probe_table(results: dict) -> str:
    """The runs as markdown: one row per run (layers, final loss, share of queries answered at each distance, the
    first query asked, the one elimination cannot answer above 1 in `num_pairs`), then the means over the seeds."""
    labels = list(results["distances"])
    pairs = results["probe"]["num_pairs"]
    distances = " / ".join(f"{label} ({results['distances'][label]} tokens)" for label in labels)
    lines = [
        f"| variant | seed | layers | final loss | MQAR {distances} | first query asked | tokens/s |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for run in results["runs"]:
        layers = ", ".join(kind.removesuffix("_attention") for kind in run["layer_types"])
        shares = " / ".join(f"{100 * run['accuracy'][label]:.1f}%" for label in labels)
        first = " / ".join(f"{100 * run['accuracy_by_query'][label][0]:.1f}%" for label in labels)
        lines.append(f"| `{run['variant']}` | {run['seed']} | {layers} | {run['final_loss']:.3f} | {shares} | {first} "
                     f"| {run['tokens_per_second']:,.0f} |")  # fmt: skip
    lines += [
        "",
        "| variant | seeds | mean final loss | mean MQAR | mean first query asked |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name, mean in results["means"].items():
        shares = " / ".join(f"{100 * mean['accuracy'][label]:.1f}%" for label in labels)
        first = " / ".join(f"{100 * mean['accuracy_by_query'][label][0]:.1f}%" for label in labels)
        seeds = ", ".join(str(seed) for seed in mean["seeds"])
        lines.append(f"| `{name}` | {seeds} | {mean['curve'][-1]['loss']:.3f} | {shares} | {first} |")
    elimination = elimination_by_query(pairs)
    lines += ["", f"Elimination level ({pairs} pairs): {100 * sum(elimination) / pairs:.1f}% of the queries, "
              f"{100 * elimination[0]:.1f}% of the first asked; chance 1 in the task's values."]  # fmt: skip
    return "\n".join(lines) + "\n"


def three_panel_figure():
    """A matplotlib figure of three panels side by side and its axes (Agg backend), or None without matplotlib
    (the `demo` extra); the quality harness's plot uses it too."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'fastgpt_hf[demo]', then --report-only)")
        return None
    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot.subplots(1, 3, figsize=(15, 4))


def plot(results: dict, path: Path) -> None:
    """Mean loss against steps, mean share answered against distance and by query asked (farthest distance) per
    variant, with the elimination level; skipped without matplotlib (the `demo` extra)."""
    panels = three_panel_figure()
    if panels is None:
        return
    figure, axes = panels
    labels, pairs = list(results["distances"]), results["probe"]["num_pairs"]
    farthest = labels[-1]
    for name, mean in results["means"].items():
        axes[0].plot([point["step"] for point in mean["curve"]], [point["loss"] for point in mean["curve"]],
                     marker="o", label=name)  # fmt: skip
        axes[1].plot([results["distances"][label] for label in labels],
                     [100 * mean["accuracy"][label] for label in labels], marker="o", label=name)  # fmt: skip
        axes[2].plot(range(1, pairs + 1), [100 * share for share in mean["accuracy_by_query"][farthest]],
                     marker="o", label=name)  # fmt: skip
    elimination = elimination_by_query(pairs)
    axes[0].axhline(math.log(pairs), color="grey", linestyle=":", label=f"ln {pairs}: one of the sample's values")
    axes[1].axhline(100 * sum(elimination) / pairs, color="black", linestyle="--", label="elimination level")
    axes[2].plot(range(1, pairs + 1), [100 * share for share in elimination], color="black", linestyle="--",
                 label="elimination level")  # fmt: skip
    axes[0].set(xlabel="training step", ylabel="loss (mean over seeds)", title="MQAR loss")
    axes[1].set(xscale="log", xlabel="key-to-query distance (tokens)", ylabel="queries answered (%)", ylim=(-2, 102),
                title="MQAR by distance")  # fmt: skip
    axes[2].set(xlabel="query asked (k-th)", ylabel="answered (%)", ylim=(-2, 102),
                title=f"by query asked, {results['distances'][farthest]} tokens back")  # fmt: skip
    for axis in axes:
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"plot: {path}")
