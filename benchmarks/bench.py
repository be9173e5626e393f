"""FastGPT against a LlamaForCausalLM of the same shape, side by side: the one entry point of every benchmark.

    python benchmarks/bench.py SUBCOMMAND [options]        # python benchmarks/bench.py SUBCOMMAND --help

Each subcommand is the module `benchmarks/<name>.py` (`add_arguments(parser)`, `run(args)`), imported only when it
runs, so that an optional dependency one of them needs (executorch, httpx, a GPU) matters to that one alone. They
share `timing.py` (how a call is timed), `floors.py` (what the hardware allows) and `models.py` (the model pair);
none imports another subcommand. `benchmarks/RESULTS.md` holds the current figures, each with the command that
printed it, its device and its date.
"""

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "prefill": "forward pass and training step time per shape, through each cache, with FLOP floors",
    "decode": "generate() ms per token per setting with bandwidth floors; --profile kernels, --ops operators",
    "memory": "generation-state bytes per preset; cache bytes and peak memory measured at given shapes",
    "quality": "FastGPT, Llama and ablations trained alike: perplexity, MQAR and pass-key retrieval by distance",
    "quantization": "perplexity, weight bytes and CPU decode speed of every int8 scheme and QAT against float32",
    "export": "ExecuTorch .pte files on the CPU (XNNPACK): prefill and decode tokens/s, memory",
    "convert": "a source model against its FastGPT conversions: perplexity, pass-key retrieval, chat answers",
    "serve": "load test of fastgpt serve against transformers serve --continuous-batching",
    "parallel": "parity and training throughput of DDP, FSDP2, TP and PP (launch with torchrun)",
    "reference": "largest error of each attention backend against the float64 reference",
}
SKIPPED = 0  # exit status of a subcommand that cannot run on this machine (it says why)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subparsers = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    module = None
    for name, summary in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=summary, formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == chosen:
            try:
                module = importlib.import_module(name)
            except ModuleNotFoundError as error:
                if error.name.partition(".")[0] in ("fastgpt_hf", "timing", "floors", "models"):
                    raise
                print(
                    f"bench.py {name}: skipped: {error} (an optional dependency, or a module not here)", file=sys.stderr
                )
                return SKIPPED
            subparser.description = module.__doc__
            module.add_arguments(subparser)
    args = parser.parse_args(argv)
    from models import DeviceUnavailable

    try:
        module.run(args)
    except DeviceUnavailable as reason:
        print(f"bench.py {args.subcommand}: skipped: {reason}", file=sys.stderr)
        return SKIPPED
    return 0


if __name__ == "__main__":
    sys.exit(main())
