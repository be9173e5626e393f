"""`fastgpt serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over `serving.ContinuousBatchingEngine`.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (the prompt from the tokenizer's chat template),
both with `max_tokens`, `temperature`, `top_p`, `stop`, `seed` and `stream` (server-sent events, ending with
`data: [DONE]`); `GET /v1/models`; `GET /health` (rows in use and requests waiting; 503 once the engine failed).
Errors come as OpenAI's `{"error": {"message": ...}}`: 400 for a bad or too long request, 404 for another model's
name, 429 when the waiting queue is full, 503 when the engine has stopped. A client that disconnects, or a reply that
reaches a stop string, frees its cache row before the next decode step.

Why not `transformers serve`: its continuous batching (a model's `init_continuous_batching`) builds one manager with
the first request's generation config and then passes each request only its prompt, `max_new_tokens` and EOS, so
per-request temperature, top_p and seed would be ignored, and it has no queue bound; its paged cache also has no
place for FastGPT's dynamic layers. The HTTP layer here is written with the same libraries it uses.
"""

import argparse
import asyncio
import collections
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import torch
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from .serving import ContinuousBatchingEngine, EngineOverloaded, EngineStopped, SamplingParams, TokenEvent

# How often a waiting reply checks that its client is still connected, seconds.
DISCONNECT_POLL_SECONDS = 0.5
# HTTP processes by default on CUDA: 4 took the `1b` server from 273 to 561 requests/s on an H100, 8 added nothing.
CUDA_HTTP_WORKERS = 4


class CompletionRequest(BaseModel):
    """The fields of OpenAI's completions request that the server honours (others are ignored)."""

    model: str | None = None
    prompt: str
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = 1


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completions request; without max_tokens the reply may fill the rest of the context."""

    model: str | None = None
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = 1


class UnknownModel(LookupError):
    """A request named a model this server does not serve (HTTP 404)."""


class ReplyText:
    """A reply's text as its tokens arrive, cut before the first stop string.

    `take_ready` gives the text not yet sent that can be sent: it holds back an incomplete character (the byte-level
    decoder shows U+FFFD until its last byte) and a tail that could begin a stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, token_ids: list[int]) -> None:
        self.tokens.extend(token_ids)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        found = [index for index in (text.find(stop) for stop in self.stop) if index >= 0]
        if found:
            text, self.stopped = text[: min(found)], True
        self.text = text

    def take_ready(self, final: bool) -> str:
        end = len(self.text) if final or self.stopped else self.safe_end()
        ready = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return ready

    def safe_end(self) -> int:
        end = len(self.text.rstrip("\ufffd"))
        for held in range(min(end, max((len(stop) for stop in self.stop), default=0)), 0, -1):
            if any(stop.startswith(self.text[end - held : end]) for stop in self.stop):
                return end - held
        return end


class EngineEvents:
    """Hands the engine thread's token events to the event loop in batches: one wake-up of the loop for all the
    events that arrive before it turns to them (a decode step's tokens of every row), not one per token. Under load
    the per-token `call_soon_threadsafe` (a lock, a pipe write, a loop turn) was most of this server's work."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: collections.deque = collections.deque()
        self.wake_scheduled = False

    def put(self, deliver: Callable[[TokenEvent], None], event: TokenEvent) -> None:
        """On the engine's thread: queue `deliver(event)`, waking the loop unless a wake-up is already due."""
        with self.lock:
            self.pending.append((deliver, event))
            if self.wake_scheduled:
                return
            self.wake_scheduled = True
        self.loop.call_soon_threadsafe(self.deliver_pending)

    def deliver_pending(self) -> None:
        """On the event loop: hand every queued event to its reply."""
        with self.lock:
            batch, self.pending = self.pending, collections.deque()
            self.wake_scheduled = False
        for deliver, event in batch:
            deliver(event)


