"""Retrain the shipped tokenizer: a byte-level BPE of 16,384 entries on WikiText-2's train split.

The package's `tokenizer/` was made with

    python examples/train_tokenizer.py path/to/wikitext-2/train.txt --output src/fastgpt_hf/tokenizer

on the full WikiText-2 train split (`wiki.train.tokens`, 10.8 MB; WikiText-103 was not available). Without a
file argument it trains on the package's WikiText-2 excerpt, which gives a similar but not identical vocabulary.
"""

import argparse
import time

from fastgpt_hf.data import CORPUS_FILES, VOCAB_SIZE, train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", default=[str(CORPUS_FILES["train"])], help="text files to train on")
    parser.add_argument("--output", default="runs/tokenizer", help="folder to save the tokenizer to")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help="entries, special tokens included")
    args = parser.parse_args()
    start = time.perf_counter()
    tokenizer = train_tokenizer(args.files, args.output, args.vocab_size)
    print(f"{len(tokenizer)} entries trained on {args.files} in {time.perf_counter() - start:.1f} s -> {args.output}")


if __name__ == "__main__":
    main()
