"""Load test of `fastgpt serve` against `transformers serve --continuous-batching` with a Llama of the same shape.

    python benchmarks/bench.py serve --preset small --requests 64 --concurrency 8            # CPU
    python benchmarks/bench.py serve --preset 1b --device cuda --dtype bfloat16 --compile \\
        --requests 2000 --concurrency 256 --rows 256                                        # GPU

Both servers run as subprocesses on 127.0.0.1 and load random-weight models of the preset's shape with the shipped
tokenizer, saved to a temporary folder (`transformers serve` loads the local Llama folder: nothing is downloaded).
The client (httpx, asyncio, in `--client-processes` processes that start together, so that parsing every
token's server-sent event does not bound what is measured) sends each server the same `--requests` streaming
completions, `--concurrency` at a time (a closed loop; each process keeps its share in flight on as many
connections), each a `--prompt-tokens`-token excerpt of the shipped corpus with `--reply-tokens` tokens asked,
greedy. A warm-up request per server goes first (Transformers' continuous batching sizes its cache on its first
request). Each server gets `--time-limit` seconds; requests unfinished by then are counted as not done. Printed per
server: requests done, requests/s over the wall time, p50 / p99 of the time to the first text chunk (TTFT) and of
the end-to-end latency, and the mean reply tokens (the servers' own `usage` counts).

`--engine-only` measures the engines without HTTP, in this process: FastGPT's `ContinuousBatchingEngine` (`--rows`
rows, every request submitted at once) against Llama's `generate_batch` (Transformers' continuous batching), the
same prompts and reply length, greedy, no end-of-sequence stop; requests/s, tokens/s, and where FastGPT's rounds
spend their time (prefill forwards, copies into rows, decode steps, choosing tokens; device synchronised).
"""

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from models import DeviceUnavailable
from timing import synchronize

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM
from fastgpt_hf.data import CORPUS_FILES, load_tokenizer
from fastgpt_hf.presets import PRESETS
from fastgpt_hf.serving import ContinuousBatchingEngine, SamplingParams
from fastgpt_hf.training import llama_peer

FASTGPT_COMMAND = "import sys; from fastgpt_console import main; sys.argv[0] = 'fastgpt'; sys.exit(main())"


def save_models(preset: str, folder: Path) -> tuple[Path, Path]:
    """Random FastGPT and same-shape Llama checkpoints (with the shipped tokenizer) in `folder`."""
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    config = FastGPTConfig.from_preset(preset, vocab_size=max(len(tokenizer), PRESETS[preset]["vocab_size"]))
    fastgpt = FastGPTForCausalLM(config)
    paths = folder / "fastgpt", folder / "llama"
    for model, path in zip((fastgpt, llama_peer(config)), paths, strict=True):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return paths


def corpus_prompts(count: int, prompt_tokens: int) -> list[str]:
    """`count` prompts: the consecutive `prompt_tokens`-token excerpts of the shipped validation text, as text, from
    the first again where the text has fewer (it has about 820 of 64 tokens)."""
    tokenizer = load_tokenizer()
    ids = tokenizer(Path(CORPUS_FILES["validation"]).read_text()).input_ids
    starts = range(0, len(ids) - prompt_tokens, prompt_tokens)
    excerpts = [tokenizer.decode(ids[start : start + prompt_tokens]) for start in starts[:count]]
    return [excerpts[index % len(excerpts)] for index in range(count)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(command: list[str], base_url: str, log_path: Path, timeout: float = 300) -> subprocess.Popen:
    log = open(log_path, "w")  # noqa: SIM115 (the child writes it until it ends)
    process = subprocess.Popen(command, stdout=log, stderr=log, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{base_url}/health").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise RuntimeError(f"{command[:4]} did not start; see {log_path}:\n{log_path.read_text()[-2000:]}")


async def one_request(http: httpx.AsyncClient, model: str, prompt: str, reply_tokens: int) -> dict:
    """One streaming completion: seconds to the first text and to the end, and the server's reply token count."""
    body = {"model": model, "prompt": prompt, "max_tokens": reply_tokens, "temperature": 0, "stream": True}
    started, first, tokens = time.perf_counter(), None, None
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if first is None and chunk["choices"] and chunk["choices"][0].get("text"):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    finished = time.perf_counter()
    return {"ttft": (first or finished) - started, "e2e": finished - started, "tokens": tokens, "finished": finished}


async def load_test(
    base_url: str, prompts: list[str], concurrency: int, reply_tokens: int, limit: float, ready=None
) -> dict:
    """Send `prompts`, `concurrency` at a time on as many connections, for at most `limit` seconds (after a warm-up
    request, then `ready.wait()` where several processes start together); the results of the requests done and the
    seconds from the start to the last one's end (perf_counter: one clock for every process of the machine)."""
    connections = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    # The warm-up may wait for compilation, beyond `limit`; the load test itself stops at `limit`.
    async with httpx.AsyncClient(base_url=base_url, timeout=limit + 600, limits=connections) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        for prompt in (min(prompts, key=len), max(prompts, key=len)):  # warm-up: the shortest and longest prompts
            await one_request(http, model, prompt, reply_tokens)
        if ready is not None:
            ready.wait()
        pending, results = list(prompts), []

        async def worker() -> None:
            while pending:
                results.append(await one_request(http, model, pending.pop(), reply_tokens))

        started = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), limit)
        except asyncio.TimeoutError:
            pass
        return {"results": results, "started": started}


