"""The HTTP server, live: uvicorn on 127.0.0.1 serving the embedded SmolLM2 model.

Clients are the official ``openai`` package and ``httpx``; the web page is driven by Playwright in
Debian's headless Chromium. Replies are greedy (or seeded) and short, and are compared with what
``Engine.generate`` gives for the same prompt alone. Only loopback traffic; every loop is bounded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import glmrun
from glmrun.api import GLMModel
from glmrun.engine import Engine, GenerationResult
from glmrun.sampling import SamplingParams

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
from glmrun.server import ServerSettings, create_app  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
HAS_GRADIO = importlib.util.find_spec("gradio") is not None
MAX_TOKENS = 16
# Questions whose solo greedy replies lead by > 0.05 logits at every step (checked below), far above
# the ~1e-5 by which batched float32 matmuls round differently from solo ones.
QUESTIONS = [
    "What is the capital of Japan?",
    "How many days are in a week?",
    "What color is the sky?",
    "What is the largest planet?",
    "What is the speed of light?",
    "Name a fruit that is yellow.",
    "What is the boiling point of water?",
    "What is the capital of France?",
]
ERROR_KEYS = {"message", "type", "param", "code"}


# A live server ------------------------------------------------------------------------------------
@contextlib.contextmanager
def live(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def model() -> Iterator[GLMModel]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 cores: one computes, one runs the event loop and the clients
    try:
        with glmrun.load(None, device="cpu", progress=False) as m:
            yield m
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine(model: GLMModel) -> Engine:
    assert model.engine is not None
    return model.engine


@pytest.fixture(scope="module")
def base(model: GLMModel) -> Iterator[str]:
    settings = ServerSettings(max_batch=16, max_queue=64, max_context=512, ui=HAS_GRADIO)
    with live(create_app(model, settings)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base: str) -> Any:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=180)


def chat_ids(engine: Engine, question: str, system: str | None = None) -> list[int]:
    messages = [{"role": "system", "content": system}] if system else []
    return engine.tokenizer.build_chat_ids([*messages, {"role": "user", "content": question}])  # type: ignore[list-item]


def greedy(max_tokens: int = MAX_TOKENS, **changes: Any) -> SamplingParams:
    return SamplingParams(do_sample=False, max_new_tokens=max_tokens, **changes)


@pytest.fixture(scope="module")
def solo(engine: Engine) -> dict[str, GenerationResult]:
    """Each question's greedy reply, generated alone by the engine (the reference for everything)."""
    return {q: engine.generate(chat_ids(engine, q), greedy()) for q in QUESTIONS}


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    return body["error"]


def sse_events(lines: Iterator[str]) -> Iterator[str]:
    for line in lines:
        if line.startswith("data: "):
            yield line[len("data: ") :]


def stats(base: str) -> dict[str, Any]:
    return httpx.get(f"{base}/health", timeout=30).json()