class LocalEngine:
    """The engine of this process as the app uses it (`serving_workers.RemoteEngine` is the same for an engine in
    another process): `submit` queues a prompt whose events reach the calling event loop through `EngineEvents`."""

    def __init__(self, engine: ContinuousBatchingEngine):
        self.engine, self.max_cache_len = engine, engine.max_cache_len
        self.relays: dict[asyncio.AbstractEventLoop, EngineEvents] = {}

    async def submit(self, prompt_ids: list[int], params: SamplingParams, deliver: Callable[[TokenEvent], None]):
        """The engine's `Request` for the prompt, or its refusal raised (ValueError, EngineOverloaded, ...)."""
        loop = asyncio.get_running_loop()
        events = self.relays.get(loop) or self.relays.setdefault(loop, EngineEvents(loop))
        return self.engine.submit(prompt_ids, params, lambda event: events.put(deliver, event))

    def cancel(self, request) -> None:
        self.engine.cancel(request)

    async def status(self) -> tuple[str | None, dict[str, int]]:
        """The engine's fatal error (None while it runs) and its load (`ContinuousBatchingEngine.load`)."""
        return self.engine.fatal_error, self.engine.load()


class Reply:
    """One request in the engine, read as text chunks once `submitted` (awaited before the response starts, so that
    a refusal is an HTTP error, not a broken stream). Leaving `chunks` early (a disconnect, a stop string) cancels it
    in the engine."""

    def __init__(self, engine: "LocalEngine", tokenizer, prompt_length: int, stop, stream_interval: int = 1):
        self.engine, self.prompt_length, self.stream_interval = engine, prompt_length, stream_interval
        self.text = ReplyText(tokenizer, [stop] if isinstance(stop, str) else list(stop or []))
        self.finish_reason: str | None = None
        self.events, self.arrived = collections.deque(), asyncio.Event()
        self.request = None

    @classmethod
    async def submitted(cls, engine, tokenizer, prompt_ids: list[int], params, stop, stream_interval: int) -> "Reply":
        reply = cls(engine, tokenizer, len(prompt_ids), stop, stream_interval)
        reply.request = await engine.submit(prompt_ids, params, reply.deliver)
        return reply

    async def chunks(self, http_request: HTTPRequest) -> AsyncIterator[str]:
        """The reply's text in pieces: the first token's as soon as it comes, then one piece per `stream_interval`
        tokens or more (the tokens that arrived together: under load, several a piece), and the rest at the end;
        `finish_reason` is set when it ends ("stop", "length"). Fewer pieces are less work per token for this server
        and its client, as vLLM's `--stream-interval`."""
        try:
            held: list[int] = []
            while self.finish_reason is None:
                events = await self.next_events(http_request)
                if not events:
                    return
                failed = [event.error for event in events if event.error is not None]
                if failed:
                    raise RuntimeError(f"generation failed: {failed[0]}")
                held.extend(event.token_id for event in events)
                if events[-1].finish_reason is None and self.text.tokens and len(held) < self.stream_interval:
                    continue
                self.text.add(held)
                held = []
                self.finish_reason = "stop" if self.text.stopped else events[-1].finish_reason
                ready = self.text.take_ready(final=self.finish_reason is not None)
                if ready:
                    yield ready
        finally:
            if not self.request.finished:
                self.engine.cancel(self.request)

    async def next_events(self, http_request: HTTPRequest) -> list[TokenEvent]:
        """The engine's events that have arrived (waiting for one if none has), or none once the client has gone.
        A reply's events end with its last token, so no event is left behind."""
        while not self.events:
            try:
                async with asyncio.timeout(DISCONNECT_POLL_SECONDS):
                    await self.arrived.wait()
            except TimeoutError:
                if await http_request.is_disconnected():
                    return []
            self.arrived.clear()
        events = list(self.events)
        self.events.clear()
        return events

    def deliver(self, event: TokenEvent) -> None:
        """On the event loop (`EngineEvents` hands each event over): queue it and wake `next_events`."""
        self.events.append(event)
        self.arrived.set()

    def usage(self) -> dict[str, int]:
        completion_tokens = len(self.text.tokens)
        return {
            "prompt_tokens": self.prompt_length,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_length + completion_tokens,
        }


