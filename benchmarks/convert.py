"""A source model against its FastGPT conversions, same run: WikiText-2 perplexity per word at a long context, pass-key
retrieval with the needle beyond every window, decode speed and cache bytes at a long context, and greedy chat
answers side by side.

    python benchmarks/bench.py convert SOURCE converted=FOLDER uptrained=FOLDER \
        [--text /work/shared/data/wikitext-2/test.txt --max-chars 12000 --windows 2048] \
        [--passkey-length 2048 --distances 1536 2000 --trials 2] [--device cuda]

SOURCE is what `fastgpt convert` read (a folder or .gguf file); each NAME=FOLDER a FastGPT checkpoint. The text is cut
to `--max-chars` characters (a bounded slice: every window is a full forward pass); perplexity is
`data.evaluate_perplexity`'s strided method, per WikiText word, once per `--windows` context length with a stride of
half of it (every scored token sees at least half a window of context). Pass-key figures are the share of `--trials`
random keys (drawn with `--passkey-seed`) retrieved (`passkey.passkey_accuracy`) at each needle distance. Decode: ms per
token of batch 1 after a `--decode-context`-token prompt through `generate()` with no cache argument (each model's
default: FastGPT's compiled static cache on CUDA, the source's eager dynamic cache), and for the source also its
compiled static cache (`cache_implementation="static"`, its fastest at batch 1), (time of 65 new tokens - time of 2) /
63, the faster of two calls after a first one whose seconds (compilation included) are printed beside; the cache bytes
are what each model holds after that context (bf16 keys and values as the model's dtype).
"""

import argparse
import time
from pathlib import Path

import floors
import torch
from timing import first_call_seconds, times_ms
from transformers import AutoModelForCausalLM, GenerationConfig

import fastgpt_hf  # noqa: F401  (registers FastGPT with the Auto classes)
from fastgpt_hf.conversion import load_source
from fastgpt_hf.data import evaluate_perplexity
from fastgpt_hf.passkey import passkey_accuracy

CHAT_PROMPTS = ("What is the capital of France?", "Give me three tips for staying healthy.")
DECODE_TOKENS = 65
BASELINE_TOKENS = 2  # the prefill and the first decode step (the one that may record CUDA graphs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source")
    parser.add_argument("checkpoints", nargs="*", metavar="NAME=FOLDER")
    parser.add_argument("--text", default="/work/shared/data/wikitext-2/test.txt")
    parser.add_argument("--max-chars", type=int, default=12000)
    parser.add_argument("--windows", type=int, nargs="+", default=[2048], help="context lengths of the perplexity")
    parser.add_argument("--passkey-length", type=int, default=2048)
    parser.add_argument("--distances", type=int, nargs="+", default=[1536, 2000])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--passkey-seed", type=int, default=0, help="seed of the pass-key samples' keys")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens of each chat answer")
    parser.add_argument("--decode-context", type=int, default=8192, help="prompt tokens of the decode figure (0: none)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: bfloat16 on CUDA, else float32")


def decode_ms_per_token(model, prompt: torch.Tensor, cache_implementation: str | None) -> tuple[float, float]:
    """Batch-1 greedy decode after `prompt` (module docstring): ms per token, and the first call's seconds."""
    options = {} if cache_implementation is None else {"max_cache_len": prompt.shape[1] + DECODE_TOKENS}

    def call(new_tokens: int):
        config = GenerationConfig(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            cache_implementation=cache_implementation,
            **options,
        )
        return lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)

    first_s = first_call_seconds(call(DECODE_TOKENS), prompt.device)
    full = min(times_ms(call(DECODE_TOKENS), prompt.device, repeats=2))
    baseline = min(times_ms(call(BASELINE_TOKENS), prompt.device, repeats=2))
    return (full - baseline) / (DECODE_TOKENS - BASELINE_TOKENS), first_s


