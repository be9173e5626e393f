"""FastGPT's ExecuTorch `.pte` against a same-shape Llama exported the same way, on the CPU (XNNPACK).

For each preset and dtype, both random-weight models are exported once with a static cache of
max(--contexts) + --new-tokens positions, prefill chunks of --prefill-chunk tokens, lowered to XNNPACK, and
(`int8`) quantized by `export_executorch.quantize_for_edge`. FastGPT goes through `fastgpt_hf.export_executorch`;
Llama through Transformers' own exportable static cache (`TorchExportableModuleWithStaticCache`), its `forward`
exported twice (prefill `[1, chunk]`, decode `[1, 1]`) and lowered by the same `lower_to_executorch`, so both files
run the same way: prompt chunks through `prefill`, then one token per `decode`.

Each (file, context) is measured in a fresh process: prefill tokens/s over a random prompt of `context` tokens,
decode tokens/s over --new-tokens greedy steps after it, and the process's peak resident set (which includes
Python, torch and the runtime). Cache MiB is the bytes of the file's mutable buffers. Wall-clock figures: note the
machine's load beside them.

    python benchmarks/bench.py export --presets small --contexts 512 2048 --dtypes float32 int8
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from timing import call_ms
from torch import nn
from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM
from fastgpt_hf.cache_fastgpt import FastGPTStaticCache
from fastgpt_hf.export_executorch import cache_tensors, export_model, lower_to_executorch, quantize_for_edge
from fastgpt_hf.run_executorch import load_program
from fastgpt_hf.training import llama_peer

BENCH = Path(__file__).with_name("bench.py")


class LlamaStep(nn.Module):
    """Transformers' exportable Llama (`forward(input_ids, cache_position)`) with positional inputs."""

    def __init__(self, exportable: nn.Module):
        super().__init__()
        self.exportable = exportable

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        return self.exportable(input_ids=input_ids, cache_position=cache_position)


def export_llama(model, path: Path, max_cache_len: int, prefill_chunk: int) -> int:
    """Write the Llama `.pte`; returns its cache bytes."""
    model.generation_config.cache_implementation = "static"
    step = LlamaStep(TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=max_cache_len))
    examples = {"prefill": prefill_chunk, "decode": 1}
    with torch.no_grad():
        programs = {
            method: torch.export.export(
                step, (torch.zeros(1, length, dtype=torch.long), torch.arange(length)), strict=True
            )
            for method, length in examples.items()
        }
    constants = {"get_max_cache_len": max_cache_len, "get_prefill_chunk": prefill_chunk}
    path.write_bytes(lower_to_executorch(programs, constants).buffer)
    return sum(buffer.numel() * buffer.element_size() for buffer in step.exportable.buffers())


def export_fastgpt(model, path: Path, max_cache_len: int, prefill_chunk: int) -> int:
    """Write the FastGPT `.pte` (already quantized if wanted); returns its cache bytes."""
    export_model(model, path, "none", max_cache_len, prefill_chunk)
    cache = FastGPTStaticCache(model.config, max_cache_len)
    cache.early_initialization(1, model.config.num_key_value_heads, model.config.head_dim, torch.float32, "cpu")
    return sum(tensor.numel() * tensor.element_size() for tensor in cache_tensors(cache).values())