def error_response(status: int, message: str, error_type: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": error_type, "param": None, "code": None}}, status)


def build_app(engine, tokenizer, model_name: str, stream_interval: int = 1) -> FastAPI:
    """The FastAPI app serving `engine` (a `ContinuousBatchingEngine` of this process, whose scheduler runs on its
    own thread, or a `LocalEngine` / `serving_workers.RemoteEngine`) under `model_name`. Streamed replies send a
    piece per `stream_interval` tokens at most (`Reply.chunks`)."""
    if isinstance(engine, ContinuousBatchingEngine):
        engine = LocalEngine(engine)
    app = FastAPI(title="FastGPT", description="OpenAI-compatible completions with continuous batching")
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(map(str, item['loc'][1:])) or 'body'}: {item['msg']}" for item in error.errors()
        )
        return error_response(400, f"Invalid request: {problems}", "invalid_request_error")

    @app.exception_handler(ValueError)
    async def bad_request(_, error: ValueError) -> JSONResponse:
        return error_response(400, str(error), "invalid_request_error")

    @app.exception_handler(UnknownModel)
    async def unknown_model(_, error: UnknownModel) -> JSONResponse:
        return error_response(404, str(error), "not_found_error")

    @app.exception_handler(EngineOverloaded)
    async def overloaded(_, error: EngineOverloaded) -> JSONResponse:
        return error_response(429, str(error), "rate_limit_error")

    @app.exception_handler(EngineStopped)
    async def stopped(_, error: EngineStopped) -> JSONResponse:
        return error_response(503, str(error), "server_error")

    @app.get("/health")
    async def health() -> JSONResponse:
        fatal_error, load = await engine.status()
        if fatal_error is not None:
            return error_response(503, f"the engine stopped after an error: {fatal_error}", "server_error")
        return JSONResponse({"status": "ok", **load})

    @app.get("/v1/models")
    async def models() -> dict:
        model = {"id": model_name, "object": "model", "created": created, "owned_by": "fastgpt"}
        return {"object": "list", "data": [model]}

    def check_common(body: CompletionRequest | ChatCompletionRequest) -> None:
        if body.model is not None and body.model != model_name:
            raise UnknownModel(f"The model {body.model!r} is not served here; this server serves {model_name!r}.")
        if body.n != 1:
            raise ValueError(f"n must be 1 (one reply per request); got {body.n}.")
        if body.stop == "" or (isinstance(body.stop, list) and "" in body.stop):
            raise ValueError(
                "A stop string is empty: it would end every reply before its first character; leave it out."
            )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http_request: HTTPRequest):
        check_common(body)
        prompt_ids = tokenizer(body.prompt).input_ids
        params = SamplingParams(body.max_tokens, body.temperature, body.top_p, body.seed)
        reply = await Reply.submitted(engine, tokenizer, prompt_ids, params, body.stop, stream_interval)
        identity = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time())}
        identity["model"] = model_name

        def choice(text: str, finish_reason: str | None) -> dict:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

        if body.stream:
            return event_stream(reply, http_request, identity, lambda text: choice(text, None), choice)
        text = "".join([chunk async for chunk in reply.chunks(http_request)])
        return {**identity, "choices": [choice(text, reply.finish_reason)], "usage": reply.usage()}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http_request: HTTPRequest):
        check_common(body)
        if tokenizer.chat_template is None:
            raise ValueError(
                "This checkpoint's tokenizer has no chat template: set tokenizer.chat_template and save it with the "
                "checkpoint, or send plain text to /v1/completions."
            )
        messages = [message.model_dump() for message in body.messages]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = asked if asked is not None else max(engine.max_cache_len - len(prompt_ids), 1)
        params = SamplingParams(max_tokens, body.temperature, body.top_p, body.seed)
        reply = await Reply.submitted(engine, tokenizer, prompt_ids, params, body.stop, stream_interval)
        identity = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}

        def delta(text: str) -> dict:
            return {"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None}

        def last_delta(text: str, finish_reason: str | None) -> dict:
            return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish_reason}

        if body.stream:
            return event_stream(reply, http_request, {**identity, "object": "chat.completion.chunk"}, delta, last_delta)
        text = "".join([chunk async for chunk in reply.chunks(http_request)])
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "finish_reason": reply.finish_reason}
        return {**identity, "object": "chat.completion", "choices": [choice], "usage": reply.usage()}

    return app


