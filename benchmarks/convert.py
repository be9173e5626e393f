"""A source model against its FastGPT conversions, same run: WikiText-2 perplexity per word at a long context, pass-key
retrieval with the needle beyond every window, and greedy chat answers side by side.

    python benchmarks/bench.py convert SOURCE converted=FOLDER uptrained=FOLDER \
        [--text /work/shared/data/wikitext-2/test.txt --max-chars 12000 --windows 2048] \
        [--passkey-length 2048 --distances 1536 2000 --trials 2] [--device cuda]

SOURCE is what `fastgpt convert` read (a folder or .gguf file); each NAME=FOLDER a FastGPT checkpoint. The text is
cut to `--max-chars` characters (a bounded slice: every window is a full forward pass); perplexity is
`data.evaluate_perplexity`'s strided method, per WikiText word, once per `--windows` context length with a stride
of half of it (every scored token sees at least half a window of context). Pass-key figures are the share of
`--trials` random keys retrieved (`passkey.passkey_accuracy`) at each needle distance.
"""

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import fastgpt_hf  # noqa: F401  (registers FastGPT with the Auto classes)
from fastgpt_hf.conversion import load_source
from fastgpt_hf.data import evaluate_perplexity
from fastgpt_hf.passkey import passkey_accuracy

CHAT_PROMPTS = ("What is the capital of France?", "Give me three tips for staying healthy.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source")
    parser.add_argument("checkpoints", nargs="*", metavar="NAME=FOLDER")
    parser.add_argument("--text", default="/work/shared/data/wikitext-2/test.txt")
    parser.add_argument("--max-chars", type=int, default=12000)
    parser.add_argument("--windows", type=int, nargs="+", default=[2048], help="context lengths of the perplexity")
    parser.add_argument("--passkey-length", type=int, default=2048)
    parser.add_argument("--distances", type=int, nargs="+", default=[1536, 2000])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args: argparse.Namespace) -> None:
    source, tokenizer = load_source(args.source)
    models = {"source": source.to(args.device)}
    for entry in args.checkpoints:
        name, _, folder = entry.partition("=")
        models[name] = AutoModelForCausalLM.from_pretrained(Path(folder)).to(args.device).eval()
    text = Path(args.text).read_text(encoding="utf-8")[: args.max_chars]
    rows, answers = [], {prompt: {} for prompt in CHAT_PROMPTS}
    for name, model in models.items():
        start = time.perf_counter()
        with torch.no_grad():
            perplexities = [evaluate_perplexity(model, tokenizer, text, window, window // 2) for window in args.windows]
            retrieval = [
                passkey_accuracy(model, tokenizer, args.passkey_length, distance, args.trials)
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
    print(f"\n({rows[0][3]} tokens scored, {len(text)} characters of {args.text}; {args.device})")
    for prompt, by_model in answers.items():
        print(f"\n**{prompt}**\n")
        for name, answer in by_model.items():
            print(f"- {name}: {' '.join(answer.split())}")