def cache_bytes_after(model, context: int) -> int:
    """Bytes a model's cache holds after `context` positions, batch 1, in the model's dtype."""
    if isinstance(model.config, fastgpt_hf.FastGPTConfig):
        return floors.fastgpt_cache_bytes(model.config, context, model.dtype)
    return floors.llama_cache_bytes(model.config, context, model.dtype)


def decode_rows(models: dict, tokenizer, text: str, context: int, device: str) -> list[str]:
    """The decode table's rows (module docstring), printed as each figure is known."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    prompt = ids.repeat(1, -(-context // ids.shape[1]))[:, :context].to(device)
    rows = []
    for name, model in models.items():
        settings = [None] + (["static"] if name == "source" else [])
        for setting in settings:
            with torch.no_grad():
                ms, first_s = decode_ms_per_token(model, prompt, setting)
            label = "default" if setting is None else setting
            mib = cache_bytes_after(model, context) / 2**20
            print(f"{name} decode ({label}) 1 x {context}: {ms:.2f} ms/token, first call {first_s:.1f} s", flush=True)
            rows.append(f"| {name} | {label} | {ms:.2f} | {1e3 / ms:.0f} | {first_s:.1f} | {mib:.3f} |")
    return rows


def run(args: argparse.Namespace) -> None:
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    source, tokenizer = load_source(args.source, dtype)
    models = {"source": source.to(args.device)}
    for entry in args.checkpoints:
        name, _, folder = entry.partition("=")
        models[name] = AutoModelForCausalLM.from_pretrained(Path(folder), dtype=dtype).to(args.device).eval()
    text = Path(args.text).read_text(encoding="utf-8")[: args.max_chars]
    rows, answers = [], {prompt: {} for prompt in CHAT_PROMPTS}
    for name, model in models.items():
        start = time.perf_counter()
        with torch.no_grad():
            perplexities = [evaluate_perplexity(model, tokenizer, text, window, window // 2) for window in args.windows]
            retrieval = [
                passkey_accuracy(model, tokenizer, args.passkey_length, distance, args.trials, args.passkey_seed)
                for distance in args.distances
            ]
            for prompt in CHAT_PROMPTS:
                messages = [{"role": "user", "content": prompt}]
                inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
                inputs = inputs.to(args.device)
                # Eager: on CUDA FastGPT's generate() would compile its decode step first (most of a minute), and
                # these few answers are compared for their words, not timed.
                output = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False, disable_compile=True)
                answers[prompt][name] = tokenizer.decode(
                    output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
                )
        seconds = time.perf_counter() - start
        per_word = [perplexity.per_word for perplexity in perplexities]
        rows.append((name, per_word, retrieval, perplexities[0].tokens))
        print(f"{name}: per-word perplexity {per_word}, pass-key {retrieval}, {seconds:.0f} s", flush=True)
    windows = " | ".join(f"perplexity per word, {window} window" for window in args.windows)
    distances = " | ".join(f"pass-key at {distance}" for distance in args.distances)
    print(f"\n| model | {windows} | {distances} |")
    print("| --- |" + " ---: |" * (len(args.windows) + len(args.distances)))
    for name, per_word, retrieval, _ in rows:
        perplexities = " | ".join(f"{value:.2f}" for value in per_word)
        shares = " | ".join(f"{share * args.trials:.0f}/{args.trials}" for share in retrieval)
        print(f"| {name} | {perplexities} | {shares} |")
    print(f"\n({rows[0][3]} tokens scored, {len(text)} characters of {args.text}; {args.device}, {dtype})")
    if args.decode_context:
        table = decode_rows(models, tokenizer, text, args.decode_context, args.device)
        context = args.decode_context
        print(f"\n| model | decode setting | ms/token at 1 x {context} | tokens/s | first call s | cache MiB |")
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        print("\n".join(table))
    for prompt, by_model in answers.items():
        print(f"\n**{prompt}**\n")
        for name, answer in by_model.items():
            print(f"- {name}: {' '.join(answer.split())}")
