"""`fastgpt serve --http-workers N`: the HTTP layer in N processes of its own, the engine in the serving process.

With one process, the HTTP work (parsing requests, tokenizing prompts, a server-sent event per piece of text) and
the engine's scheduler share one interpreter, and on a GPU the HTTP side is what bounds the requests per second
(benchmarks/RESULTS.md, "serve": the engine alone serves several times what the server does). Here uvicorn runs N
worker processes (its own `workers=`, which share the listening socket), each with the app of `serving_http` over a
`RemoteEngine`; the serving process keeps the model, the `ContinuousBatchingEngine` and an `EngineServer` that the
workers reach through `multiprocessing.connection` on 127.0.0.1 (a random port and a random key, passed to the
workers in their environment).

The protocol, pickled tuples: a worker sends ("submit", key, prompt_ids, params), ("cancel", key) and
("status", key); the serving process answers in batches (one message holds what came since the last, under load a
decode step's tokens for all of that worker's rows) of ("accepted", key), ("refused", key, kind, message),
("event", key, TokenEvent) and ("status", key, fatal_error, load). A refusal is raised in the worker as the engine
raised it (ValueError: 400, EngineOverloaded: 429, EngineStopped: 503). A worker that goes away has its requests
cancelled.
"""

import asyncio
import itertools
import json
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener

from .serving import ContinuousBatchingEngine, EngineOverloaded, EngineStopped, SamplingParams, TokenEvent

# The environment variable that hands a worker process what it needs (`worker_app`).
WORKER_SETTINGS = "FASTGPT_SERVE_WORKER"
REFUSALS = {"value": ValueError, "overloaded": EngineOverloaded, "stopped": EngineStopped}


class WorkerLink:
    """The serving process's side of one worker's connection: a thread receiving its messages, one sending the
    answers in batches."""

    def __init__(self, engine: ContinuousBatchingEngine, connection: Connection):
        self.engine, self.connection = engine, connection
        self.outbox: list[tuple] = []
        self.ready = threading.Condition()
        self.requests: dict[int, object] = {}
        self.closed = False
        threading.Thread(target=self.receive, name="fastgpt-link-in", daemon=True).start()
        threading.Thread(target=self.send, name="fastgpt-link-out", daemon=True).start()

    def post(self, message: tuple) -> None:
        with self.ready:
            self.outbox.append(message)
            self.ready.notify()

    def receive(self) -> None:
        try:
            while True:
                kind, key, *rest = self.connection.recv()
                if kind == "submit":
                    self.submit(key, *rest)
                elif kind == "cancel" and key in self.requests:
                    self.engine.cancel(self.requests[key])
                elif kind == "status":
                    self.post(("status", key, self.engine.fatal_error, self.engine.load()))
        except (EOFError, OSError):  # the worker went away: its requests free their rows
            for request in list(self.requests.values()):
                self.engine.cancel(request)
            with self.ready:
                self.closed = True
                self.ready.notify()
            self.connection.close()

    def submit(self, key: int, prompt_ids: list[int], params: SamplingParams) -> None:
        def emit(event: TokenEvent) -> None:
            if event.finish_reason is not None:
                self.requests.pop(key, None)
            self.post(("event", key, event))

        try:
            request = self.engine.submit(prompt_ids, params, emit)
        except tuple(REFUSALS.values()) as error:
            kind = next(name for name, refusal in REFUSALS.items() if isinstance(error, refusal))
            self.post(("refused", key, kind, str(error)))
            return
        if not request.finished:
            self.requests[key] = request
        self.post(("accepted", key))

    def send(self) -> None:
        while True:
            with self.ready:
                while not self.outbox and not self.closed:
                    self.ready.wait()
                if self.closed:
                    return
                batch, self.outbox = self.outbox, []
            try:
                self.connection.send(batch)
            except OSError:
                return


