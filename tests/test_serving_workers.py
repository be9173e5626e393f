"""`serving_workers` in process: the two ends of `fastgpt serve --http-workers` when the other end goes away. (The
HTTP behaviour with worker processes is tested end to end in `test_serving_http`.)"""

import asyncio
import json
import os
import socket
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener

import pytest

from fastgpt_hf.serving import ContinuousBatchingEngine, EngineStopped, SamplingParams
from fastgpt_hf.serving_workers import EngineServer, RemoteEngine

from .conftest import tiny_model
from .test_serving import random_prompts


def test_a_worker_that_goes_away_frees_the_rows_of_its_requests():
    engine = ContinuousBatchingEngine(tiny_model("mixed"), max_rows=1, max_cache_len=64)
    server = EngineServer(engine)
    server.start()
    settings = json.loads(server.worker_settings())
    remote = RemoteEngine((settings["host"], settings["port"]), bytes.fromhex(settings["authkey"]), 64)

    async def submit_then_leave() -> None:
        await remote.submit(random_prompts([9])[0], SamplingParams(40, temperature=0), lambda event: None)
        engine.step()  # the request takes the row
        assert engine.load()["active_rows"] == 1
        # The worker process ends: its end of the connection shuts (a close under the blocked reader would not).
        socket.socket(fileno=os.dup(remote.connection.fileno())).shutdown(socket.SHUT_RDWR)

    asyncio.run(submit_then_leave())
    deadline = time.monotonic() + 10
    while not engine.row_requests[0].cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    engine.step()
    assert engine.load() == {"active_rows": 0, "free_rows": 1, "waiting": 0}


def test_a_submit_given_up_before_its_answer_is_cancelled_and_a_wrong_key_is_refused_alone():
    engine = ContinuousBatchingEngine(tiny_model("mixed"), max_rows=1, max_cache_len=64)
    server = EngineServer(engine)
    server.start()
    settings = json.loads(server.worker_settings())
    address = (settings["host"], settings["port"])
    with pytest.raises(AuthenticationError):
        Client(address, authkey=b"x" * 32)
    remote = RemoteEngine(address, bytes.fromhex(settings["authkey"]), 64)  # still accepted after the refusal

    async def submit_then_give_up() -> None:
        prompt = random_prompts([9])[0]
        submitted = asyncio.ensure_future(remote.submit(prompt, SamplingParams(40, temperature=0), lambda event: None))
        await asyncio.sleep(0)  # the submit is sent; its answer cannot have been handled yet
        submitted.cancel()  # as when the client disconnects first
        with pytest.raises(asyncio.CancelledError):
            await submitted

    asyncio.run(submit_then_give_up())
    deadline = time.monotonic() + 10
    while not (engine.waiting and engine.waiting[0].cancelled) and time.monotonic() < deadline:
        time.sleep(0.05)
    engine.step()
    assert engine.load() == {"active_rows": 0, "free_rows": 1, "waiting": 0}
    server.close()


def test_an_engine_that_goes_away_ends_the_replies_and_refuses_what_waits():
    authkey = b"k" * 32
    with Listener(("127.0.0.1", 0), authkey=authkey) as listener:
        accepted = []
        acceptor = threading.Thread(target=lambda: accepted.append(listener.accept()))
        acceptor.start()  # the connection's handshake needs both ends
        remote = RemoteEngine(listener.address, authkey, 64)
        acceptor.join()
    (serving_end,) = accepted

    async def scenario() -> None:
        events = []
        submitted = asyncio.ensure_future(remote.submit([1, 2, 3], SamplingParams(4), events.append))
        _, key, *_ = await asyncio.to_thread(serving_end.recv)
        serving_end.send([("accepted", key)])
        request = await submitted
        status = asyncio.ensure_future(remote.status())
        await asyncio.to_thread(serving_end.recv)
        serving_end.close()  # the serving process is gone before answering
        with pytest.raises(EngineStopped, match="engine is gone"):
            await status
        assert [(event.finish_reason, event.error) for event in events] == [
            ("error", "the serving process's engine is gone")
        ]
        assert request.finished

    asyncio.run(scenario())