def scheduler_finished(base: str, reason: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    match = re.search(rf'^glmrun_scheduler_finished_total{{reason="{reason}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def wait_idle(base: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        s = stats(base)
        if s["running"] == 0 and s["waiting"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"the server is still busy after {seconds} s: {stats(base)}")


# Import and startup --------------------------------------------------------------------------------
def test_serve_command_is_light_and_binds_to_loopback() -> None:
    code = (
        "import argparse, sys; import glmrun.server.cli as c; "
        "assert not {'fastapi', 'uvicorn', 'gradio', 'torch'} & set(sys.modules), sorted(sys.modules); "
        "p = argparse.ArgumentParser(); c.add_parser(p.add_subparsers()); "
        "a = p.parse_args(['serve']); print(a.host, a.port, a.max_batch, a.max_queue, a.api_key, a.ui, a.func is c.run)"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["127.0.0.1", "8000", "8", "64", "None", "True", "True"]


def test_glmrun_serve_serves_until_interrupted(tmp_path: Path) -> None:
    from glmrun.checkpoint import PRESETS, write_random_checkpoint

    tokenizer = Path(__file__).resolve().parents[1].parent / "shared/tokenizers/chatglm2/tokenizer.model"
    if not tokenizer.is_file():
        pytest.skip(f"the ChatGLM2 tokenizer is not at {tokenizer}")
    folder = write_random_checkpoint(tmp_path / "tiny", PRESETS["tiny"], tokenizer_path=tokenizer)  # loads in a blink
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    code = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); import glmrun.cli as c; "
        "c._COMMANDS.setdefault('serve', 'glmrun.server.cli'); sys.exit(c.main(sys.argv[1:]))"
    )
    argv = ["serve", "--model", str(folder), "--port", str(port), "--no-ui", "--max-batch", "2", "--max-context", "256"]
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, "glmrun serve did not come up"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert reply.usage.completion_tokens == 2
        proc.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down gracefully and the scheduler closes
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert "Application shutdown complete" in stderr
    assert f"serving tiny at http://127.0.0.1:{port}" in stderr


def test_create_app_starts_nothing_until_served(model: GLMModel) -> None:
    app = create_app(model, ServerSettings(ui=False, max_context=64))
    assert app.state.service.scheduler is None  # no thread, no KV cache before the lifespan starts
    with live(app) as url:
        assert app.state.service.scheduler is not None and stats(url)["status"] == "ok"
    assert app.state.service.scheduler is None


# OpenAI API --------------------------------------------------------------------------------------
def test_models_lists_the_real_model(client: Any, model: GLMModel, base: str) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [model.model_id] == ["SmolLM2-135M-Instruct.Q4_1"]
    assert client.models.retrieve(model.model_id).id == model.model_id
    error_of(httpx.get(f"{base}/v1/models/gpt-4", timeout=30), 404)


def test_chat_completion_with_a_system_message(client: Any, engine: Engine, model: GLMModel) -> None:
    system, question = "You are a pirate. Answer like one.", "What is the capital of France?"
    expected = engine.generate(chat_ids(engine, question, system), greedy())
    reply = client.chat.completions.create(
        model=model.model_id,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert reply.object == "chat.completion" and reply.model == model.model_id
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert reply.usage.prompt_tokens == len(chat_ids(engine, question, system))
    assert reply.usage.prompt_tokens != len(chat_ids(engine, question))  # the system message is in the prompt
    assert reply.usage.completion_tokens == expected.completion_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_stream_equals_the_solo_reply(
    client: Any, model: GLMModel, solo: dict[str, GenerationResult], base: str
) -> None:
    question = QUESTIONS[2]
    stream = client.chat.completions.create(
        model=model.model_id,
        messages=[{"role": "user", "content": question}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, used = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            used = chunk.usage
    ref = solo[question]
    assert "".join(pieces) == ref.text and len([p for p in pieces if p]) > 3  # it came in pieces
    assert finish == "length" and used is not None and used.completion_tokens == MAX_TOKENS
    # On the wire: Server-Sent Events, the last one [DONE].
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


def test_completions_stream_and_not(client: Any, engine: Engine, model: GLMModel) -> None:
    prompt = "The three primary colors are"
    expected = engine.generate(engine.tokenizer.encode(prompt, add_special_tokens=True), greedy(12))
    reply = client.completions.create(model=model.model_id, prompt=prompt, max_tokens=12, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 12
    streamed = client.completions.create(model=model.model_id, prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected.text
    default = client.completions.create(model=model.model_id, prompt=prompt, temperature=0)
    assert default.usage.completion_tokens <= 16  # OpenAI's default max_tokens for completions


def test_stop_seed_temperature_and_top_p_are_honoured(
    client: Any, engine: Engine, model: GLMModel, solo: dict[str, GenerationResult]
) -> None:
    question = QUESTIONS[0]
    full = solo[question].text  # "The capital of Japan is Tokyo."
    cut = full.index("Japan")

    def ask(**options: Any) -> Any:
        messages = [{"role": "user", "content": question}]
        return client.chat.completions.create(model=model.model_id, messages=messages, **options)

    stopped = ask(max_tokens=MAX_TOKENS, temperature=0, stop=["Japan", "never"])
    assert stopped.choices[0].message.content == full[:cut] and stopped.choices[0].finish_reason == "stop"
    short = ask(max_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3

    poem = "Write a short poem about the moon."
    params = SamplingParams(temperature=1.3, top_p=0.95, seed=1234, max_new_tokens=MAX_TOKENS)
    expected = engine.generate(chat_ids(engine, poem), params)
    messages = [{"role": "user", "content": poem}]
    sampled = [
        client.chat.completions.create(
            model=model.model_id, messages=messages, max_tokens=MAX_TOKENS, temperature=1.3, top_p=0.95, seed=1234
        ).choices[0]
        for _ in range(2)
    ]
    assert sampled[0].message.content == sampled[1].message.content == expected.text  # the seed, T and p applied
    plain = engine.generate(chat_ids(engine, poem), greedy())
    assert expected.text != plain.text
    # top_p so small that only the most likely token survives: the greedy reply, whatever the seed.
    nucleus = client.chat.completions.create(
        model=model.model_id, messages=messages, max_tokens=MAX_TOKENS, temperature=1.0, top_p=1e-6, seed=5
    )
    assert nucleus.choices[0].message.content == plain.text


def test_official_api_py_endpoint(base: str, engine: Engine) -> None:
    history = [["What is the capital of Japan?", "The capital of Japan is Tokyo."]]
    question = "And of France?"
    messages = [
        {"role": "user", "content": history[0][0]},
        {"role": "assistant", "content": history[0][1]},
        {"role": "user", "content": question},
    ]
    ids = engine.tokenizer.build_chat_ids(messages)  # type: ignore[arg-type]
    expected = engine.generate(ids, SamplingParams(do_sample=False, max_length=len(ids) + 12))
    r = httpx.post(
        f"{base}/", json={"prompt": question, "history": history, "max_length": len(ids) + 12, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"response", "history", "status", "time"}
    assert body["response"] == expected.text and body["status"] == 200
    assert body["history"] == [*history, [question, expected.text]]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", body["time"])
    error_of(httpx.post(f"{base}/", json={"history": []}, timeout=30), 400)  # no prompt


# Errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, "top_p"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": [""]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "messages"),
        ({"temperature": 0}, "messages"),
    ],
)
def test_invalid_fields_are_400_in_openai_shape(base: str, body: dict[str, Any], param: str) -> None:
    error = error_of(httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_other_bad_requests(base: str) -> None:
    error = error_of(httpx.post(f"{base}/v1/chat/completions", content=b"{not json", timeout=30), 400)
    assert "JSON" in error["message"]
    error_of(httpx.post(f"{base}/v1/completions", json={"max_tokens": 4}, timeout=30), 400)
    error_of(httpx.post(f"{base}/v1/completions", json={"prompt": [10**9], "max_tokens": 4}, timeout=30), 400)
    error_of(httpx.get(f"{base}/v1/nothing-here", timeout=30), 404)


def test_unknown_fields_are_ignored(base: str) -> None:
    body = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}], "name": "bob"}],
        "max_tokens": 2,
        "temperature": 0,
        "frequency_penalty": 0.5,
        "logit_bias": {"50256": -100},
        "user": "someone",
        "some_future_field": {"nested": [1, 2]},
    }
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 2


def test_unknown_model_is_404(client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert info.value.status_code == 404 and info.value.code == "model_not_found"
    assert info.value.body["param"] == "model"


def test_prompt_too_long_is_400_with_the_counts(client: Any, engine: Engine, model: GLMModel) -> None:
    text = "word " * 600  # more than the 512 tokens a row holds in this server
    n_prompt = len(chat_ids(engine, text))
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=model.model_id, messages=[{"role": "user", "content": text}], max_tokens=10
        )
    assert info.value.code == "context_length_exceeded" and info.value.body["param"] == "messages"
    message = info.value.body["message"]
    assert "maximum context length is 512 tokens" in message
    assert f"you requested {n_prompt + 10} tokens ({n_prompt} in the messages, 10 in the completion)" in message
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model.model_id, prompt=text, max_tokens=10)
    assert info.value.code == "context_length_exceeded" and info.value.body["param"] == "prompt"


def test_wrong_api_key_is_401(model: GLMModel) -> None:
    with live(create_app(model, ServerSettings(api_key="sesame", ui=False, max_batch=1, max_context=64))) as url:
        bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            bad.models.list()
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        error_of(httpx.post(f"{url}/v1/chat/completions", json={}, timeout=30), 401)  # no key: 401 before 400
        error_of(httpx.post(f"{url}/", json={"prompt": "hi"}, timeout=30), 401)
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
        assert good.models.list().data[0].id == model.model_id
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200  # probes need no key


# A request that cannot end early: greedy, SmolLM2's reply to this runs to the 400-token cap (~4 s on two cores), where
# a sampled "Tell me a long story." sometimes stopped within the 1.5 s a test below waits (a flaky CI run).
LONG = {
    "messages": [{"role": "user", "content": "Write a very long story about a dragon, at least 1000 words."}],
    "max_tokens": 400,
    "temperature": 0,
    "stream": True,
}


def test_full_queue_is_429_and_disconnected_clients_leave_it(model: GLMModel) -> None:
    settings = ServerSettings(ui=False, max_batch=1, max_queue=1, max_context=512)
    long = dict(LONG)
    with live(create_app(model, settings)) as url, httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{url}/v1/chat/completions", json=long) as running:
            events = sse_events(running.iter_lines())
            next(events), next(events)  # role, then the first words: it holds the only row
            with http.stream("POST", f"{url}/v1/chat/completions", json=long) as queued:
                assert queued.status_code == 200  # accepted, waiting for the row
                assert stats(url)["waiting"] == 1
                client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
                with pytest.raises(openai.RateLimitError) as info:
                    client.chat.completions.create(model=model.model_id, messages=long["messages"], max_tokens=2)
                assert info.value.status_code == 429 and info.value.code == "queue_full"
                assert info.value.response.headers["retry-after"] == "1"
        wait_idle(url)  # both clients went away: the running one was cancelled, the queued one dropped
        assert scheduler_finished(url, "cancelled") == 2


# Disconnects and load -----------------------------------------------------------------------------
def test_client_disconnecting_mid_stream_cancels_its_request(base: str) -> None:
    wait_idle(base)
    before = scheduler_finished(base, "cancelled")
    body = dict(LONG)
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
            events = sse_events(r.iter_lines())
            for _ in range(4):
                next(events)
            assert stats(base)["running"] == 1
        # Leaving the block closes the connection with the reply unfinished.
    wait_idle(base, seconds=15)  # 400 tokens would take far longer: the slot was freed on disconnect
    assert scheduler_finished(base, "cancelled") == before + 1
    # Not streamed: a client that gives up waiting cancels too.
    body["stream"] = False
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=1.5))
    wait_idle(base, seconds=15)
    assert scheduler_finished(base, "cancelled") == before + 2
    assert stats(base)["status"] == "ok"


