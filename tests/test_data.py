"""The shipped tokenizer and corpus, the datasets pipeline (tokenize, pack) and strided perplexity."""

import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, pipeline

from fastgpt_hf.data import (
    CORPUS_FILES,
    TOKENIZER_DIR,
    count_words,
    evaluate_perplexity,
    load_text_dataset,
    load_tokenizer,
    pack_blocks,
    strided_nll,
    tokenize_dataset,
    train_tokenizer,
)
from fastgpt_hf.multimodal.word_tokenizer import train_word_tokenizer
from fastgpt_hf.presets import PRESETS

from .conftest import tiny_model


def test_shipped_tokenizer_is_fast_and_matches_the_small_preset():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    assert tokenizer.is_fast
    assert len(tokenizer) == PRESETS["small"]["vocab_size"] == 16384
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id != tokenizer.eos_token_id


PROMPTS_OF_THREE_LENGTHS = [" The game", " = Robert Boulter = \n Robert Boulter is an English actor", " In"]


def saved_and_reloaded(tokenizer, folder):
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def trained_and_reloaded(folder):
    train_tokenizer([CORPUS_FILES["validation"]], folder, vocab_size=300)
    return AutoTokenizer.from_pretrained(folder)


def loaded_from_a_right_padding_folder(folder):
    AutoTokenizer.from_pretrained(TOKENIZER_DIR, padding_side="right").save_pretrained(folder)
    return load_tokenizer(folder)


@pytest.mark.parametrize(
    "make_tokenizer",
    [
        pytest.param(lambda folder: AutoTokenizer.from_pretrained(TOKENIZER_DIR), id="shipped"),
        pytest.param(lambda folder: load_tokenizer(), id="load_tokenizer"),
        pytest.param(lambda folder: saved_and_reloaded(load_tokenizer(), folder), id="saved-with-a-checkpoint"),
        pytest.param(trained_and_reloaded, id="trained"),
        pytest.param(loaded_from_a_right_padding_folder, id="load_tokenizer-of-an-older-checkpoint"),
        pytest.param(lambda folder: saved_and_reloaded(train_word_tokenizer(["a b c"]), folder), id="word-level"),
    ],
)
def test_every_tokenizer_the_package_ships_or_saves_pads_on_the_left(make_tokenizer, tmp_path):
    tokenizer = make_tokenizer(tmp_path)
    padded = tokenizer(["In", "The game was"], padding=True)
    assert tokenizer.padding_side == "left"
    assert padded["input_ids"][0][0] == tokenizer.pad_token_id and padded["attention_mask"][0][0] == 0


@pytest.fixture(scope="module")
def model_for_the_shipped_tokenizer():
    """A float64 tiny model over the shipped vocabulary (pads with the shipped `<|pad|>`)."""
    pad_token_id = AutoTokenizer.from_pretrained(TOKENIZER_DIR).pad_token_id
    model = tiny_model("mixed", vocab_size=PRESETS["small"]["vocab_size"], pad_token_id=pad_token_id)
    model.generation_config.pad_token_id = pad_token_id
    return model


def test_generate_on_a_padded_batch_gives_each_prompt_its_tokens_alone(model_for_the_shipped_tokenizer):
    model, tokenizer = model_for_the_shipped_tokenizer, AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    batch = tokenizer(PROMPTS_OF_THREE_LENGTHS, padding=True, return_tensors="pt")
    generated = model.generate(**batch, max_new_tokens=8, do_sample=False)[:, batch["input_ids"].shape[1] :]
    for prompt, tokens in zip(PROMPTS_OF_THREE_LENGTHS, generated, strict=True):
        alone = tokenizer(prompt, return_tensors="pt")
        expected = model.generate(**alone, max_new_tokens=8, do_sample=False)[0, alone["input_ids"].shape[1] :]
        assert tokens.tolist() == expected.tolist(), prompt


def test_text_generation_pipeline_on_a_batch_gives_each_prompt_its_tokens_alone(model_for_the_shipped_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    generator = pipeline("text-generation", model=model_for_the_shipped_tokenizer, tokenizer=tokenizer)
    options = {"max_new_tokens": 8, "do_sample": False, "return_tensors": True}
    batched = generator(PROMPTS_OF_THREE_LENGTHS, batch_size=3, **options)
    for prompt, outputs in zip(PROMPTS_OF_THREE_LENGTHS, batched, strict=True):
        padded_row = outputs[0]["generated_token_ids"]
        first_real = next(index for index, token in enumerate(padded_row) if token != tokenizer.pad_token_id)
        assert padded_row[first_real:] == generator(prompt, **options)[0]["generated_token_ids"], prompt


def test_tokenizer_round_trips_corpus_lines():
    tokenizer = load_tokenizer()
    lines = CORPUS_FILES["validation"].read_text(encoding="utf-8").splitlines(keepends=True)[:300]
    lines.append(" Ünïcödé — 戦場のヴァルキュリア 🙂 <unk> @-@ \t tabs \n")
    for line in lines:
        assert tokenizer.decode(tokenizer(line)["input_ids"]) == line


def test_count_words_follows_wikitext_convention():
    assert count_words(" = Title = \n \n A b <unk> . \n") == (3 + 4) + 3  # words + one <eos> per line
    # The excerpt's README gives its count; the full validation split's published count uses the same rule.
    assert count_words(CORPUS_FILES["validation"].read_text(encoding="utf-8")) == 43547


def test_pack_blocks_concatenates_and_drops_the_remainder():
    dataset = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]})
    packed = pack_blocks(dataset, block_size=4)
    assert packed["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert packed["labels"] == packed["input_ids"]
    with pytest.raises(ValueError, match="block_size must be at least 2"):
        pack_blocks(dataset, block_size=1)


def test_tokenized_blocks_decode_to_the_text(tmp_path):
    text = "".join(CORPUS_FILES["train"].read_text(encoding="utf-8").splitlines(keepends=True)[:40])
    path = tmp_path / "excerpt.txt"
    path.write_text(text, encoding="utf-8")
    tokenizer = load_tokenizer()
    blocks = pack_blocks(tokenize_dataset(load_text_dataset({"train": path}), tokenizer), 64)["train"]
    decoded = tokenizer.decode([token for block in blocks["input_ids"] for token in block])
    assert len(blocks) > 10 and text.startswith(decoded)


def test_missing_text_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="Text files not found"):
        load_text_dataset({"train": tmp_path / "absent.txt"})


