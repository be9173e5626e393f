"""Text in, token blocks and perplexities out: the shipped tokenizer and corpus, `datasets` pipelines, evaluation.

- The tokenizer (`tokenizer/`) is a byte-level BPE with 16,384 entries (the `small` preset's vocabulary),
  trained with `train_tokenizer` on WikiText-2's train split (WikiText-103 was not available); `<|endoftext|>`
  is its BOS and EOS token and `<|pad|>` its padding token. Byte-level with no normalisation, so
  `decode(encode(text)) == text` for any text. It pads on the left, as every tokenizer `train_tokenizer` saves
  and `load_tokenizer` returns does: a causal LM continues the last position of each row, so
  `model.generate(**tokenizer(prompts, padding=True))` gives each prompt the tokens it gets alone.
- The corpus (`corpus/`) is a WikiText-2 excerpt (see its README for the source and the CC BY-SA licence).
- Perplexity of long text is the strided sliding-window method of Transformers' documentation: windows of
  `window` tokens every `stride` tokens, each token scored once, with at least `window - stride` tokens of
  context once the text is that long.
  It is reported per token of our tokenizer and per WikiText word. WikiText's convention counts words as the
  whitespace-split tokens (`<unk>` included) plus one `<eos>` per line, which gives the published counts
  (217,646 for the validation split), so per-word perplexity = exp(total NLL / words) compares with published
  word-level WikiText-2 results.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict, load_dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PACKAGE_DIR = Path(__file__).parent
TOKENIZER_DIR = PACKAGE_DIR / "tokenizer"
CORPUS_DIR = PACKAGE_DIR / "corpus"
CORPUS_FILES = {
    "train": CORPUS_DIR / "wikitext2_train_excerpt.txt",
    "validation": CORPUS_DIR / "wikitext2_valid_excerpt.txt",
}
VOCAB_SIZE = 16384
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_tokenizer(
    files: list[str | Path], output_dir: str | Path, vocab_size: int = VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on text `files`, save it to `output_dir` for `AutoTokenizer`, and return it.

    It pads on the left (saved in its tokenizer_config.json), for batched generation.
    """
    missing = [str(path) for path in files if not Path(path).is_file()]
    if missing:
        raise ValueError(f"Tokenizer training files not found: {missing}; pass existing text files.")
    bpe = Tokenizer(models.BPE())
    # No prefix space and no normalisation: the byte-level pieces reproduce any text exactly.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train([str(path) for path in files], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, padding_side="left"
    )
    tokenizer.save_pretrained(output_dir)
    return tokenizer


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer saved in `path` (a checkpoint or tokenizer folder); the shipped one when None.

    It pads on the left whatever the folder says (earlier versions of this package saved right-padding tokenizers),
    so that padded batches generate as their prompts do alone; `save_pretrained` keeps that setting.
    """
    folder = Path(path) if path is not None else TOKENIZER_DIR
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise ValueError(f"No tokenizer in {folder}; pass a folder saved with save_pretrained.")
    return AutoTokenizer.from_pretrained(folder, padding_side="left")


def load_text_dataset(files: dict[str, str | Path] | None = None) -> DatasetDict:
    """A `DatasetDict` of line records (`text`, newline kept) from local text files; the shipped excerpt if None."""
    files = {split: str(path) for split, path in (files or CORPUS_FILES).items()}
    missing = [path for path in files.values() if not Path(path).is_file()]
    if missing:
        raise ValueError(f"Text files not found: {missing}; pass existing files.")
    # Line breaks kept: concatenating the records gives back the file, so token blocks are the text itself.
    return load_dataset("text", data_files=files, keep_linebreaks=True)


def tokenize_dataset(dataset: DatasetDict | Dataset, tokenizer: PreTrainedTokenizerBase) -> DatasetDict | Dataset:
    """Batched `map` from `text` records to `input_ids` (no special tokens: lines are pieces of one stream)."""

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return {"input_ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]}

    return dataset.map(tokenize, batched=True, remove_columns=["text"], desc="Tokenizing")


def pack_blocks(dataset: DatasetDict | Dataset, block_size: int) -> DatasetDict | Dataset:
    """Batched `map` that concatenates `input_ids` and cuts them into `block_size` blocks with `labels`.

    Each batch of 1,000 records drops its last incomplete block, as Transformers' `run_clm` does.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}.")

    def pack(batch: dict[str, list]) -> dict[str, list]:
        stream = [token for ids in batch["input_ids"] for token in ids]
        usable = len(stream) - len(stream) % block_size
        blocks = [stream[start : start + block_size] for start in range(0, usable, block_size)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}

    return dataset.map(pack, batched=True, desc=f"Packing into blocks of {block_size}")


def packed_datasets(
    tokenizer: PreTrainedTokenizerBase, block_size: int, files: dict[str, str | Path] | None = None
) -> DatasetDict:
    """`load_text_dataset`, `tokenize_dataset` and `pack_blocks` in one call: ready for `Trainer`."""
    packed = pack_blocks(tokenize_dataset(load_text_dataset(files), tokenizer), block_size)
    for split, blocks in packed.items():
        if len(blocks) == 0:
            raise ValueError(
                f"The {split} text has fewer tokens than one block of {block_size}; use a smaller block size or "
                "more text."
            )
    return packed


def count_words(text: str) -> int:
    """WikiText words: whitespace-split tokens (`<unk>` included) plus one `<eos>` per line."""
    return len(text.split()) + text.count("\n")


@torch.no_grad()
def strided_nll(
    model: PreTrainedModel, input_ids: torch.Tensor, window: int, stride: int, show_progress: bool = False
) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of the tokens of `input_ids` (`[N]` long) it scores, and their number.

    Windows of at most `window` tokens start every `stride` tokens and score only the tokens that the previous
    window did not. With `stride < window` every token after the first is scored once, with at least
    `window - stride` tokens of context. `stride == window` gives disjoint windows, each scoring all its tokens
    but the first, which has no context inside it (as in Transformers' documentation).
    """
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}.")
    device = next(model.parameters()).device
    total_length, scored_until, total_nll, scored = input_ids.shape[0], 1, 0.0, 0
    starts = range(0, max(total_length - window, 0) + stride, stride)
    for begin in tqdm(starts, desc="Perplexity windows", disable=not show_progress):
        end = min(begin + window, total_length)
        first_target = max(scored_until, begin + 1)
        logits = model(input_ids[None, begin:end].to(device)).logits[0]  # [T, vocab]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        # Logit t predicts token begin + t + 1.
        predicting = logits[first_target - begin - 1 : end - begin - 1]
        total_nll += F.cross_entropy(predicting, input_ids[first_target:end].to(device), reduction="sum").item()
        scored += end - first_target
        scored_until = end
    return total_nll, scored


@dataclass
class Perplexity:
    """Perplexity of one text: per token of our tokenizer and per WikiText word."""

    per_token: float
    per_word: float
    nll: float
    tokens: int
    words: int


def evaluate_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    window: int,
    stride: int,
    show_progress: bool = False,
) -> Perplexity:
    """Strided perplexity of `text`, read after a BOS token so that its first token is scored too."""
    input_ids = torch.tensor([tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]])
    if input_ids.shape[0] < 2 or count_words(text) == 0:
        raise ValueError("The text to evaluate has no words; give a non-empty text.")
    was_training = model.training
    model.eval()
    nll, tokens = strided_nll(model, input_ids, window, stride, show_progress)
    model.train(was_training)
    words = count_words(text)
    return Perplexity(
        per_token=math.exp(nll / tokens),
        per_word=math.exp(nll / words),
        nll=nll,
        tokens=tokens,
        words=words,
    )