def greedy_leads(engine: Engine, prompt: list[int], result: GenerationResult) -> float:
    """The smallest top-1 minus top-2 logit over the tokens the solo greedy reply chose (EOS included)."""
    seq = prompt + result.token_ids
    with torch.inference_mode():
        cache = engine.new_cache(1, len(seq))
        logits = engine.model(torch.tensor([seq]), torch.arange(len(seq))[None], cache, logits="all")[0]
    steps = logits[len(prompt) - 1 : len(prompt) - 1 + len(result.token_ids) + (result.finish_reason == "stop")]
    top = steps.topk(2, dim=-1).values
    return float((top[:, 0] - top[:, 1]).min())


def test_32_concurrent_streaming_clients(
    base: str, client: Any, engine: Engine, model: GLMModel, solo: dict[str, GenerationResult]
) -> None:
    for q in QUESTIONS:
        lead = greedy_leads(engine, chat_ids(engine, q), solo[q])
        assert lead > 0.05, f"{q!r} is too close to a tie ({lead:.2e}) to compare batched with solo"
    wait_idle(base)
    # 8 questions x 4 reply lengths: rows finish at different steps, so rows move in the cache.
    jobs = [(q, n) for n in (MAX_TOKENS, 13, 10, 7) for q in QUESTIONS]
    start = threading.Barrier(len(jobs))
    replies: list[tuple[str, str | None, Any] | BaseException | None] = [None] * len(jobs)

    def run(i: int, question: str, max_tokens: int) -> None:
        try:
            start.wait(timeout=60)
            stream = client.chat.completions.create(
                model=model.model_id,
                messages=[{"role": "user", "content": question}],
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            text, finish, used = "", None, None
            for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
                used = chunk.usage or used
            replies[i] = (text, finish, used)
        except BaseException as exc:  # reported below, with the others
            replies[i] = exc

    threads = [threading.Thread(target=run, args=(i, q, n)) for i, (q, n) in enumerate(jobs)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    elapsed = time.monotonic() - t0
    failures = [(jobs[i], r) for i, r in enumerate(replies) if not isinstance(r, tuple)]
    assert not failures, f"lost or failed replies: {failures}"
    for (question, n), reply in zip(jobs, replies, strict=True):
        assert isinstance(reply, tuple)
        text, finish, used = reply
        ref = solo[question]
        if ref.finish_reason == "stop" and ref.completion_tokens < n:  # its EOS came within n tokens
            want_text, want_finish, want_tokens = ref.text, ref.finish_reason, ref.completion_tokens
        else:
            want_text, want_finish, want_tokens = engine.tokenizer.decode(ref.token_ids[:n]), "length", n
        assert (text, finish) == (want_text, want_finish), f"{question!r} with max_tokens={n}"
        assert used is not None and used.completion_tokens == want_tokens
    health = httpx.get(f"{base}/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    wait_idle(base)
    print(f"32 streaming clients served in {elapsed:.1f} s")


def test_health_and_metrics(base: str) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    health = httpx.get(f"{base}/health", timeout=30).json()
    assert health["status"] == "ok" and health["model"] == "SmolLM2-135M-Instruct.Q4_1"
    r = httpx.get(f"{base}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in (
        "glmrun_requests",
        "glmrun_prompt_tokens",
        "glmrun_generation_tokens",
        "glmrun_time_to_first_token_seconds",
        "glmrun_request_latency_seconds",
        "glmrun_queue_depth",
        "glmrun_running_requests",
        "glmrun_batch_size",
    ):
        assert name in families, name
    assert families["glmrun_time_to_first_token_seconds"].type == "histogram"
    assert families["glmrun_batch_size"].type == "histogram"
    served = {
        (s.labels["endpoint"], s.labels["status"]): s.value
        for s in families["glmrun_requests"].samples
        if s.name == "glmrun_requests_total"
    }
    assert served[("/v1/chat/completions", "200")] >= 32 and served[("/v1/chat/completions", "400")] >= 10
    steps = {s.labels.get("le"): s.value for s in families["glmrun_batch_size"].samples if s.name.endswith("_bucket")}
    assert steps["+Inf"] > steps["4.0"]  # some decode steps carried more than 4 requests together


# The web page ---------------------------------------------------------------------------------------
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def set_slider(page: Any, label: str, value: int) -> None:
    """Type a value into a Gradio slider's number box until its range input shows it too.

    A page still settling (CI runs this beside other tests) can re-render a control and drop a value
    typed a moment earlier, so the value is checked where the submit reads it, and typed again if lost.
    """
    number = page.get_by_label(f"number input for {label}")
    slider = page.get_by_label(f"range slider for {label}")
    for _ in range(20):
        number.fill(str(value))
        number.press("Tab")
        time.sleep(0.25)
        if number.input_value() == str(value) and float(slider.input_value()) == value:
            return
    raise AssertionError(f"the page did not take {label} = {value}: {number.input_value()!r}, {slider.input_value()!r}")


@pytest.mark.skipif(not HAS_GRADIO, reason="gradio is not installed (pip install 'glmrun[server]')")
@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
)
def test_web_chat_streams_an_answer(base: str, solo: dict[str, GenerationResult]) -> None:
    playwright = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")
    question = QUESTIONS[1]
    outside: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()

            def only_loopback(route: Any) -> None:  # the page must work with no network at all
                url = route.request.url
                if url.startswith(base) or url.startswith(("data:", "blob:")):
                    route.continue_()
                else:
                    outside.append(url)
                    route.abort()

            page.route("**/*", only_loopback)
            page.goto(f"{base}/ui/", wait_until="load", timeout=60_000)
            box = page.get_by_role("textbox").first
            box.wait_for(timeout=60_000)
            page.get_by_text("Additional inputs").click()
            for label, value in (("Maximum new tokens", MAX_TOKENS), ("Temperature (0 = greedy)", 0)):
                set_slider(page, label, value)
            box.fill(question)
            box.press("Enter")
            seen: list[str] = []
            bot = page.locator('[data-testid="bot"]')
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                texts = bot.all_inner_texts()
                if texts and (not seen or texts[-1] != seen[-1]):
                    seen.append(texts[-1])
                if seen and seen[-1].strip() == solo[question].text.strip():
                    break
                time.sleep(0.05)
            toasts = page.locator('[data-testid="toast-body"]').all_inner_texts()
        finally:
            browser.close()
    assert seen, f"no answer appeared; the page said: {toasts}"
    assert seen[-1].strip() == solo[question].text.strip()  # greedy: the engine's own reply
    assert len(seen) >= 3, f"the answer did not stream: {seen}"
    assert all(seen[-1].startswith(s.strip()) for s in seen), seen
    assert not outside, f"the page tried to reach outside hosts: {outside}"


def test_page_sliders_cap_the_reply_at_the_context_and_start_greedy_for_llama() -> None:
    from glmrun.server.ui import page_params, start_temperature

    llama = SamplingParams.model_defaults("llama")
    glm = SamplingParams.model_defaults("chatglm")
    assert start_temperature(llama) == 0.0  # the page's first turn answers as the CLI and API do
    assert start_temperature(glm) == glm.temperature > 0
    # The slider reads 512 but a 38-token question leaves 474 of a 512-token context: the reply may use them.
    assert page_params(llama, 474, 512, 0.8, 0.0).max_new_tokens == 474
    assert page_params(llama, 474, 16, 0.8, 0.0).max_new_tokens == 16
    # No room at all: one token is asked for, which the scheduler refuses with the counts.
    assert page_params(llama, -3, 512, 0.8, 0.0).max_new_tokens == 1
    sampled = page_params(llama, 100, 50, 0.7, 0.5)
    assert sampled.do_sample and (sampled.temperature, sampled.top_p) == (0.5, 0.7)
    assert not page_params(glm, 100, 50, 0.0, 0.9).do_sample  # top-p 0 is greedy too
