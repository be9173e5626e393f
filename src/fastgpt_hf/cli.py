"""The `fastgpt` console script; `DESCRIPTION` lists its commands.

`train`, `eval`, `generate`, `bench`, `info` and `export` live here; `quantize` dispatches to
`fastgpt_hf.quantization`, `card` and `push` to `fastgpt_hf.model_card`, `serve` to `fastgpt_hf.serving_http`,
`convert` to `fastgpt_hf.conversion` and `uptrain` to `fastgpt_hf.uptraining`. Every subcommand explains itself with
`--help`; a missing file, an unknown preset or a bad value ends with one `fastgpt <command>: error: ...` line and exit
status 2, not a traceback; Ctrl-C ends with exit status 130 (`train` first saves a checkpoint to resume from).
"""

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when a command runs: `fastgpt --help` stays fast
    from transformers import Trainer, TrainingArguments

COMMANDS = (
    "train",
    "eval",
    "generate",
    "bench",
    "info",
    "quantize",
    "export",
    "card",
    "push",
    "serve",
    "convert",
    "uptrain",
)
DESCRIPTION = """FastGPT: train, evaluate, sample from and benchmark FastGPT causal LMs.

commands:
  train      train a model from a preset on local text (default: the shipped WikiText-2 excerpt)
  eval       strided perplexity of a checkpoint on a text file, per token and per WikiText word
  generate   continue a prompt with a checkpoint (or an exported .pte file)
  bench      generation speed and cache size at several prompt lengths, FastGPT beside Llama
  info       a preset's or checkpoint's layers, their attention sparsity and its parameters (no weights)
  quantize   write an int8 copy of a checkpoint (fastgpt_hf.quantization)
  export     write a checkpoint as an ExecuTorch .pte file for phones (fastgpt_hf.export_executorch)
  card       write a model card for a checkpoint (fastgpt_hf.model_card)
  push       upload a checkpoint to the Hugging Face Hub (fastgpt_hf.model_card)
  serve      an OpenAI-compatible server with continuous batching (fastgpt_hf.serving_http)
  convert    turn a Llama, Mistral, Qwen2 or SmolLM checkpoint or GGUF file into a FastGPT (fastgpt_hf.conversion)
  uptrain    distil the source into its converted FastGPT (fastgpt_hf.uptraining)

Run `fastgpt COMMAND --help` for a command's options."""


def parse_override(text: str) -> tuple[str, object]:
    """`key=value` with a JSON value (`layer_types=["local","global"]`, `hidden_size=128`) or a plain string."""
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (counts, sizes and steps)."""
    return integer_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0 (counts where 0 turns a feature off)."""
    return integer_at_least(text, 0, "an integer >= 0")


