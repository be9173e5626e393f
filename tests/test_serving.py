"""Continuous batching (`serving`): every request gets the tokens `generate()` gives its prompt alone, rows are
reused after a reply ends or is cancelled, and requests the engine cannot serve are refused with a reason."""

import json
import time

import pytest
import torch

from fastgpt_hf.serving import ContinuousBatchingEngine, EngineOverloaded, EngineStopped, SamplingParams

from .conftest import tiny_model


def random_prompts(lengths: list[int], vocab_size: int = 128, seed: int = 3) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (length,), generator=generator).tolist() for length in lengths]


def run_to_completion(engine: ContinuousBatchingEngine) -> int:
    steps = 0
    while engine.step():
        steps += 1
    return steps


def greedy_reference(model, prompt: list[int], new_tokens: int) -> list[int]:
    input_ids = torch.tensor([prompt], device=model.device)
    return model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False)[0, len(prompt) :].tolist()


def test_each_request_gets_what_generate_gives_its_prompt_alone():
    # 3 rows for 6 requests of different lengths: rows are refilled mid-flight, prompts and replies cross the
    # windows (8, 16) and blocks (4), and a row's neighbours are at other positions.
    model = tiny_model("mixed")
    engine = ContinuousBatchingEngine(model, max_rows=3, max_cache_len=48, max_queue=8)
    prompts = random_prompts([5, 23, 9, 17, 2, 30])
    new_tokens = [20, 14, 12, 3, 9, 1]
    replies = {index: [] for index in range(len(prompts))}
    for index, (prompt, count) in enumerate(zip(prompts, new_tokens, strict=True)):
        params = SamplingParams(max_new_tokens=count, temperature=0)
        engine.submit(prompt, params, lambda event, index=index: replies[index].append(event))
    run_to_completion(engine)
    for index, (prompt, count) in enumerate(zip(prompts, new_tokens, strict=True)):
        assert [event.token_id for event in replies[index]] == greedy_reference(model, prompt, count), index
        assert [event.finish_reason for event in replies[index]] == [None] * (count - 1) + ["length"]
    assert engine.load() == {"active_rows": 0, "free_rows": 3, "waiting": 0}


def test_a_model_with_sinks_gets_generate_tokens_and_a_reused_row_forgets_the_sinks_before():
    # Attention sinks (3) in the rows: prompts of 9 and 30 tokens are prefilled together (rows 0 and 1), then the
    # 2-token prompt takes row 1 after the 30-token reply (its sinks long out of the window), with fewer real tokens
    # than sinks (its decode steps write the third), and the 5-token one row 0; every reply runs past both windows.
    model = tiny_model("mixed", num_sink_tokens=3)
    engine = ContinuousBatchingEngine(model, max_rows=2, max_cache_len=48, max_queue=4)
    prompts = random_prompts([30, 9, 2, 5], seed=7)
    new_tokens = [10, 20, 24, 15]
    replies = {index: [] for index in range(len(prompts))}
    for index, (prompt, count) in enumerate(zip(prompts, new_tokens, strict=True)):
        engine.submit(prompt, SamplingParams(count, temperature=0), replies[index].append)
    run_to_completion(engine)
    for index, (prompt, count) in enumerate(zip(prompts, new_tokens, strict=True)):
        assert [event.token_id for event in replies[index]] == greedy_reference(model, prompt, count), index


def test_waiting_prompts_are_prefilled_together_left_padded():
    # 9 prompts of lengths 6 to 30 into 9 free rows, at most 4 a batch (max_prefill_batch=5 rounds down to a power
    # of two): shortest first in batches of 4, 4 and 1, each left-padded to its longest prompt: three prefill
    # forwards, not nine. Each reply is still what generate() gives its prompt alone, across the windows (8, 16)
    # and blocks (4), though the padding shifts the real tokens' slots.
    model = tiny_model("mixed")
    engine = ContinuousBatchingEngine(model, max_rows=9, max_cache_len=40, max_queue=4, max_prefill_batch=5)
    prompts = random_prompts([11, 6, 30, 11, 17, 7, 9, 23, 12], seed=5)
    replies = {index: [] for index in range(len(prompts))}
    for index, prompt in enumerate(prompts):
        engine.submit(prompt, SamplingParams(7, temperature=0), replies[index].append)
    prefill_batches = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: prefill_batches.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    with torch.inference_mode():  # as in step()
        engine.admit_waiting_requests()
    handle.remove()
    assert prefill_batches == [(4, 11), (4, 23), (1, 30)]
    run_to_completion(engine)
    for index, prompt in enumerate(prompts):
        assert [event.token_id for event in replies[index]] == greedy_reference(model, prompt, 7), index