def client_process(base_url, prompts, concurrency, reply_tokens, limit, ready, results) -> None:
    """One client process: its share of the load test, its measurements put on `results`."""
    results.put(asyncio.run(load_test(base_url, prompts, concurrency, reply_tokens, limit, ready)))


def load_test_processes(
    base_url: str, prompts: list[str], concurrency: int, reply_tokens: int, limit: float, processes: int
) -> dict:
    """`load_test` split over `processes` client processes (forked: they use no device), started together; the
    requests done by all and the seconds from the first start to the last end."""
    processes = max(1, min(processes, concurrency))
    context = multiprocessing.get_context("fork")
    ready, results = context.Barrier(processes), context.Queue()
    shares = [(prompts[index::processes], len(range(index, concurrency, processes))) for index in range(processes)]
    workers = [
        context.Process(target=client_process, args=(base_url, share, count, reply_tokens, limit, ready, results))
        for share, count in shares
    ]
    for worker in workers:
        worker.start()
    measured = [results.get(timeout=limit + 600) for _ in workers]
    for worker in workers:
        worker.join()
    done = [result for part in measured for result in part["results"]]
    started = min(part["started"] for part in measured)
    ended = max((result["finished"] for result in done), default=started)
    return {"results": done, "seconds": max(ended - started, 1e-9)}


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))]


