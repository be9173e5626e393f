"""`fastgpt serve` as a user runs it: a subprocess on 127.0.0.1, called through the `openai` client and `httpx`.

Concurrent requests each get what `generate()` gives their prompt alone, streaming gives the same text as not
streaming, a closed stream frees its row, a full queue answers 429, and bad requests get a 4xx with a message."""

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fastgpt_hf.data import load_tokenizer

from .conftest import tiny_model

httpx = pytest.importorskip("httpx", reason="the serve extra (pip install fastgpt_hf[serve])")
openai = pytest.importorskip("openai", reason="the serve extra (pip install fastgpt_hf[serve])")
# Starting the server (a fresh Python importing torch and Transformers) takes ~20 s on 2 busy cores.
pytestmark = pytest.mark.slow

ROWS, QUEUE, CONTEXT = 3, 2, 1024
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
PROMPTS = [" The game", " In 1998 the band", " = Robert Boulter = \n", " A", " The ship was built in"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    tokenizer = load_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    model = tiny_model("mixed", vocab_size=len(tokenizer))  # float64: batched and alone agree to the last bit
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


@pytest.fixture(scope="module", params=[1, 2], ids=["one process", "two HTTP worker processes"])
def server(checkpoint, tmp_path_factory, request):
    """The base URL of `fastgpt serve` on a free port, with ROWS rows and a queue of QUEUE; the HTTP layer in the
    engine's process, or in two worker processes of its own (`--http-workers 2`: every test holds for both)."""
    folder = checkpoint[0]
    port = free_port()
    script = "import sys; from fastgpt_console import main; sys.argv[0] = 'fastgpt'; sys.exit(main())"
    options = ["--port", str(port), "--rows", str(ROWS), "--max-queue", str(QUEUE), "--context", str(CONTEXT)]
    options += ["--http-workers", str(request.param)]
    log = open(tmp_path_factory.mktemp("log") / "serve.log", "w+")  # noqa: SIM115 (closed at teardown)
    process = subprocess.Popen([sys.executable, "-c", script, "serve", str(folder), *options], stdout=log, stderr=log)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{base_url}/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            pytest.fail(f"fastgpt serve did not start:\n{log.read()}")
        time.sleep(0.5)
    yield base_url
    process.terminate()
    process.wait(timeout=30)
    log.close()


def client(base_url: str) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def greedy_text(checkpoint, prompt_ids: list[int], new_tokens: int) -> str:
    _, model, tokenizer = checkpoint
    output = model.generate(torch.tensor([prompt_ids]), max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(output[0, len(prompt_ids) :], skip_special_tokens=True)


def test_models_and_health(server, checkpoint):
    assert [model.id for model in client(server).models.list().data] == [checkpoint[0].name]
    assert httpx.get(f"{server}/health").json() == {"status": "ok", "active_rows": 0, "free_rows": ROWS, "waiting": 0}


def test_concurrent_completions_each_equal_generate_alone(server, checkpoint):
    name, tokenizer = checkpoint[0].name, checkpoint[2]
    lengths = [12, 5, 9, 16, 7]

    def complete(index: int) -> str:
        reply = client(server).completions.create(
            model=name, prompt=PROMPTS[index], max_tokens=lengths[index], temperature=0
        )
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens == lengths[index]
        return reply.choices[0].text

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        texts = list(pool.map(complete, range(len(PROMPTS))))
    for prompt, length, text in zip(PROMPTS, lengths, texts, strict=True):
        assert text == greedy_text(checkpoint, tokenizer(prompt).input_ids, length), prompt


def test_chat_uses_the_chat_template_and_streaming_gives_the_same_text(server, checkpoint):
    name, tokenizer = checkpoint[0].name, checkpoint[2]
    messages = [{"role": "user", "content": "Who built the ship?"}]
    chat = client(server).chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0)
    prompt_ids = tokenizer("user: Who built the ship?\nassistant:", add_special_tokens=False).input_ids
    assert chat.choices[0].message.content == greedy_text(checkpoint, prompt_ids, 10)
    stream = client(server).chat.completions.create(
        model=name, messages=messages, max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    completion_stream = client(server).completions.create(
        model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].text for chunk in completion_stream)
    assert streamed == greedy_text(checkpoint, tokenizer(PROMPTS[0]).input_ids, 12)


def test_stop_strings_and_seeds(server, checkpoint):
    openai_client, name = client(server), checkpoint[0].name
    full = openai_client.completions.create(model=name, prompt=PROMPTS[1], max_tokens=16, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    for stream in (False, True):
        reply = openai_client.completions.create(
            model=name, prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop], stream=stream
        )
        choices = [chunk.choices[0] for chunk in reply] if stream else reply.choices
        assert "".join(choice.text for choice in choices) == text[: text.find(stop)]
        assert choices[-1].finish_reason == "stop"
    sampled = [
        openai_client.completions.create(model=name, prompt=PROMPTS[2], max_tokens=12, temperature=1.2, seed=seed)
        for seed in (5, 5, 6)
    ]
    assert sampled[0].choices[0].text == sampled[1].choices[0].text != sampled[2].choices[0].text


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"max_tokens": 4}, 400, "prompt: Field required"),
        ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": 4, "model": "llama"}, 404, "'llama' is not served here"),
        ({"prompt": "x", "max_tokens": 4, "n": 2}, 400, "n must be 1"),
        ({"prompt": "x", "max_tokens": 4, "temperature": -1}, 400, "temperature must be 0"),
        ({"prompt": "x", "max_tokens": CONTEXT}, 400, f"context is {CONTEXT} tokens"),
        ({"prompt": " the" * CONTEXT, "max_tokens": 1}, 400, "shorten the prompt"),
        ({"prompt": "x", "max_tokens": 4, "stop": ["."]}, 200, None),
        ({"prompt": "x", "max_tokens": 4, "stop": [".", ""]}, 400, "A stop string is empty"),
        ({"prompt": "x", "max_tokens": 0}, 400, "must be at least 1"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "must be at least 1"),
        ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, 400, "must be at least 1"),
    ],
    ids=[
        "no-prompt",
        "bad-type",
        "other-model",
        "n",
        "temperature",
        "too-long-reply",
        "too-long-prompt",
        "stop",
        "empty-stop",
        "no-tokens",
        "chat-no-tokens",
        "chat-no-completion-tokens",
    ],
)
def test_bad_requests_get_a_4xx_with_a_message(server, body, status, message):
    endpoint = "chat/completions" if "messages" in body else "completions"
    response = httpx.post(f"{server}/v1/{endpoint}", json=body, timeout=60)
    assert response.status_code == status
    if message is not None:
        assert message in response.json()["error"]["message"]