def test_a_cancelled_request_frees_its_row_for_the_next_one():
    model = tiny_model("mixed")
    engine = ContinuousBatchingEngine(model, max_rows=1, max_cache_len=64, max_queue=2)
    first, second = random_prompts([12, 7])
    first_tokens, second_tokens = [], []
    first_request = engine.submit(first, SamplingParams(40, temperature=0), first_tokens.append)
    engine.submit(second, SamplingParams(10, temperature=0), second_tokens.append)
    for _ in range(5):
        engine.step()
    assert engine.load() == {"active_rows": 1, "free_rows": 0, "waiting": 1}
    engine.cancel(first_request)
    run_to_completion(engine)
    assert len(first_tokens) == 6  # the prefill's token and one per step before the cancel
    assert [event.token_id for event in second_tokens] == greedy_reference(model, second, 10)


def test_a_request_cancelled_during_a_decode_step_gets_no_token_from_it():
    # The HTTP side cancels from another thread, possibly while a step runs: that step's token is dropped, also when
    # the cancelled request held the only busy row (an empty set of rows once failed with a dtype error).
    model = tiny_model("mixed")
    engine = ContinuousBatchingEngine(model, max_rows=2, max_cache_len=64)
    tokens = []
    request = engine.submit(random_prompts([9])[0], SamplingParams(40, temperature=0), tokens.append)
    engine.step()  # the prefill's token, then one decode step's
    handle = model.register_forward_pre_hook(lambda module, args: engine.cancel(request))
    engine.step()
    handle.remove()
    assert len(tokens) == 2
    assert not engine.step()
    assert engine.load() == {"active_rows": 0, "free_rows": 2, "waiting": 0}


def test_end_of_sequence_ends_a_reply_and_seeded_sampling_repeats():
    model = tiny_model("mixed")
    prompt = random_prompts([10])[0]
    greedy = greedy_reference(model, prompt, 8)
    engine = ContinuousBatchingEngine(model, max_rows=2, max_cache_len=32, eos_token_ids=[greedy[3]])
    replies = [[], [], [], []]
    engine.submit(prompt, SamplingParams(8, temperature=0), replies[0].append)
    for reply, seed in zip(replies[1:], (7, 7, 8), strict=True):
        engine.submit(prompt, SamplingParams(12, temperature=1.5, top_p=0.9, seed=seed), reply.append)
    run_to_completion(engine)
    assert [event.token_id for event in replies[0]] == greedy[: greedy.index(greedy[3]) + 1]
    assert replies[0][-1].finish_reason == "stop"
    assert replies[1] == replies[2]
    assert replies[1] != replies[3]


def test_requests_it_cannot_serve_are_refused_with_the_reason():
    engine = ContinuousBatchingEngine(tiny_model("mixed"), max_rows=1, max_cache_len=32, max_queue=1)
    ignore = lambda event: None  # noqa: E731
    with pytest.raises(ValueError, match=r"context is 32 tokens, but the request needs 40 \(30 in the prompt, 10"):
        engine.submit([1] * 30, SamplingParams(10), ignore)
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.submit([], SamplingParams(10), ignore)
    with pytest.raises(ValueError, match="top_p must be in"):
        engine.submit([1], SamplingParams(4, top_p=0), ignore)
    vocab_size = engine.model.config.vocab_size
    with pytest.raises(ValueError, match=f"Token id {vocab_size} at position 1 .* outside the model's vocabulary"):
        engine.submit([1, vocab_size], SamplingParams(4), ignore)
    with pytest.raises(ValueError, match="Token id -1 at position 0"):
        engine.submit([-1], SamplingParams(4), ignore)
    with pytest.raises(ValueError, match=r"max_new_tokens \(HTTP: max_tokens\) must be at least 1"):
        engine.submit([1], SamplingParams(0), ignore)
    engine.submit([1], SamplingParams(4), ignore)
    engine.submit([1], SamplingParams(4), ignore)
    with pytest.raises(EngineOverloaded, match="All 1 rows are busy and 1 requests already wait"):
        engine.submit([1], SamplingParams(4), ignore)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ContinuousBatchingEngine(tiny_model("mixed", max_position_embeddings=16), max_cache_len=32)


def test_a_bad_request_leaves_the_others_served_and_a_stopped_engine_refuses_new_ones():
    model = tiny_model("mixed")
    engine = ContinuousBatchingEngine(model, max_rows=2, max_cache_len=32)
    events = []
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        engine.submit([1, 2, model.config.vocab_size + 5], SamplingParams(3, temperature=0), events.append)
    engine.submit([1, 2, 3], SamplingParams(3, temperature=0), events.append)
    engine.start()
    deadline = time.monotonic() + 60
    while not (events and events[-1].finish_reason) and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.stop()
    assert [event.finish_reason for event in events] == [None, None, "length"] and engine.fatal_error is None
    with pytest.raises(EngineStopped, match="engine was stopped"):
        engine.submit([1, 2, 3], SamplingParams(3), events.append)