def report_line(name: str, requested: int, measured: dict) -> str:
    results = measured["results"]
    if not results:
        return f"{name:<34} {requested:>5} {0:>5}"
    ttft, e2e = [r["ttft"] * 1000 for r in results], [r["e2e"] * 1000 for r in results]
    counted = [r["tokens"] for r in results if r["tokens"] is not None]
    tokens = f"{sum(counted) / len(counted):.1f}" if counted else "n/a"
    qps = len(results) / measured["seconds"]
    return (
        f"{name:<34} {requested:>5} {len(results):>5} {qps:>7.2f} {percentile(ttft, 0.5):>9.0f} "
        f"{percentile(ttft, 0.99):>9.0f} {percentile(e2e, 0.5):>9.0f} {percentile(e2e, 0.99):>9.0f} {tokens:>7}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rows", type=int, default=8, help="FastGPT's cache rows")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--reply-tokens", type=int, default=32)
    parser.add_argument("--time-limit", type=float, default=300, help="seconds per server")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compile", action="store_true", help="FastGPT compiles its decode step")
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument(
        "--client-processes",
        type=int,
        default=max(1, min(8, (os.cpu_count() or 2) // 2)),
        help="client processes sharing the load (default: half the CPUs, at most 8)",
    )
    parser.add_argument("--prefill-batch", type=int, default=16, help="FastGPT's prompts prefilled together, at most")
    parser.add_argument("--stream-interval", type=int, default=1, help="FastGPT's tokens per streamed piece")
    parser.add_argument("--http-workers", type=int, default=1, help="FastGPT's HTTP processes")
    parser.add_argument("--engine-only", action="store_true", help="the engines in this process, without HTTP")


def run(args: argparse.Namespace) -> None:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailable("--device cuda: this machine has no CUDA device; --device cpu runs it on the CPU.")
    if args.engine_only:
        run_engines(args)
        return
    prompts = corpus_prompts(args.requests, args.prompt_tokens)
    context = args.prompt_tokens + args.reply_tokens + 16  # room for a prompt that re-encodes a little longer
    print(
        f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load "
        f"average {os.getloadavg()[0]:.1f} at start; device {args.device}, {args.dtype}; torch {torch.__version__}"
    )
    print(
        f"{args.requests} streaming requests, {args.concurrency} at a time, {args.prompt_tokens}-token prompts, "
        f"{args.reply_tokens}-token replies, greedy; preset {args.preset}"
    )
    with tempfile.TemporaryDirectory() as folder:
        fastgpt_path, llama_path = save_models(args.preset, Path(folder))
        fastgpt_options = ["--rows", str(args.rows), "--context", str(context), "--max-queue", str(args.requests)]
        fastgpt_options += ["--prefill-batch", str(args.prefill_batch), "--stream-interval", str(args.stream_interval)]
        fastgpt_options += ["--http-workers", str(args.http_workers)]
        fastgpt_options += ["--device", args.device, "--dtype", args.dtype]
        fastgpt_options += ["--compile" if args.compile else "--no-compile"]
        transformers_cli = str(Path(sys.executable).parent / "transformers")
        stream_note = f", {args.stream_interval} a piece" if args.stream_interval > 1 else ""
        stream_note += f", {args.http_workers} HTTP processes" if args.http_workers > 1 else ""
        servers = {
            f"FastGPT (fastgpt serve, {args.rows} rows{stream_note})": [
                sys.executable,
                "-c",
                FASTGPT_COMMAND,
                "serve",
                str(fastgpt_path),
                *fastgpt_options,
            ],
            "Llama (transformers serve, CB)": [
                transformers_cli,
                "serve",
                str(llama_path),
                "--continuous-batching",
                "--device",
                args.device,
                "--dtype",
                args.dtype,
                "--host",
                "127.0.0.1",
            ],
        }
        if args.skip_llama:
            servers.popitem()
        lines = []
        for name, command in servers.items():
            port = free_port()
            base_url = f"http://127.0.0.1:{port}"
            process = start_server([*command, "--port", str(port)], base_url, Path(folder) / f"{port}.log")
            try:
                measured = load_test_processes(
                    base_url, prompts, args.concurrency, args.reply_tokens, args.time_limit, args.client_processes
                )
            finally:
                process.terminate()
                process.wait(timeout=60)
            lines.append(report_line(name, args.requests, measured))
            print(f"  ({name} done; load average {os.getloadavg()[0]:.1f})", flush=True)
    print(
        f"{'server':<34} {'sent':>5} {'done':>5} {'req/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'E2E p50':>9} {'E2E p99':>9} {'tokens':>7}   (milliseconds)"
    )
    print("\n".join(lines))


class TimedEngine(ContinuousBatchingEngine):
    """FastGPT's engine with each part of a round timed between two device synchronisations."""

    def __init__(self, *args, **kwargs):
        self.seconds: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()
        super().__init__(*args, **kwargs)

    def timed(self, part: str, function, *args):
        synchronize(self.device)
        started = time.perf_counter()
        result = function(*args)
        synchronize(self.device)
        self.seconds[part] += time.perf_counter() - started
        self.calls[part] += 1
        return result

    def prefill(self, rows, prompts):
        return self.timed("prefill (forward and copies into rows)", super().prefill, rows, prompts)

    def decode_step(self):
        return self.timed("decode step", super().decode_step)

    def add_tokens(self, rows, logits):
        return self.timed("choose tokens", super().add_tokens, rows, logits)


def run_fastgpt_engine(model, prompt_ids: list[list[int]], args: argparse.Namespace) -> dict:
    """Every prompt submitted at once into `--rows` rows, the engine stepped until all are answered (after one
    warm-up request: compilation and the prefill caches); seconds, tokens and the rounds' parts."""
    context = max(len(ids) for ids in prompt_ids) + args.reply_tokens
    engine = TimedEngine(model, args.rows, context, len(prompt_ids), (), args.compile, args.prefill_batch, args.compile)
    params = SamplingParams(args.reply_tokens, temperature=0)
    for ids in (min(prompt_ids, key=len), max(prompt_ids, key=len)):  # a compiled prefill's shortest and longest
        warm_up = engine.submit(ids, params, lambda event: None)
        while not warm_up.finished:
            engine.step()
    engine.seconds.clear()
    engine.calls.clear()
    tokens = [0]

    def count(event) -> None:
        tokens[0] += 1

    for ids in prompt_ids:
        engine.submit(ids, params, count)
    synchronize(engine.device)
    started, rounds = time.perf_counter(), 0
    while engine.step():
        rounds += 1
    synchronize(engine.device)
    return {"seconds": time.perf_counter() - started, "tokens": tokens[0], "rounds": rounds, "engine": engine}


def run_llama_batch(model, prompt_ids: list[list[int]], args: argparse.Namespace) -> dict:
    """Llama's `generate_batch` (Transformers' continuous batching, its paged cache) over the same prompts."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=args.reply_tokens, min_new_tokens=args.reply_tokens, do_sample=False)
    model.generate_batch(prompt_ids[:1], generation_config=config, progress_bar=False)  # warm-up
    synchronize(model.device)
    started = time.perf_counter()
    outputs = model.generate_batch(prompt_ids, generation_config=config, progress_bar=False)
    synchronize(model.device)
    tokens = sum(len(output.generated_tokens) for output in outputs.values())
    return {"seconds": time.perf_counter() - started, "tokens": tokens}


def run_engines(args: argparse.Namespace) -> None:
    tokenizer = load_tokenizer()
    prompt_ids = [tokenizer(text).input_ids for text in corpus_prompts(args.requests, args.prompt_tokens)]
    torch.manual_seed(0)
    preset = PRESETS[args.preset]
    config = FastGPTConfig.from_preset(args.preset, vocab_size=max(len(tokenizer), preset["vocab_size"]))
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(
        f"engines without HTTP: preset {args.preset}, {device}, {args.dtype}, torch {torch.__version__}; "
        f"{len(prompt_ids)} prompts of {args.prompt_tokens} tokens submitted at once, {args.reply_tokens} new "
        f"tokens each, greedy; FastGPT {args.rows} rows, prefill batches of at most {args.prefill_batch}, decode "
        f"{'compiled' if args.compile else 'eager'}"
    )
    fastgpt = FastGPTForCausalLM(config).to(device, dtype).eval()
    measured = {"FastGPT (ContinuousBatchingEngine)": run_fastgpt_engine(fastgpt, prompt_ids, args)}
    engine = measured["FastGPT (ContinuousBatchingEngine)"]["engine"]
    del fastgpt
    if not args.skip_llama:
        llama = llama_peer(config).to(device, dtype).eval()
        measured["Llama (generate_batch)"] = run_llama_batch(llama, prompt_ids, args)
    print(f"{'engine':<36} {'requests':>8} {'seconds':>8} {'req/s':>8} {'tokens/s':>9}")
    for name, result in measured.items():
        print(
            f"{name:<36} {len(prompt_ids):>8} {result['seconds']:>8.2f} {len(prompt_ids) / result['seconds']:>8.1f} "
            f"{result['tokens'] / result['seconds']:>9.0f}"
        )
    rounds = measured["FastGPT (ContinuousBatchingEngine)"]["rounds"]
    total = measured["FastGPT (ContinuousBatchingEngine)"]["seconds"]
    print(f"FastGPT's {rounds} rounds, {1000 * total / rounds:.2f} ms each:")
    print(f"{'part':<34} {'calls':>6} {'ms per call':>12} {'ms per round':>13}")
    for part, seconds in engine.seconds.items():
        calls = engine.calls[part]
        print(f"{part:<34} {calls:>6} {1000 * seconds / calls:>12.2f} {1000 * seconds / rounds:>13.2f}")