def event_stream(reply: Reply, http_request: HTTPRequest, identity: dict, choice, last_choice) -> StreamingResponse:
    """Server-sent events: one chunk per piece of text (`choice(text)`), a last one with the finish reason
    (`last_choice("", reason)`) and the token counts (`usage`, as `transformers serve` sends), then `data: [DONE]`."""

    async def events() -> AsyncIterator[str]:
        async for text in reply.chunks(http_request):
            yield f"data: {json.dumps({**identity, 'choices': [choice(text)]})}\n\n"
        if reply.finish_reason is not None:
            last = {**identity, "choices": [last_choice("", reply.finish_reason)], "usage": reply.usage()}
            yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def serve_parser() -> argparse.ArgumentParser:
    from .cli import positive_int

    parser = argparse.ArgumentParser(
        prog="fastgpt serve",
        description="Serve a checkpoint with an OpenAI-compatible API (/v1/completions, /v1/chat/completions, "
        "/v1/models, /health) and continuous batching over a static cache of --rows rows of --context tokens.",
    )
    parser.add_argument("checkpoint", help="checkpoint folder (save_pretrained output)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=positive_int, default=8000)
    parser.add_argument("--rows", type=positive_int, default=8, help="sequences decoded together (default: 8)")
    parser.add_argument("--context", type=positive_int, default=1024, help="prompt + reply tokens per row")
    parser.add_argument("--max-queue", type=positive_int, default=64, help="waiting requests before 429")
    parser.add_argument(
        "--prefill-batch", type=positive_int, default=16, help="prompts prefilled together, at most (default: 16)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument(
        "--stream-interval",
        type=positive_int,
        default=1,
        help="tokens per streamed piece after the first (default: 1, every token as it comes; more: less work per "
        "token for the server and its clients under load, as vLLM's --stream-interval)",
    )
    parser.add_argument(
        "--http-workers",
        type=positive_int,
        help=f"processes for the HTTP layer (default: {CUDA_HTTP_WORKERS} on CUDA, 1 on the CPU, in the engine's "
        "process; more than 1: uvicorn workers reaching the engine of this process, so that HTTP work and the "
        "engine do not share one interpreter)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="compile the decode step and the prefills (CUDA graphs; default: on CUDA yes, on the CPU no)",
    )
    return parser


def device_defaults(args: argparse.Namespace, device: str) -> argparse.Namespace:
    """`--compile` and `--http-workers` where the user left them out: on CUDA the setting measured fastest
    (compiled, `CUDA_HTTP_WORKERS` HTTP processes: benchmarks/RESULTS.md "serve"), on the CPU the eager engine and
    one process, so that nothing is compiled that the user did not ask for."""
    on_cuda = torch.device(device).type == "cuda"
    if args.compile is None:
        args.compile = on_cuda
    if args.http_workers is None:
        args.http_workers = CUDA_HTTP_WORKERS if on_cuda else 1
    return args


def serve_main(argv: list[str] | None = None) -> None:
    """`fastgpt serve CHECKPOINT`: load the checkpoint, start the engine and serve until Ctrl-C."""
    parser = serve_parser()
    args = parser.parse_args(argv)
    import uvicorn

    from .cli import existing_checkpoint, load_checkpoint

    checkpoint = existing_checkpoint(parser, args.checkpoint)
    model, tokenizer = load_checkpoint(checkpoint)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    args = device_defaults(args, device)
    model = model.to(device) if args.dtype == "auto" else model.to(device, getattr(torch, args.dtype))
    eos_token_ids = model.generation_config.eos_token_id
    eos_token_ids = [eos_token_ids] if isinstance(eos_token_ids, int) else eos_token_ids or []
    engine = ContinuousBatchingEngine(
        model, args.rows, args.context, args.max_queue, eos_token_ids, args.compile, args.prefill_batch, args.compile
    )
    model_name = Path(checkpoint).resolve().name
    engine.start()
    print(
        f"fastgpt serve: {model_name} on http://{args.host}:{args.port} ({args.rows} rows of {args.context} "
        f"tokens, {device})",
        flush=True,
    )
    try:
        if args.http_workers == 1:
            app = build_app(engine, tokenizer, model_name, args.stream_interval)
            uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
        else:
            from .serving_workers import WORKER_SETTINGS, EngineServer

            engine_server = EngineServer(engine)
            engine_server.start()
            settings = {
                "checkpoint": str(checkpoint),
                "model_name": model_name,
                "stream_interval": args.stream_interval,
            }
            os.environ[WORKER_SETTINGS] = engine_server.worker_settings(**settings)
            try:
                uvicorn.run(
                    "fastgpt_hf.serving_workers:worker_app",
                    factory=True,
                    workers=args.http_workers,
                    host=args.host,
                    port=args.port,
                    log_level="warning",
                )
            finally:
                engine_server.close()
    finally:
        engine.stop()
