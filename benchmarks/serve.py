"""Load test of `fastgpt serve` against `transformers serve --continuous-batching` with a Llama of the same shape.

    python benchmarks/bench.py serve --preset small --requests 64 --concurrency 8            # CPU
    python benchmarks/bench.py serve --preset 1b --device cuda --dtype bfloat16 --compile \\
        --requests 2000 --concurrency 256 --rows 256                                        # GPU

Both servers run as subprocesses on 127.0.0.1 and load random-weight models of the preset's shape with the shipped
tokenizer, saved to a temporary folder (`transformers serve` loads the local Llama folder: nothing is downloaded).
One client (httpx, asyncio) sends each server the same `--requests` streaming completions, `--concurrency` at a
time (a closed loop), each a `--prompt-tokens`-token excerpt of the shipped corpus with `--reply-tokens` tokens
asked, greedy. A warm-up request per server goes first (Transformers' continuous batching sizes its cache on its
first request). Each server gets `--time-limit` seconds; requests unfinished by then are counted as not done.
Printed per server: requests done, requests/s over the wall time, p50 / p99 of the time to the first text chunk
(TTFT) and of the end-to-end latency, and the mean reply tokens (the servers' own `usage` counts).
"""

import argparse
import asyncio
import json
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

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM
from fastgpt_hf.data import CORPUS_FILES, load_tokenizer
from fastgpt_hf.presets import PRESETS
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
    return {"ttft": (first or time.perf_counter()) - started, "e2e": time.perf_counter() - started, "tokens": tokens}


async def load_test(base_url: str, prompts: list[str], concurrency: int, reply_tokens: int, limit: float) -> dict:
    async with httpx.AsyncClient(base_url=base_url, timeout=limit) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        await one_request(http, model, prompts[0], reply_tokens)  # warm-up
        pending, results = list(prompts), []

        async def worker() -> None:
            while pending:
                results.append(await one_request(http, model, pending.pop(), reply_tokens))

        started = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), limit)
        except asyncio.TimeoutError:
            pass
        return {"results": results, "seconds": time.perf_counter() - started}


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


def run(args: argparse.Namespace) -> None:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailable("--device cuda: this machine has no CUDA device; --device cpu runs it on the CPU.")
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
        fastgpt_options += ["--device", args.device, "--dtype", args.dtype] + (["--compile"] if args.compile else [])
        transformers_cli = str(Path(sys.executable).parent / "transformers")
        servers = {
            f"FastGPT (fastgpt serve, {args.rows} rows)": [
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
                measured = asyncio.run(
                    load_test(base_url, prompts, args.concurrency, args.reply_tokens, args.time_limit)
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