@pytest.fixture
def model():
    return tiny_model(stack="mixed", dtype=torch.float64, initializer_range=0.02).eval()


# Transformers' causal-LM loss runs in float32 whatever the model's dtype: compare to float32 precision.
LOSS_TOLERANCE = 1e-6


def full_window_nll(model, input_ids: torch.Tensor) -> float:
    """NLL summed over the window's predicted tokens, from the model's own mean loss."""
    with torch.no_grad():
        loss = model(input_ids[None], labels=input_ids[None]).loss.item()
    return loss * (input_ids.shape[0] - 1)


def test_strided_equals_full_window_on_short_text(model):
    input_ids = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(0))
    nll, scored = strided_nll(model, input_ids, window=32, stride=32)
    assert scored == 19
    assert math.exp(nll / scored) == pytest.approx(math.exp(full_window_nll(model, input_ids) / 19), rel=LOSS_TOLERANCE)


def test_strided_with_stride_equal_to_window_is_disjoint_windows(model):
    input_ids = torch.randint(0, 128, (45,), generator=torch.Generator().manual_seed(1))
    nll, scored = strided_nll(model, input_ids, window=16, stride=16)
    chunks = input_ids.split(16)
    assert scored == sum(len(chunk) - 1 for chunk in chunks) == 42
    assert nll == pytest.approx(sum(full_window_nll(model, chunk) for chunk in chunks), rel=LOSS_TOLERANCE)


def test_overlapping_strides_score_every_token_once(model):
    input_ids = torch.randint(0, 128, (45,), generator=torch.Generator().manual_seed(2))
    nll, scored = strided_nll(model, input_ids, window=16, stride=5)
    assert scored == 44
    # Windows start at 0, 5, ..., 30; each after the first scores the tokens past the previous window's end. A causal
    # model's loss on a window's first tokens does not depend on the tokens after them, so what a window adds is its
    # loss minus the loss of its first tokens.
    expected = full_window_nll(model, input_ids[0:16])
    for begin in range(5, 30, 5):
        expected += full_window_nll(model, input_ids[begin : begin + 16]) - full_window_nll(
            model, input_ids[begin : begin + 11]
        )
    expected += full_window_nll(model, input_ids[30:45]) - full_window_nll(model, input_ids[30:41])
    assert nll == pytest.approx(expected, rel=LOSS_TOLERANCE)
    # A window as long as the text scores it all with full context: same as one forward pass.
    whole_nll, whole_scored = strided_nll(model, input_ids, window=64, stride=7)
    assert whole_scored == 44 and whole_nll == pytest.approx(full_window_nll(model, input_ids), rel=LOSS_TOLERANCE)
    with pytest.raises(ValueError, match="stride must be in"):
        strided_nll(model, input_ids, window=16, stride=17)


def test_per_word_perplexity_is_total_nll_over_words():
    tokenizer = load_tokenizer()
    model = tiny_model(stack="mixed", dtype=torch.float64, vocab_size=len(tokenizer), initializer_range=0.02)
    text = "".join(CORPUS_FILES["validation"].read_text(encoding="utf-8").splitlines(keepends=True)[:4])
    result = evaluate_perplexity(model, tokenizer, text, window=32, stride=16)
    assert result.tokens == len(tokenizer(text)["input_ids"])  # the BOS lets the first token be scored
    assert result.words == count_words(text)
    assert result.per_word == pytest.approx(math.exp(result.nll / result.words), rel=1e-12)
    assert result.per_token == pytest.approx(math.exp(result.nll / result.tokens), rel=1e-12)
    # One window over the whole text: the model's own loss on BOS + text, every token scored.
    input_ids = torch.tensor([tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]])
    whole = evaluate_perplexity(model, tokenizer, text, window=len(input_ids), stride=len(input_ids))
    assert whole.nll == pytest.approx(full_window_nll(model, input_ids), rel=LOSS_TOLERANCE)
