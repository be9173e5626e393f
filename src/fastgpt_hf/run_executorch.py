"""Run a `.pte` file written by `export_executorch` through ExecuTorch's Python runtime: prefill, decode, sample.

`PteLanguageModel` loads the file's methods once (they share the cache); `generate_tokens` resets the cache, feeds
the prompt as whole `prefill` chunks and its remainder through `decode`, then yields new tokens one by one,
greedy or sampled (temperature and top-k through Transformers' logits processors). `sequence_nll` scores a text the
way `data.strided_nll` does with `stride == window`, so an exported model's perplexity compares with the eager one.
"""

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.generation import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper


def load_program(path: str | Path):
    """ExecuTorch's `Program` of a `.pte` file, with the kernels of its int8 embedding registered."""
    import executorch.kernels.quantized  # noqa: F401  (registers `quantized_decomposed::embedding_byte`)
    from executorch.runtime import Runtime

    return Runtime.get().load_program(path)


class PteLanguageModel:
    """The methods of a FastGPT `.pte` file (see `export_executorch`) and what its constant methods say."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path} is not a file; pass a .pte written by `fastgpt export`.")
        self.path = path
        self.program = load_program(path)
        missing = {"prefill", "decode", "reset", "get_max_cache_len"} - set(self.program.method_names)
        if missing:
            raise ValueError(f"{path} has no method {sorted(missing)}; it was not written by `fastgpt export`.")
        self.methods = {name: self.program.load_method(name) for name in ("prefill", "decode", "reset")}
        self.max_cache_len = self.constant("get_max_cache_len")
        self.prefill_chunk = self.constant("get_prefill_chunk")
        self.vocab_size = self.constant("get_vocab_size")

    def constant(self, name: str) -> int:
        return int(self.program.load_method(name).execute([])[0])

    def reset(self) -> None:
        """Empty the cache: the next token is position 0."""
        self.methods["reset"].execute([])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Take in `[T]` token ids after the cached ones; return their logits `[T, vocab]` (float32)."""
        logits = []
        chunk = self.prefill_chunk
        whole = input_ids.shape[0] - input_ids.shape[0] % chunk
        for start in range(0, whole, chunk):
            logits.append(self.methods["prefill"].execute([input_ids[None, start : start + chunk]])[0][0])
        for position in range(whole, input_ids.shape[0]):
            logits.append(self.methods["decode"].execute([input_ids[None, position : position + 1]])[0][0])
        return torch.cat(logits).float()

    def check_length(self, total_length: int, what: str) -> None:
        if total_length > self.max_cache_len:
            raise ValueError(
                f"{what} reaches {total_length} tokens, more than the {self.max_cache_len} positions {self.path} was "
                "exported for; shorten it, or export again with a larger --max-cache-len."
            )


def generate_tokens(
    model: PteLanguageModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 50,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` new tokens after the prompt `input_ids` `[T]` (long), one as soon as it is
    chosen; stop after `eos_token_id`. A ValueError before any work when the prompt, or the prompt and the new
    tokens, exceed the file's `max_cache_len`."""
    if input_ids.dim() != 1 or input_ids.shape[0] == 0:
        raise ValueError(f"The prompt must be a non-empty 1D tensor of token ids; got shape {tuple(input_ids.shape)}.")
    model.check_length(input_ids.shape[0], "The prompt")
    model.check_length(input_ids.shape[0] + max_new_tokens, f"The prompt plus {max_new_tokens} new tokens")
    warpers = LogitsProcessorList()
    if do_sample:
        warpers.extend([TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k)])
    model.reset()
    logits = model.forward(input_ids.long())[-1:]
    sequence = input_ids.long()[None]
    for step in range(max_new_tokens):
        scores = warpers(sequence, logits)
        if do_sample:
            token = torch.multinomial(F.softmax(scores, dim=-1), 1, generator=generator)[0]
        else:
            token = scores.argmax(-1)
        yield int(token)
        if int(token) == eos_token_id or step == max_new_tokens - 1:
            return
        sequence = torch.cat([sequence, token[None]], dim=1)
        logits = model.forward(token)


def sequence_nll(model: PteLanguageModel, input_ids: torch.Tensor, window: int) -> tuple[float, int]:
    """Summed NLL (nats) and count of the tokens of `input_ids` `[N]` scored in disjoint windows of `window` tokens,
    each read from an empty cache and scoring all its tokens but the first: `data.strided_nll(..., window, window)`.
    """
    model.check_length(window, "The perplexity window")
    total_nll, scored = 0.0, 0
    for begin in range(0, max(input_ids.shape[0] - 1, 1), window):
        tokens = input_ids[begin : begin + window].long()
        if tokens.shape[0] < 2:
            break
        model.reset()
        logits = model.forward(tokens)
        total_nll += F.cross_entropy(logits[:-1], tokens[1:], reduction="sum").item()
        scored += tokens.shape[0] - 1
    return total_nll, scored
