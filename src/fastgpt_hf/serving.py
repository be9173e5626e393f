"""Continuous batching over FastGPT's static cache: the engine behind `fastgpt serve` (`serving_http`).

A `FastGPTRowCache` holds `max_rows` rows of `max_cache_len` positions, allocated once. One scheduler thread loops:
1. rows whose request finished or was cancelled are freed;
2. waiting requests are prefilled into free rows, shortest prompt first, in left-padded batches of a power of two up
   to `max_prefill_batch`, through a `FastGPTStaticCache` of that batch size (one per size, reused), as
   `generate()`'s prefill runs a left-padded batch, and the sequences' states are copied into their rows;
   their last logits give the first tokens (one forward for many prompts: on the GPU an eager prefill's cost is its
   kernel launches, not its batch). With `compile_prefill` the forward is compiled (CUDA graphs on the GPU) at
   bucketed shapes: the waiting prompts, up to `max_prefill_batch`, in one batch of the next power of two from 2
   (filled up with copies of its first prompt), of a power-of-two length from `MIN_PREFILL_LENGTH` (capped at
   `max_cache_len`), the copies into the rows in the same graph (eagerly they were some 70 small copies, 4.7 ms a
   prefill for `1b` on an H100). The batch dimension turns dynamic at its second size (dynamo's automatic dynamic
   shapes), so a length compiles twice at most and each new shape records a CUDA graph. Padding every prefill to
   `max_prefill_batch` instead made the few prompts that arrive between two steps under load cost a full batch;
3. one decode step runs over all rows at once: each row's last token at its own position, free rows masked as
   padding. The shapes never change, so a compiled step (`compile_decode`; CUDA graphs on the GPU) serves every
   step without recompiling (tested on the CPU); by default the same loop runs eagerly.

Each request samples from its own row's logits (greedy at temperature 0, the greedy rows of a step chosen by one
argmax and read back in one transfer; otherwise Transformers' temperature and top-p warpers and a CPU generator of
its own, seeded by `seed`, so that a seed gives the same tokens on every device), and stops at an end-of-sequence
token or after `max_new_tokens`. Rows never share positions, slots, blocks or attention sinks (a row's sink slots
are overwritten with the rest when a request enters it), so a request's tokens are those it gets alone. Tokens go
back through each request's `emit` callback, called on the scheduler thread. Waiting requests are bounded by
`max_queue` beyond the rows: when every row is busy and `max_queue` requests wait, `submit` raises
`EngineOverloaded` instead of queueing without limit.
"""

import collections
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from transformers import CompileConfig, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from .cache_fastgpt import FastGPTRowCache, FastGPTStaticCache

# The shortest prompt length a compiled prefill runs (`prefill_length`): shorter prompts are left-padded to it.
MIN_PREFILL_LENGTH = 64


class EngineOverloaded(RuntimeError):
    """The waiting queue is full: the client should retry later (HTTP 429)."""


class EngineStopped(RuntimeError):
    """The scheduler is not running (stopped, or ended by an error): no request can be served (HTTP 503)."""


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks for: at most `max_new_tokens` tokens; temperature 0 is greedy; `seed` makes sampling
    repeatable (None: a random seed)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, or the end: `finish_reason` is None while generating, then "stop" (an end-of-sequence
    token, included as `token_id`), "length" (`max_new_tokens` reached) or "error" (`token_id` None, `error` set)."""

    token_id: int | None
    finish_reason: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Request:
    """A prompt in the engine: waiting, then in a row until it finishes or is cancelled."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[TokenEvent], None]
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False

    def __post_init__(self) -> None:
        self.generator = torch.Generator()
        if self.params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.params.seed)
        warpers = []
        if self.params.temperature > 0:
            warpers.append(TemperatureLogitsWarper(self.params.temperature))
        if self.params.top_p < 1:
            warpers.append(TopPLogitsWarper(self.params.top_p))
        self.warpers = LogitsProcessorList(warpers)

    def sample_token(self, logits: torch.Tensor) -> int:
        """A sampled next token from this request's logits `[V]` (temperature > 0)."""
        scores = self.warpers(None, logits[None].float())
        return int(torch.multinomial(scores.softmax(-1).cpu(), 1, generator=self.generator))