def measure(path: str, context: int, new_tokens: int, vocab_size: int) -> dict:
    """Prefill and decode tokens/s of one file at one context, and this process's peak RSS (run in a child)."""
    program = load_program(path)
    methods = {name: program.load_method(name) for name in program.method_names if name in ("prefill", "decode")}
    chunk = int(program.load_method("get_prefill_chunk").execute([])[0])
    takes_position = program.metadata("decode").num_inputs() == 2  # Llama: (input_ids, cache_position)
    if "reset" in program.method_names:
        program.load_method("reset").execute([])

    def step(method: str, tokens: torch.Tensor, position: int) -> torch.Tensor:
        inputs = [tokens[None]]
        if takes_position:
            inputs.append(torch.arange(position, position + tokens.shape[0]))
        return methods[method].execute(inputs)[0]

    prompt = torch.randint(0, min(vocab_size, 1000), (context,), generator=torch.Generator().manual_seed(0))
    state = {}

    def prefill() -> None:
        for begin in range(0, context, chunk):
            state["logits"] = step("prefill", prompt[begin : begin + chunk], begin)

    def decode() -> None:
        token = state["logits"][0, -1].argmax()[None]
        for position in range(context, context + new_tokens):
            token = step("decode", token, position)[0, -1].argmax()[None]

    prefill_ms, decode_ms = call_ms(prefill, "cpu"), call_ms(decode, "cpu")
    return {
        "prefill_tokens_per_second": context / prefill_ms * 1e3,
        "decode_tokens_per_second": new_tokens / decode_ms * 1e3,
        "peak_rss_mib": peak_rss_mib(),
    }


def peak_rss_mib() -> float:
    """This process's peak resident set since its exec (`VmHWM`). Not `getrusage`'s `ru_maxrss`: Linux carries that
    over fork and exec, so a child reported the benchmark parent's peak, models and lowered programs included."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM line; peak memory is measured on Linux only.")


def build_models(preset: str, dtype: str):
    torch.manual_seed(0)
    fastgpt = FastGPTForCausalLM(FastGPTConfig.from_preset(preset)).eval()
    llama = llama_peer(fastgpt.config).eval()
    if dtype == "int8":
        quantize_for_edge(fastgpt)
        quantize_for_edge(llama)
    return {"FastGPT": fastgpt, "Llama": llama}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", nargs="+", default=["small"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "int8"], default=["float32", "int8"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prefill-chunk", type=int, default=128)
    parser.add_argument("--output-dir", default="runs/executorch_bench")
    parser.add_argument(
        "--measure", nargs=4, metavar=("PTE", "CONTEXT", "NEW_TOKENS", "VOCAB_SIZE"), help=argparse.SUPPRESS
    )


def run(args: argparse.Namespace) -> None:
    if args.measure:
        print(json.dumps(measure(args.measure[0], *(int(value) for value in args.measure[1:]))))
        return
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    max_cache_len = max(args.contexts) + args.new_tokens
    exporters = {"FastGPT": export_fastgpt, "Llama": export_llama}
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; cache {max_cache_len} positions")
    print(
        f"{'preset':>6} {'dtype':>7} {'model':>7} {'context':>7} {'prefill tok/s':>13} {'decode tok/s':>12} "
        f"{'peak RSS MiB':>12} {'cache MiB':>9} {'file MiB':>8}",
        flush=True,
    )
    for preset in args.presets:
        for dtype in args.dtypes:
            for name, model in build_models(preset, dtype).items():
                path = output / f"{name.lower()}-{preset}-{dtype}-{max_cache_len}.pte"
                cache_bytes = exporters[name](model, path, max_cache_len, args.prefill_chunk)
                model_vocab_size = model.config.vocab_size
                del model
                for context in args.contexts:
                    command = [sys.executable, str(BENCH), "export", "--measure", str(path), str(context)]
                    command += [str(args.new_tokens), str(model_vocab_size)]
                    child = subprocess.run(command, capture_output=True, text=True, check=True)
                    result = json.loads(child.stdout.splitlines()[-1])
                    row = {"preset": preset, "dtype": dtype, "model": name, "context": context, **result}
                    row.update(cache_mib=cache_bytes / 2**20, file_mib=path.stat().st_size / 2**20)
                    print(
                        f"{preset:>6} {dtype:>7} {name:>7} {context:>7} {row['prefill_tokens_per_second']:>13.1f} "
                        f"{row['decode_tokens_per_second']:>12.1f} {row['peak_rss_mib']:>12.0f} "
                        f"{row['cache_mib']:>9.1f} {row['file_mib']:>8.1f}  (load {os.getloadavg()[0]:.1f})",
                        flush=True,
                    )
                    with open(output / "results.jsonl", "a", encoding="utf-8") as results:
                        results.write(json.dumps(row) + "\n")