class EngineServer:
    """Accepts worker connections on 127.0.0.1 (a free port, a random key) and links each to the engine."""

    def __init__(self, engine: ContinuousBatchingEngine):
        self.engine = engine
        self.authkey = secrets.token_bytes(32)
        self.listener = Listener(("127.0.0.1", 0), authkey=self.authkey)

    def start(self) -> None:
        threading.Thread(target=self.accept, name="fastgpt-engine-server", daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                WorkerLink(self.engine, self.listener.accept())
            except AuthenticationError:  # a connection without the key: refused, the others still served
                continue
            except OSError:  # closed
                return

    def close(self) -> None:
        """Stop accepting workers (the accepting thread ends)."""
        self.listener.close()

    def worker_settings(self, **app_settings) -> str:
        """The JSON a worker reads from `WORKER_SETTINGS`: where the engine listens, its key, and `app_settings`
        (checkpoint, model_name, stream_interval)."""
        host, port = self.listener.address
        settings = {
            "host": host,
            "port": port,
            "authkey": self.authkey.hex(),
            "max_cache_len": self.engine.max_cache_len,
        }
        return json.dumps({**settings, **app_settings})


@dataclass(eq=False)
class RemoteRequest:
    """A request of this worker in the serving process's engine; `deliver` takes its events on the event loop."""

    key: int
    deliver: Callable[[TokenEvent], None]
    finished: bool = False


class RemoteEngine:
    """The engine of the serving process, as a worker's app uses it (the interface of `serving_http.LocalEngine`).
    A thread receives the serving process's batches and hands them to the event loop in one call each."""

    def __init__(self, address: tuple[str, int], authkey: bytes, max_cache_len: int):
        self.connection = Client(address, authkey=authkey)
        self.max_cache_len = max_cache_len
        self.send_lock = threading.Lock()
        self.keys = itertools.count()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.requests: dict[int, RemoteRequest] = {}  # until their last event
        self.answers: dict[int, asyncio.Future] = {}

    def attach(self) -> asyncio.AbstractEventLoop:
        """The running event loop, on which the receiving thread starts the first time."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
            threading.Thread(target=self.receive, name="fastgpt-remote-engine", daemon=True).start()
        return self.loop

    def send(self, message: tuple) -> None:
        with self.send_lock:
            self.connection.send(message)

    def new_answer(self) -> tuple[int, asyncio.Future]:
        """A new key and the future its answer resolves (in a coroutine: on the running loop)."""
        key = next(self.keys)
        self.answers[key] = answer = self.attach().create_future()
        return key, answer

    async def submit(self, prompt_ids: list[int], params: SamplingParams, deliver) -> RemoteRequest:
        key, answer = self.new_answer()
        request = self.requests[key] = RemoteRequest(key, deliver)
        self.send(("submit", key, list(prompt_ids), params))
        try:
            await answer
        except BaseException as error:
            self.requests.pop(key, None)
            self.answers.pop(key, None)
            if isinstance(error, asyncio.CancelledError):  # the engine may accept it still: free its row then
                self.send(("cancel", key))
            raise
        return request

    def cancel(self, request: RemoteRequest) -> None:
        self.send(("cancel", request.key))

    async def status(self) -> tuple[str | None, dict[str, int]]:
        key, answer = self.new_answer()
        self.send(("status", key))
        return await answer

    def receive(self) -> None:
        gone = False
        while not gone:
            try:
                batch = self.connection.recv()
            except (EOFError, OSError):
                batch, gone = [("gone", None)], True
            try:
                self.loop.call_soon_threadsafe(self.handle, batch)
            except RuntimeError:  # the event loop is closed: this worker is shutting down, nobody waits
                return

    def handle(self, batch: list[tuple]) -> None:
        """On the event loop: answers resolve their futures, events reach their replies."""
        for kind, key, *rest in batch:
            if kind == "event":
                (event,) = rest
                request = self.requests.get(key)
                if request is None:
                    continue
                if event.finish_reason is not None:
                    request.finished = True
                    del self.requests[key]
                request.deliver(event)
            elif kind == "accepted":
                self.resolve(key, None)
            elif kind == "refused":
                refusal_kind, message = rest
                self.fail(key, REFUSALS[refusal_kind](message))
            elif kind == "status":
                self.resolve(key, tuple(rest))
            elif kind == "gone":
                self.engine_gone()

    def resolve(self, key: int, value) -> None:
        answer = self.answers.pop(key, None)
        if answer is not None and not answer.done():
            answer.set_result(value)

    def fail(self, key: int, error: BaseException) -> None:
        answer = self.answers.pop(key, None)
        if answer is not None and not answer.done():
            answer.set_exception(error)

    def engine_gone(self) -> None:
        """The serving process closed the connection: every waiting answer and reply ends with an error."""
        message = "the serving process's engine is gone"
        for key in list(self.answers):
            self.fail(key, EngineStopped(message))
        requests, self.requests = self.requests, {}
        for request in requests.values():
            request.finished = True  # nothing left to cancel
            request.deliver(TokenEvent(None, "error", message))


def worker_app():
    """uvicorn's app factory in a worker process: `serving_http.build_app` over a `RemoteEngine`."""
    from transformers import AutoTokenizer

    from .serving_http import build_app

    settings = json.loads(os.environ[WORKER_SETTINGS])
    engine = RemoteEngine(
        (settings["host"], settings["port"]), bytes.fromhex(settings["authkey"]), settings["max_cache_len"]
    )
    tokenizer = AutoTokenizer.from_pretrained(settings["checkpoint"])
    return build_app(engine, tokenizer, settings["model_name"], settings["stream_interval"])