class ContinuousBatchingEngine:
    """Serve many prompts at once from one model: `submit` from any thread, `start` the scheduler thread (or drive it
    with `step`, as the tests do).

    Args:
        model: a `FastGPTForCausalLM` in eval mode.
        max_rows: sequences decoded together (cache rows).
        max_cache_len: positions per row: a prompt plus its `max_new_tokens` must fit.
        max_queue: requests that may wait while every row is busy.
        eos_token_ids: tokens that end a reply.
        compile_decode: run the decode step through `torch.compile` (CUDA graphs); eager otherwise.
        max_prefill_batch: prompts of one length prefilled together, at most (rounded down to a power of two).
        compile_prefill: run prefills through `torch.compile` (CUDA graphs) at bucketed shapes (module docstring).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        max_rows: int = 8,
        max_cache_len: int = 1024,
        max_queue: int = 64,
        eos_token_ids: Iterable[int] = (),
        compile_decode: bool = False,
        max_prefill_batch: int = 16,
        compile_prefill: bool = False,
    ):
        config = model.config
        if max_cache_len > config.max_position_embeddings:
            raise ValueError(
                f"max_cache_len={max_cache_len} exceeds the model's max_position_embeddings="
                f"{config.max_position_embeddings}; serve with a context of at most that many tokens."
            )
        if min(max_rows, max_cache_len, max_queue, max_prefill_batch) < 1:
            raise ValueError(
                f"max_rows, max_cache_len, max_queue and max_prefill_batch must be at least 1; got {max_rows}, "
                f"{max_cache_len}, {max_queue}, {max_prefill_batch}."
            )
        self.model, self.device = model, model.device
        self.max_rows, self.max_cache_len, self.max_queue = max_rows, max_cache_len, max_queue
        self.eos_token_ids = frozenset(eos_token_ids)
        self.rows = FastGPTRowCache(config, max_cache_len, max_rows)
        self.max_prefill_batch = 2 ** (min(max_prefill_batch, max_rows).bit_length() - 1)
        self.prefill_caches: dict[int, FastGPTStaticCache] = {}  # by batch size, built on first use
        self.decode_call, self.prefill_call = model, self.forward_into_rows
        self.compile_prefill = compile_prefill
        self.row_requests: list[Request | None] = [None] * max_rows
        self.next_tokens = torch.zeros(max_rows, 1, dtype=torch.long)
        self.waiting: collections.deque[Request] = collections.deque()
        self.wake = threading.Condition()
        self.thread: threading.Thread | None = None
        self.running = False
        self.stopped = False  # set by `stop`: later requests get EngineStopped
        self.fatal_error: str | None = None
        # One idle step allocates the rows' buffers (lazily sized after the first keys) before any request.
        # It runs eagerly: compiled code would trace the allocation.
        with torch.inference_mode():
            self.decode_step()
        if compile_decode:
            self.decode_call = model.get_compiled_call(CompileConfig(fullgraph=True))
        if compile_prefill:  # a function of its own: its shapes do not count against the decode step's recompiles
            self.prefill_call = torch.compile(self.forward_into_rows, fullgraph=True, mode="reduce-overhead")

    def submit(self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[TokenEvent], None]) -> Request:
        """Queue a prompt; its tokens come back through `emit`. Raises ValueError for a request that cannot be
        served as asked, `EngineOverloaded` when every row is busy and `max_queue` requests already wait,
        `EngineStopped` after `stop` or a failure."""
        self.check_request(prompt_ids, params)
        request = Request(list(prompt_ids), params, emit)
        with self.wake:
            if self.fatal_error is not None:
                raise EngineStopped(f"the engine stopped after an error: {self.fatal_error}")
            if self.stopped:
                raise EngineStopped("the engine was stopped: it serves no more requests.")
            if len(self.waiting) + self.busy_rows() >= self.max_rows + self.max_queue:
                raise EngineOverloaded(
                    f"All {self.max_rows} rows are busy and {self.max_queue} requests already wait (the queue "
                    "bound); retry later."
                )
            self.waiting.append(request)
            self.wake.notify()
        return request

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise a ValueError saying what to change, unless the request's token ids are in the vocabulary, it fits
        the rows and its sampling is valid (a bad request must not reach the scheduler, whose failure would end
        every request)."""
        prompt_length, vocab_size = len(prompt_ids), self.model.config.vocab_size
        if prompt_length == 0:
            raise ValueError("The prompt is empty: give at least one token.")
        outside = next(((index, token) for index, token in enumerate(prompt_ids) if not 0 <= token < vocab_size), None)
        if outside is not None:
            raise ValueError(
                f"Token id {outside[1]} at position {outside[0]} of the prompt is outside the model's vocabulary "
                f"(ids 0 to {vocab_size - 1}); tokenize the prompt with this model's tokenizer."
            )
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens (HTTP: max_tokens) must be at least 1; got {params.max_new_tokens}.")
        if prompt_length + params.max_new_tokens > self.max_cache_len:
            raise ValueError(
                f"This server's context is {self.max_cache_len} tokens, but the request needs "
                f"{prompt_length + params.max_new_tokens} ({prompt_length} in the prompt, {params.max_new_tokens} "
                "to generate); shorten the prompt or lower max_tokens."
            )
        if params.temperature < 0:
            raise ValueError(f"temperature must be 0 (greedy) or more; got {params.temperature}.")
        if not 0 < params.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {params.top_p}.")

    def cancel(self, request: Request) -> None:
        """Stop generating for `request` (any thread); its row is freed before the next decode step."""
        request.cancelled = True
        with self.wake:
            self.wake.notify()

    def busy_rows(self) -> int:
        """Rows whose request is still generating."""
        return sum(request is not None and not (request.finished or request.cancelled) for request in self.row_requests)

    def load(self) -> dict[str, int]:
        """Rows in use and requests waiting, for health checks."""
        with self.wake:
            waiting = len(self.waiting)
        active = sum(request is not None for request in self.row_requests)
        return {"active_rows": active, "free_rows": self.max_rows - active, "waiting": waiting}

    @torch.inference_mode()
    def step(self) -> bool:
        """One round of the scheduler: free finished rows, prefill waiting requests into free rows, decode every row
        once. Returns whether there was anything to do."""
        self.free_finished_rows()
        admitted = self.admit_waiting_requests()
        self.free_finished_rows()  # a reply can end at its first token
        if not any(request is not None for request in self.row_requests):
            return admitted
        logits = self.decode_step()
        rows = [row for row, request in enumerate(self.row_requests) if request is not None and not request.cancelled]
        for row in rows:
            self.rows.row_lengths[row] += 1
        self.add_tokens(rows, logits[rows] if len(rows) < self.max_rows else logits)
        return True

    def free_finished_rows(self) -> None:
        for row, request in enumerate(self.row_requests):
            if request is not None and (request.finished or request.cancelled):
                self.row_requests[row] = None
                self.rows.row_lengths[row] = 0

    def admit_waiting_requests(self) -> bool:
        """Prefill waiting requests into free rows; whether any was taken off the queue."""
        free_rows = [row for row, request in enumerate(self.row_requests) if request is None]
        admitted: list[Request] = []
        with self.wake:
            while self.waiting and len(admitted) < len(free_rows):
                request = self.waiting.popleft()
                if not request.cancelled:
                    admitted.append(request)
        admitted.sort(key=lambda request: len(request.prompt_ids))  # little padding in each batch
        taken, free = bool(admitted), iter(free_rows)
        while admitted:
            size = min(
                self.max_prefill_batch, len(admitted) if self.compile_prefill else 2 ** (len(admitted).bit_length() - 1)
            )
            batch, admitted = admitted[:size], admitted[size:]
            rows = [next(free) for _ in batch]
            for row, request in zip(rows, batch, strict=True):
                self.row_requests[row] = request
            self.add_tokens(rows, self.prefill(rows, [request.prompt_ids for request in batch]))
        return taken

    def prefill(self, rows: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Run prompts, left-padded to the longest, into `rows` in one forward; returns their last logits
        `[len(rows), V]`. A compiled prefill runs a bucketed batch and length (module docstring)."""
        lengths, targets = [len(prompt) for prompt in prompts], list(rows)
        if self.compile_prefill:  # the copies of the first prompt go to its row too: the same sequence twice
            padding = self.prefill_batch_size(len(prompts)) - len(prompts)
            prompts, targets = prompts + [prompts[0]] * padding, targets + [rows[0]] * padding
        cache = self.prefill_caches.get(len(prompts))
        if cache is None:
            cache = self.prefill_caches[len(prompts)] = FastGPTStaticCache(self.model.config, self.max_cache_len)
            if self.compile_prefill:  # one eager token allocates the buffers: compiled code must not trace that
                self.model(input_ids=torch.zeros(len(prompts), 1, dtype=torch.long, device=self.device), cache=cache)
        cache.reset()
        longest = self.prefill_length(max(lengths))
        input_ids = torch.tensor([[0] * (longest - len(prompt)) + prompt for prompt in prompts])
        attention_mask = torch.tensor([[0] * (longest - len(prompt)) + [1] * len(prompt) for prompt in prompts])
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers a left-padded batch
        logits = self.prefill_call(
            input_ids.to(self.device),
            attention_mask.to(self.device),
            position_ids.to(self.device),
            cache,
            torch.tensor(targets, device=self.device),
        )
        for row, length in zip(rows, lengths, strict=True):
            self.rows.row_lengths[row] = length
        return logits[: len(rows)]

    def forward_into_rows(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: FastGPTStaticCache,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        """Prefill a batch into `cache`, copy its sequences into rows `targets`; the last logits `[B, V]`."""
        logits = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, logits_to_keep=1
        ).logits
        self.rows.copy_rows(cache, targets)
        return logits[:, -1]

    def prefill_batch_size(self, count: int) -> int:
        """The rows a compiled prefill of `count` prompts runs: the next power of two from 2 (a batch of 1 would
        compile once more: dynamo specializes size 1), at most `max_prefill_batch`."""
        return min(max(2, 2 ** (count - 1).bit_length()), self.max_prefill_batch)

    def prefill_length(self, longest: int) -> int:
        """The length a prefill of prompts of at most `longest` tokens runs: `longest` eagerly; compiled, the next
        power of two from `MIN_PREFILL_LENGTH`, at most `max_cache_len`."""
        if not self.compile_prefill:
            return longest
        return min(max(MIN_PREFILL_LENGTH, 2 ** (longest - 1).bit_length()), self.max_cache_len)

    def decode_step(self) -> torch.Tensor:
        """Every row's next-token logits `[max_rows, V]`; free rows' tokens are padding."""
        active = torch.tensor([[request is not None] for request in self.row_requests], device=self.device)
        positions = torch.tensor([[length] for length in self.rows.row_lengths], device=self.device)
        outputs = self.decode_call(
            input_ids=self.next_tokens.to(self.device),
            attention_mask=active.long(),
            position_ids=positions,
            cache=self.rows,
            use_cache=True,
        )
        return outputs.logits[:, -1]

    def add_tokens(self, rows: list[int], logits: torch.Tensor) -> None:
        """Choose the next token of the request in each of `rows` from its logits (`logits[i]` for `rows[i]`), tell
        it, and mark it finished at EOS or `max_new_tokens`. Greedy rows share one argmax and one read back; the
        rows' next inputs are written in one copy (a copy per row took 0.6 ms a round of 256 rows on one CPU core)."""
        requests = [self.row_requests[row] for row in rows]
        greedy_tokens = logits.argmax(-1).tolist()
        tokens = [
            greedy_tokens[index] if request.params.temperature == 0 else request.sample_token(logits[index])
            for index, request in enumerate(requests)
        ]
        self.next_tokens[rows, 0] = torch.tensor(tokens, dtype=torch.long)
        for token, request in zip(tokens, requests, strict=True):
            request.generated.append(token)
            finish_reason = None
            if token in self.eos_token_ids:
                finish_reason = "stop"
            elif len(request.generated) >= request.params.max_new_tokens:
                finish_reason = "length"
            request.finished = finish_reason is not None
            request.emit(TokenEvent(token, finish_reason))

    def start(self) -> None:
        """Run the scheduler on a daemon thread until `stop`."""
        self.running = True
        self.thread = threading.Thread(target=self.run, name="fastgpt-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """End the scheduler after its current step; requests submitted later get `EngineStopped`."""
        with self.wake:
            self.running = False
            self.stopped = True
            self.wake.notify()
        if self.thread is not None:
            self.thread.join()

    def run(self) -> None:
        """The scheduler loop: step while there is work, sleep until `submit` or `cancel` wakes it."""
        try:
            while self.running:
                if not self.step():
                    with self.wake:
                        if not self.waiting and self.running:
                            self.wake.wait()
        except Exception as error:  # a failed step ends every request with the error, never silently
            self.fail(f"{type(error).__name__}: {error}")
            raise

    def fail(self, message: str) -> None:
        with self.wake:
            self.fatal_error = message
            stranded = [*self.waiting, *(request for request in self.row_requests if request is not None)]
            self.waiting.clear()
        for request in stranded:
            request.emit(TokenEvent(None, "error", message))
