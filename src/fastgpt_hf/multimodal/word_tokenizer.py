"""A word-level tokenizer trained in memory on a small vocabulary: for tests and examples that may not download one.

Words are split on whitespace and punctuation; the special tokens are `<pad>` (id 0), `<unk>`, `<s>`, `</s>`
and the image placeholder `<image>`, in that order, so `<image>` has id 4 in every tokenizer built here.
"""

from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
IMAGE_TOKEN = "<image>"


def train_word_tokenizer(texts: Iterable[str], extra_special_tokens: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` over every word of `texts`; encodings start with `<s>`.

    `extra_special_tokens` (e.g. a video placeholder) get the ids after `<image>`.
    """
    special_tokens = [*SPECIAL_TOKENS, IMAGE_TOKEN, *extra_special_tokens]
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=special_tokens))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
    )


__all__ = ["IMAGE_TOKEN", "train_word_tokenizer"]