def wait_for_load(base_url: str, **expected: int) -> dict:
    deadline = time.monotonic() + 60
    while True:
        load = httpx.get(f"{base_url}/health").json()
        if all(load[key] == value for key, value in expected.items()) or time.monotonic() > deadline:
            return load
        time.sleep(0.1)


def test_closed_streams_free_their_rows_and_a_full_queue_answers_429(server):
    body = {"prompt": " The game", "max_tokens": CONTEXT - 8, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server, timeout=60) as http, ThreadPoolExecutor(QUEUE) as pool:
        streams = [http.stream("POST", "/v1/completions", json=body) for _ in range(ROWS)]
        # Kept: a line iterator that is dropped closes its response.
        lines = [stream.__enter__().iter_lines() for stream in streams]
        for stream_lines in lines:
            assert json.loads(next(stream_lines).removeprefix("data: "))["choices"][0]["text"]
        short = {"prompt": " A", "max_tokens": 3, "temperature": 0}
        queued = [pool.submit(httpx.post, f"{server}/v1/completions", json=short, timeout=60) for _ in range(QUEUE)]
        assert wait_for_load(server, waiting=QUEUE) == {
            "status": "ok",
            "active_rows": ROWS,
            "free_rows": 0,
            "waiting": QUEUE,
        }
        overload = http.post("/v1/completions", json=short)
        assert overload.status_code == 429
        assert "2 requests already wait" in overload.json()["error"]["message"]
        for stream in streams:
            stream.__exit__(None, None, None)
        assert [future.result().status_code for future in queued] == [200] * QUEUE
    assert wait_for_load(server, active_rows=0) == {"status": "ok", "active_rows": 0, "free_rows": ROWS, "waiting": 0}


@pytest.mark.parametrize(
    "options, device, compiled, http_workers",
    [
        ([], "cpu", False, 1),
        ([], "cuda", True, 4),
        ([], "cuda:1", True, 4),
        (["--no-compile", "--http-workers", "1"], "cuda", False, 1),
        (["--compile", "--http-workers", "2"], "cpu", True, 2),
    ],
)
def test_serve_defaults_are_the_measured_fast_setting_on_cuda_and_eager_on_the_cpu(
    options, device, compiled, http_workers
):
    """Left out, --compile and --http-workers take what RESULTS.md measured fastest on CUDA, and on the CPU the
    eager engine in one process; given, they are kept."""
    from fastgpt_hf.serving_http import device_defaults, serve_parser

    args = device_defaults(serve_parser().parse_args(["folder", *options]), device)
    assert (args.compile, args.http_workers) == (compiled, http_workers)