def integer_at_least(text: str, minimum: int, description: str) -> int:
    """`text` as an int of at least `minimum`, or an argparse error saying it must be `description`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {description}, got {value}")
    return value


def existing_checkpoint(parser: argparse.ArgumentParser, path: str) -> Path:
    """`path` as a folder holding `config.json`, or a parser error saying what is missing."""
    if not Path(path, "config.json").is_file():
        parser.error(f"{path} is not a checkpoint folder (no config.json); pass a folder written by `fastgpt train`")
    return Path(path)


def existing_file(parser: argparse.ArgumentParser, path: str | None) -> str | None:
    """`path` unchanged when it is None or a file, else a parser error."""
    if path is not None and not Path(path).is_file():
        parser.error(f"file not found: {path}")
    return path


def train_parser() -> argparse.ArgumentParser:
    from .presets import PRESETS

    parser = argparse.ArgumentParser(
        prog="fastgpt train",
        description="Train a FastGPT from a preset with transformers.Trainer on local text files, then save the "
        "final model and tokenizer to OUTPUT. Defaults: the shipped tokenizer and WikiText-2 excerpt.",
    )
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS), help="model size (default: small)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        type=parse_override,
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, JSON values allowed: --set hidden_size=256 --set 'layer_types=[\"local\"]'",
    )
    parser.add_argument(
        "--output",
        default="runs/train",
        help="folder for checkpoints and the final model; one that holds files needs --overwrite or --resume",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace what OUTPUT holds (once the data is read) with this run"
    )
    parser.add_argument("--train-file", help="training text (default: the shipped WikiText-2 train excerpt)")
    parser.add_argument("--valid-file", help="validation text (default: the shipped WikiText-2 valid excerpt)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the shipped byte-level BPE)")
    parser.add_argument("--block-size", type=positive_int, default=256, help="tokens per training block")
    parser.add_argument("--max-steps", type=positive_int, default=200, help="optimizer steps")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="blocks per device batch")
    parser.add_argument("--grad-accum", type=positive_int, default=1, help="batches accumulated per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine decay)")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--eval-steps", type=positive_int, help="evaluate every N steps (default: only at the end)")
    parser.add_argument("--eval-blocks", type=positive_int, default=64, help="validation blocks per evaluation")
    parser.add_argument("--save-steps", type=positive_int, help="write a checkpoint-N folder every N steps")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument(
        "--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="auto: bf16/fp16 on CUDA"
    )
    parser.add_argument(
        "--attn-implementation", default="sdpa", choices=["sdpa", "eager", "flex_attention"], help="backend"
    )
    parser.add_argument(
        "--resume",
        help="checkpoint-N folder to resume from, or 'last' for the newest complete one in OUTPUT (after Ctrl-C)",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser


def train_main(argv: list[str] | None = None) -> None:
    """`fastgpt train`: Trainer run from a preset; prints the final validation loss and perplexity.

    Refuses, before reading data, an OUTPUT that holds files (without `--overwrite` or `--resume`), an OUTPUT that
    holds an input, one being written by another process and a bad `--set`; Ctrl-C saves a checkpoint, exit 130.
    """
    parser = train_parser()
    args = parser.parse_args(argv)
    for path in (args.train_file, args.valid_file):
        existing_file(parser, path)
    if args.overwrite and args.resume == "last":
        parser.error("--overwrite replaces OUTPUT's run and --resume last continues it; pass one of them")
    from .output_folders import refuse_unwritable, writer_lock

    output = Path(args.output)
    refuse_unwritable(output, train_sources(args))
    with writer_lock(output):
        run_training(args, output, resume_checkpoint(args, output))


def train_sources(args: argparse.Namespace) -> list[Path]:
    """The paths `fastgpt train` reads that writing OUTPUT must not destroy; with --overwrite, the checkpoint too."""
    sources = [Path(path) for path in (args.tokenizer, args.train_file, args.valid_file) if path is not None]
    if args.overwrite and args.resume is not None:
        sources.append(Path(args.resume))
    return sources


def resume_checkpoint(args: argparse.Namespace, output: Path) -> Path | None:
    """The checkpoint `--resume` names (None without it); refuses an occupied OUTPUT without --resume or --overwrite."""
    from .output_folders import refuse_occupied
    from .training import checkpoint_problem, last_complete_checkpoint

    if args.resume is None:
        if not args.overwrite:
            remedy = "pass --overwrite to replace them, --resume last to continue that run, or another --output"
            refuse_occupied(output, remedy)
        return None
    if args.resume == "last":
        checkpoint = last_complete_checkpoint(output) if output.is_dir() else None
        if checkpoint is None:
            raise ValueError(f"{output} holds no complete checkpoint-N folder to resume from; train without --resume.")
        return checkpoint
    checkpoint = Path(args.resume)
    problem = checkpoint_problem(checkpoint) if checkpoint.is_dir() else "not a folder"
    if problem is not None:
        raise ValueError(f"cannot resume from {checkpoint} ({problem}); pass a complete checkpoint-N folder or 'last'.")
    return checkpoint


def run_training(args: argparse.Namespace, output: Path, resume: Path | None) -> None:
    """Check the config, read the data, train into `output` (emptied first with --overwrite), evaluate and save."""
    from .data import CORPUS_FILES, load_tokenizer, packed_datasets
    from .output_folders import replace_with_empty_folder
    from .training import causal_lm_trainer, config_for_tokenizer, initialised_model, save_final_model

    tokenizer = load_tokenizer(args.tokenizer)
    overrides = {"attn_implementation": args.attn_implementation, **dict(args.overrides)}
    config = config_for_tokenizer(args.preset, tokenizer, **overrides)
    files = {
        "train": args.train_file or CORPUS_FILES["train"],
        "validation": args.valid_file or CORPUS_FILES["validation"],
    }
    datasets = packed_datasets(tokenizer, args.block_size, files)
    if args.overwrite:
        replace_with_empty_folder(output)
    validation = datasets["validation"].select(range(min(args.eval_blocks, len(datasets["validation"]))))
    model = initialised_model(config, seed=args.seed)
    trainer = causal_lm_trainer(model, cli_training_arguments(args), datasets["train"], validation, tokenizer)
    train_or_exit_on_ctrl_c(trainer, resume, output)
    metrics = trainer.evaluate()
    save_final_model(trainer, tokenizer, output)
    print(f"eval_loss {metrics['eval_loss']:.4f}  eval_perplexity {metrics['eval_perplexity']:.2f}  -> {args.output}")


def cli_training_arguments(args: argparse.Namespace) -> "TrainingArguments":
    """`training.training_arguments` from `fastgpt train`'s options."""
    from .training import training_arguments

    return training_arguments(
        args.output,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        eval_steps=args.eval_steps,
        save_steps=args.save_steps,
        logging_steps=max(1, min(10, args.max_steps // 10)),
        gradient_checkpointing=args.gradient_checkpointing,
        precision=args.precision,
        seed=args.seed,
    )


def train_or_exit_on_ctrl_c(trainer: "Trainer", resume: Path | None, output: Path) -> None:
    """Train; after a Ctrl-C, say where its checkpoint is and exit with status 130 (128 + SIGINT)."""
    from .training import checkpoint_folder, train_interruptibly

    stopped_at = train_interruptibly(trainer, resume)
    if stopped_at is not None:
        checkpoint = checkpoint_folder(output, stopped_at)
        print(
            f"fastgpt train: interrupted at step {stopped_at}; checkpoint saved to {checkpoint}; continue with "
            "--resume last",
            file=sys.stderr,
        )
        raise SystemExit(130)


def eval_main(argv: list[str] | None = None) -> None:
    """`fastgpt eval CHECKPOINT`: strided perplexity per token and per word."""
    parser = argparse.ArgumentParser(
        prog="fastgpt eval",
        description="Perplexity of a checkpoint on a text file by the strided sliding-window method: windows of "
        "--window tokens every --stride tokens, each token scored once. Reported per token of the tokenizer and per "
        "WikiText word (whitespace-split tokens plus one <eos> per line), comparable with published WikiText-2 "
        "word-level numbers.",
    )
    parser.add_argument("checkpoint", help="checkpoint folder (save_pretrained output; its tokenizer if it has one)")
    parser.add_argument("--file", help="text to evaluate (default: the shipped WikiText-2 valid excerpt)")
    parser.add_argument(
        "--window", type=positive_int, default=256, help="tokens per window (at most the trained context)"
    )
    parser.add_argument(
        "--stride", type=positive_int, help="tokens between window starts, at most --window (default: half)"
    )
    parser.add_argument("--max-chars", type=positive_int, help="evaluate only the first N characters of the file")
    parser.add_argument(
        "--json", metavar="PATH", help="also write the results as EvalResult fields, for `fastgpt card --results`"
    )
    args = parser.parse_args(argv)
    checkpoint = existing_checkpoint(parser, args.checkpoint)
    existing_file(parser, args.file)
    from .data import CORPUS_FILES, evaluate_perplexity

    model, tokenizer = load_checkpoint(checkpoint)
    text = Path(args.file or CORPUS_FILES["validation"]).read_text(encoding="utf-8")[: args.max_chars]
    stride = args.stride or max(1, args.window // 2)
    result = evaluate_perplexity(model, tokenizer, text, args.window, stride, show_progress=True)
    print(
        f"perplexity per token {result.per_token:.2f} ({result.tokens} tokens), "
        f"per word {result.per_word:.2f} ({result.words} words)"
    )
    if args.json:
        from .model_card import perplexity_results, text_dataset, write_results

        dataset = text_dataset(args.file, args.max_chars)
        write_results(args.json, perplexity_results(result, dataset, args.window, stride))


def generate_main(argv: list[str] | None = None) -> None:
    """`fastgpt generate CHECKPOINT --prompt TEXT`: print the prompt and its continuation."""
    parser = argparse.ArgumentParser(
        prog="fastgpt generate",
        description="Continue a prompt with a checkpoint through model.generate (greedy unless --sample).",
    )
    parser.add_argument(
        "checkpoint", help="checkpoint folder (save_pretrained output), or a .pte file written by `fastgpt export`"
    )
    parser.add_argument(
        "--tokenizer",
        help="with a .pte: the tokenizer's folder, e.g. the exported checkpoint (default: the shipped one)",
    )
    parser.add_argument("--prompt", default=" = Robert Boulter = \n", help="text to continue")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.8, help="with --sample")
    parser.add_argument("--top-k", type=positive_int, default=50, help="with --sample")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.checkpoint.endswith(".pte"):
        generate_from_pte(parser, args)
        return
    checkpoint = existing_checkpoint(parser, args.checkpoint)
    import torch

    model, tokenizer = load_checkpoint(checkpoint)
    torch.manual_seed(args.seed)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    sampling = {"do_sample": True, "temperature": args.temperature, "top_k": args.top_k} if args.sample else {}
    output = model.generate(
        **inputs, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
    )
    print(tokenizer.decode(output[0], skip_special_tokens=True))


def generate_from_pte(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`fastgpt generate OUT.pte --tokenizer CHECKPOINT`: the prompt and its continuation, streamed as the
    ExecuTorch runtime decodes each token (`run_executorch`)."""
    existing_file(parser, args.checkpoint)
    import torch
    from transformers import TextStreamer

    from .data import load_tokenizer
    from .run_executorch import PteLanguageModel, generate_tokens

    tokenizer = load_tokenizer(args.tokenizer)
    model = PteLanguageModel(args.checkpoint)
    if len(tokenizer) > model.vocab_size:
        raise ValueError(
            f"{args.checkpoint} has a vocabulary of {model.vocab_size} tokens but the tokenizer has {len(tokenizer)}; "
            "pass the tokenizer of the exported checkpoint with --tokenizer."
        )
    prompt = tokenizer(args.prompt, return_tensors="pt").input_ids[0]
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    streamer.put(prompt)
    tokens = generate_tokens(
        model,
        prompt,
        args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        eos_token_id=tokenizer.eos_token_id,
        generator=torch.Generator().manual_seed(args.seed),
    )
    for token in tokens:
        streamer.put(torch.tensor([token]))
    streamer.end()


def export_main(argv: list[str] | None = None) -> None:
    """`fastgpt export CHECKPOINT OUT.pte`: the model and its bounded cache as an ExecuTorch program (XNNPACK)."""
    from .export_executorch import DEFAULT_MAX_CACHE_LEN, DEFAULT_PREFILL_CHUNK, QUANTIZATIONS

    parser = argparse.ArgumentParser(
        prog="fastgpt export",
        description="Export a float FastGPT checkpoint with its static cache (prefill, decode and reset methods) to "
        "an ExecuTorch .pte file lowered to XNNPACK; run it with `fastgpt generate OUT.pte --tokenizer CHECKPOINT`. "
        "Needs `pip install 'fastgpt_hf[edge]'`.",
    )
    parser.add_argument("checkpoint", help="float checkpoint folder (save_pretrained output)")
    parser.add_argument("output", help="the .pte file to write")
    parser.add_argument(
        "--quantize", choices=QUANTIZATIONS, default="none", help="int8-dynamic: int8 weights and activations"
    )
    parser.add_argument(
        "--max-cache-len", type=positive_int, default=DEFAULT_MAX_CACHE_LEN, help="longest prompt + new tokens"
    )
    parser.add_argument(
        "--prefill-chunk", type=positive_int, default=DEFAULT_PREFILL_CHUNK, help="prompt tokens per prefill call"
    )
    args = parser.parse_args(argv)
    checkpoint = existing_checkpoint(parser, args.checkpoint)
    if not args.output.endswith(".pte"):
        parser.error(f"the output must be a .pte file, got {args.output}")
    from .export_executorch import export_checkpoint

    path = export_checkpoint(checkpoint, args.output, args.quantize, args.max_cache_len, args.prefill_chunk)
    print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB ({args.quantize}, max cache {args.max_cache_len} tokens)")


def bench_main(argv: list[str] | None = None) -> None:
    """`fastgpt bench`: decode speed and cache size by prompt length, FastGPT and a Llama of the same shape."""
    from .presets import PRESETS

    parser = argparse.ArgumentParser(
        prog="fastgpt bench",
        description="Greedy generation from random prompts of several lengths (batch 1, default dynamic cache): "
        "seconds to the first token, decode tokens/s and cache MiB, for FastGPT and a LlamaForCausalLM of the "
        "same shape with random weights. Wall-clock figures: run on an idle machine.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="FastGPT checkpoint folder to benchmark")
    source.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="random-weight preset (default)")
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[256, 1024, 4096], help="prompt lengths")
    parser.add_argument("--new-tokens", type=positive_int, default=32, help="tokens generated per measurement")
    parser.add_argument("--no-llama", action="store_true", help="skip the Llama peer")
    parser.add_argument(
        "--json", metavar="PATH", help="also write FastGPT's figures as EvalResult fields, for `fastgpt card --results`"
    )
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from .benchmarking import generation_speed
    from .configuration_fastgpt import FastGPTConfig
    from .quantization import load_checkpoint_model
    from .training import llama_peer

    if args.checkpoint:
        model = load_checkpoint_model(existing_checkpoint(parser, args.checkpoint))
    else:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(FastGPTConfig.from_preset(args.preset))
    models = {"FastGPT": model} if args.no_llama else {"FastGPT": model, "Llama": llama_peer(model.config)}
    print(f"{'model':>8} {'prompt':>7} {'first token s':>14} {'decode tok/s':>13} {'cache MiB':>10}")
    speeds = {name: [] for name in models}
    for name, candidate in models.items():
        for length in args.lengths:
            speed = generation_speed(candidate, length, args.new_tokens)
            speeds[name].append(speed)
            print(
                f"{name:>8} {length:>7} {speed.prefill_seconds:>14.3f} {speed.decode_tokens_per_second:>13.1f} "
                f"{speed.cache_mib:>10.2f}",
                flush=True,
            )
    if args.json:
        from .model_card import speed_results, write_results

        write_results(args.json, speed_results(speeds["FastGPT"], args.new_tokens, str(model.device)))


def info_main(argv: list[str] | None = None) -> None:
    """`fastgpt info`: the layers of a preset or checkpoint, the share of the score matrix each skips, and the
    parameters beside a Llama of the same shape; both models are built on the meta device (no weights)."""
    from .presets import PRESETS

    parser = argparse.ArgumentParser(
        prog="fastgpt info",
        description="Print each layer of a preset or checkpoint (attention type, window, memory slots, block size) "
        "with the fraction of the n x n score matrix it skips at --length tokens (model.attention_sparsity), then "
        "the parameter count of FastGPT and of a LlamaForCausalLM of the same shape. No weights are made or read.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="FastGPT checkpoint folder (its config.json)")
    source.add_argument("--preset", choices=sorted(PRESETS), default="small", help="preset (default: small)")
    parser.add_argument("--length", type=positive_int, default=4096, help="sequence length n (default: 4096)")
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    from .configuration_fastgpt import GLOBAL_BRANCH_TYPES, FastGPTConfig
    from .modeling_fastgpt import FastGPTForCausalLM
    from .training import llama_config

    if args.checkpoint:
        config = AutoConfig.from_pretrained(existing_checkpoint(parser, args.checkpoint))
    else:
        config = FastGPTConfig.from_preset(args.preset)
    with torch.device("meta"):
        model, llama = FastGPTForCausalLM(config), LlamaForCausalLM(llama_config(config))
    print(
        f"{args.checkpoint or args.preset}: {config.num_hidden_layers} layers of width {config.hidden_size}, "
        f"{config.num_attention_heads} query / {config.num_key_value_heads} key-value heads, "
        f"vocabulary {config.vocab_size:,}"
    )
    print(f"{'layer':>5}  {'type':<19} {'window':>6} {'memory slots':>12} {'block':>5}  skips at {args.length:,}")
    sparsity = model.attention_sparsity(args.length)
    for layer, (kind, skipped) in enumerate(zip(config.layer_types, sparsity, strict=True)):
        window = config.attention_window(kind) or "-"
        slots, block = (
            (config.num_memory_tokens, config.compress_block_size) if kind in GLOBAL_BRANCH_TYPES else ("-", "-")
        )
        print(f"{layer:>5}  {kind:<19} {window:>6} {slots:>12} {block:>5}  {skipped:.1%}")
    print(f"parameters: FastGPT {model.num_parameters():,}, Llama of the same shape {llama.num_parameters():,}")


def load_checkpoint(checkpoint: Path):
    """Model (eval mode; float or dynamic-range int8) and tokenizer of a checkpoint folder; the shipped tokenizer
    when it has none."""
    from .data import load_tokenizer
    from .quantization import load_checkpoint_model

    has_tokenizer = (checkpoint / "tokenizer.json").is_file()
    model = load_checkpoint_model(checkpoint).eval()
    tokenizer = load_tokenizer(checkpoint if has_tokenizer else None)
    vocab_size = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab_size:
        source = "its tokenizer" if has_tokenizer else "the shipped tokenizer (the folder has no tokenizer.json)"
        raise ValueError(
            f"{checkpoint} has a vocabulary of {vocab_size} tokens but {source} has {len(tokenizer)}; save the "
            "tokenizer the model was trained with beside it (tokenizer.save_pretrained)."
        )
    return model, tokenizer


def delegated(module: str, function: str) -> Callable[[list[str]], None]:
    """A subcommand implemented elsewhere in the package, imported only when it runs."""

    def run(argv: list[str]) -> None:
        import importlib

        try:
            implementation = importlib.import_module(f"fastgpt_hf.{module}")
        except ModuleNotFoundError as error:
            if error.name != f"fastgpt_hf.{module}":
                raise
            raise ValueError(f"this installation of fastgpt_hf has no {module} module; update the package") from None
        getattr(implementation, function)(argv)

    return run


SUBCOMMANDS: dict[str, Callable[[list[str]], None]] = {
    "train": train_main,
    "eval": eval_main,
    "generate": generate_main,
    "bench": bench_main,
    "info": info_main,
    "quantize": delegated("quantization", "quantize_main"),
    "export": export_main,
    "card": delegated("model_card", "card_main"),
    "push": delegated("model_card", "push_main"),
    "serve": delegated("serving_http", "serve_main"),
    "convert": delegated("conversion", "convert_main"),
    "uptrain": delegated("uptraining", "uptrain_main"),
}


def main(argv: list[str] | None = None) -> None:
    """`fastgpt COMMAND [options]`; the installed script enters through `fastgpt_console.main`, which first hides
    the dependencies' known import-time log lines (the package's `__init__` does so for `python -m fastgpt_hf.cli`)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="fastgpt", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=COMMANDS, help="what to do")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        raise SystemExit(0 if argv else 2)
    command = parser.parse_args(argv[:1]).command
    try:
        SUBCOMMANDS[command](argv[1:])
    except ValueError as error:
        print(f"fastgpt {command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"fastgpt {command}: aborted by Ctrl-C", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
