"""`fastgpt export` / `export_executorch`: the .pte gives eager's greedy tokens across windows, blocks and ring
wraps; int8 keeps eager int8's perplexity in about a quarter of the file; `fastgpt generate` runs a .pte.

One tiny model (the `tiny` preset with the shipped tokenizer's vocabulary) exported twice, float32 and int8, with a
cache of 128 positions and prefill chunks of 16. ExecuTorch comes with the `edge` extra (`make test` installs it).
Lowering to XNNPACK takes minutes on two busy cores: every test here is marked slow.
"""

import copy
import math

import pytest
import torch

from fastgpt_hf.cli import main
from fastgpt_hf.data import CORPUS_FILES, load_tokenizer, strided_nll
from fastgpt_hf.training import model_for_tokenizer

pytest.importorskip("executorch", reason="ExecuTorch comes with the edge extra: pip install 'fastgpt_hf[edge]'")

from fastgpt_hf.export_executorch import quantize_for_edge  # noqa: E402
from fastgpt_hf.run_executorch import PteLanguageModel, generate_tokens, sequence_nll  # noqa: E402

pytestmark = pytest.mark.slow

MAX_CACHE_LEN = 128
PREFILL_CHUNK = 16


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny float32 checkpoint folder (with the tokenizer), and its float32 and int8 .pte files from the CLI."""
    folder = tmp_path_factory.mktemp("export")
    tokenizer = load_tokenizer()
    # A larger init than training's, so that logits are far from uniform and greedy choices are not near-ties.
    model = model_for_tokenizer("tiny", tokenizer, seed=0, initializer_range=0.2).eval()
    model.save_pretrained(folder / "checkpoint")
    tokenizer.save_pretrained(folder / "checkpoint")
    files = {}
    for quantize in ("none", "int8-dynamic"):
        files[quantize] = folder / f"{quantize}.pte"
        options = ["--max-cache-len", str(MAX_CACHE_LEN), "--prefill-chunk", str(PREFILL_CHUNK)]
        main(["export", str(folder / "checkpoint"), str(files[quantize]), "--quantize", quantize, *options])
    return model, folder / "checkpoint", files


def long_prompt_and_eager_tokens(model) -> tuple[torch.Tensor, list[int]]:
    """40 prompt tokens (two prefill chunks and 8 decode steps) and eager generate()'s 64 greedy new ones: past the
    sliding window (8), the dynamic window (16) and many blocks of 4, the windows' rings wrapping many times."""
    prompt = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    eager = model.generate(
        prompt[None],
        attention_mask=torch.ones(1, 40, dtype=torch.long),
        max_new_tokens=64,
        min_new_tokens=64,
        do_sample=False,
    )
    return prompt, eager[0, 40:].tolist()


def test_float_pte_gives_eager_greedy_tokens_across_windows_blocks_and_wraps(exported):
    model, _, files = exported
    prompt, eager = long_prompt_and_eager_tokens(model)
    pte = PteLanguageModel(files["none"])
    assert list(generate_tokens(pte, prompt, 64)) == eager
    # The cache is emptied between sequences: the same prompt again gives the same tokens.
    assert list(generate_tokens(pte, prompt, 64)) == eager


def test_pte_with_attention_sinks_gives_eager_greedy_tokens(tmp_path):
    """Attention sinks in the exported cache: 40 + 64 tokens, the first 3 seen by every window long after they left
    it, through prefill chunks, decode steps and ring wraps, as eager generate() sees them; and again after reset."""
    tokenizer = load_tokenizer()
    model = model_for_tokenizer("tiny", tokenizer, seed=0, initializer_range=0.2, num_sink_tokens=3).eval()
    model.save_pretrained(tmp_path / "checkpoint")
    options = ["--max-cache-len", str(MAX_CACHE_LEN), "--prefill-chunk", str(PREFILL_CHUNK)]
    main(["export", str(tmp_path / "checkpoint"), str(tmp_path / "sinks.pte"), *options])
    prompt, eager = long_prompt_and_eager_tokens(model)
    without_sinks = model_for_tokenizer("tiny", tokenizer, seed=0, initializer_range=0.2).eval()
    assert long_prompt_and_eager_tokens(without_sinks)[1] != eager  # the sinks change these tokens
    pte = PteLanguageModel(tmp_path / "sinks.pte")
    assert list(generate_tokens(pte, prompt, 64)) == eager
    assert list(generate_tokens(pte, prompt, 64)) == eager


def test_sampling_is_seeded_and_top_k_1_is_greedy(exported):
    pte = PteLanguageModel(exported[2]["none"])
    prompt = torch.arange(5, 25)
    greedy = list(generate_tokens(pte, prompt, 16))
    sample = lambda top_k, seed: list(  # noqa: E731
        generate_tokens(pte, prompt, 16, do_sample=True, top_k=top_k, generator=torch.Generator().manual_seed(seed))
    )
    assert sample(1, 0) == greedy
    assert sample(50, 0) == sample(50, 0)
    assert sample(50, 0) != greedy


def test_int8_pte_keeps_eager_int8_perplexity_in_a_quarter_of_the_file(exported):
    model, _, files = exported
    tokenizer = load_tokenizer()
    text = CORPUS_FILES["validation"].read_text(encoding="utf-8")[:6000]
    input_ids = torch.tensor([tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]])
    eager_int8 = quantize_for_edge(copy.deepcopy(model)).eval()
    eager_nll, eager_tokens = strided_nll(eager_int8, input_ids, MAX_CACHE_LEN, MAX_CACHE_LEN)
    pte_nll, pte_tokens = sequence_nll(PteLanguageModel(files["int8-dynamic"]), input_ids, MAX_CACHE_LEN)
    assert pte_tokens == eager_tokens > 1000
    # Perplexity ratio = exp(difference of mean NLLs), compared as logs: a random model's perplexity is large.
    log_ratio = pte_nll / pte_tokens - eager_nll / eager_tokens
    assert abs(log_ratio) < math.log(1.01), (pte_nll / pte_tokens, eager_nll / eager_tokens)
    size_ratio = files["int8-dynamic"].stat().st_size / files["none"].stat().st_size
    assert 0.2 < size_ratio < 0.3, size_ratio


def test_prompt_longer_than_the_cache_is_a_clear_error(exported):
    pte = PteLanguageModel(exported[2]["none"])
    with pytest.raises(ValueError, match=f"The prompt reaches 129 tokens, more than the {MAX_CACHE_LEN} positions"):
        next(generate_tokens(pte, torch.zeros(MAX_CACHE_LEN + 1, dtype=torch.long), 1))
    with pytest.raises(ValueError, match="plus 100 new tokens reaches 140 tokens"):
        next(generate_tokens(pte, torch.zeros(40, dtype=torch.long), 100))


def test_cli_generate_streams_a_pte_and_refuses_a_long_prompt(exported, capsys):
    _, checkpoint, files = exported
    prompt = " = Robert Boulter = \n"
    main(["generate", str(files["int8-dynamic"]), "--tokenizer", str(checkpoint), "--prompt", prompt, "--sample"])
    out = capsys.readouterr().out
    assert out.startswith(prompt) and len(out) > len(prompt)
    with pytest.raises(SystemExit) as exit_:
        main(["generate", str(files["none"]), "--tokenizer", str(checkpoint), "--prompt", " word" * 200])
    assert exit_.value.code == 2
    assert f"more than the {MAX_CACHE_LEN} positions" in capsys.readouterr().err