@pytest.mark.slow  # compiling the decode step and two prefills takes a few minutes on 2 busy cores
def test_the_compiled_steps_serve_every_request_without_recompiling():
    model = tiny_model("mixed", dtype=torch.float32)
    engine = ContinuousBatchingEngine(model, max_rows=8, max_cache_len=48, compile_decode=True, compile_prefill=True)
    prompts = random_prompts([5, 23, 9, 17, 30, 11, 2, 26, 14, 8])
    replies = {index: [] for index in range(len(prompts))}

    def submit(indices: range) -> None:
        for index in indices:
            params = SamplingParams(max_new_tokens=12, temperature=0)
            engine.submit(prompts[index], params, lambda event, index=index: replies[index].append(event.token_id))

    # Every prefill runs 48 positions (the bucket is capped at max_cache_len). Batches of 2 (one prompt, padded)
    # then 4 (three prompts): the batch dimension turns dynamic at its second size; the decode step compiles once.
    submit(range(1))
    run_to_completion(engine)
    submit(range(1, 4))
    run_to_completion(engine)
    # A batch of 8 (five prompts) and rows joining and leaving between steps: nothing compiles again.
    with torch._dynamo.config.patch(error_on_recompile=True):
        submit(range(4, 9))
        engine.step()
        submit(range(9, 10))
        run_to_completion(engine)
    for index, prompt in enumerate(prompts):
        assert replies[index] == greedy_reference(model, prompt, 12), index


def test_a_compiled_prefill_runs_its_fixed_batch_at_a_bucketed_length():
    engine = ContinuousBatchingEngine(tiny_model("mixed"), max_rows=8, max_cache_len=200, max_prefill_batch=4)
    engine.compile_prefill = True  # the shapes alone: no compilation
    assert [engine.prefill_length(n) for n in (1, 64, 65, 128, 129, 200)] == [64, 64, 128, 128, 200, 200]
    assert [engine.prefill_batch_size(n) for n in (1, 2, 3, 4)] == [2, 2, 4, 4]
    shapes = []
    handle = engine.model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    with torch.inference_mode():
        logits = engine.prefill([5, 2, 7], random_prompts([9, 70, 3]))
    handle.remove()
    assert shapes == [(4, 1), (4, 128)] and logits.shape[0] == 3  # the new cache's allocation, then the prefill
    assert [engine.rows.row_lengths[row] for row in (5, 2, 7)] == [9, 70, 3]


def test_chat_without_a_chat_template_is_a_400_that_says_what_to_do():
    testclient = pytest.importorskip("fastapi.testclient", reason="the serve extra (pip install fastgpt_hf[serve])")
    from fastgpt_hf.data import load_tokenizer
    from fastgpt_hf.serving_http import build_app

    tokenizer = load_tokenizer()
    engine = ContinuousBatchingEngine(tiny_model("mixed", vocab_size=len(tokenizer)), max_rows=1, max_cache_len=16)
    http = testclient.TestClient(build_app(engine, tokenizer, "tiny"))
    response = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert response.status_code == 400
    assert "no chat template" in response.json()["error"]["message"]


def test_a_stream_interval_sends_fewer_pieces_of_the_same_text():
    testclient = pytest.importorskip("fastapi.testclient", reason="the serve extra (pip install fastgpt_hf[serve])")
    from fastgpt_hf.data import load_tokenizer
    from fastgpt_hf.serving_http import build_app

    tokenizer = load_tokenizer()
    model = tiny_model("mixed", vocab_size=len(tokenizer))
    body = {"prompt": " The game", "max_tokens": 13, "temperature": 0}
    texts, pieces = {}, {}
    for interval in (1, 4):
        engine = ContinuousBatchingEngine(model, max_rows=1, max_cache_len=32)
        engine.start()
        try:
            with testclient.TestClient(build_app(engine, tokenizer, "tiny", stream_interval=interval)) as http:
                whole = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
                with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                    lines = [line for line in response.iter_lines() if line.startswith("data: {")]
        finally:
            engine.stop()
        chunks = [json.loads(line.removeprefix("data: "))["choices"][0]["text"] for line in lines]
        texts[interval], pieces[interval] = whole, [chunk for chunk in chunks if chunk]
        assert "".join(chunks) == whole
    assert texts[1] == texts[4]
    # One row, so one token per event: the first token alone, then 4 a piece (12 = 3 x 4); a piece whose text is
    # held back (an incomplete character) can only merge into the next.
    assert len(pieces[4]) <= 4 < len(pieces[1])
