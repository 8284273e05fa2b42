"""``glmrun ask`` and ``glmrun chat`` as a user runs them: real processes on the embedded model."""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from glmrun.checkpoint import PRESETS, write_random_checkpoint

from .test_real_model import GGUF, planted_document  # noqa: F401 - skips the module when the model is absent

TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared/tokenizers/chatglm2/tokenizer.model"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "GLMRUN_MODEL": ""}


def glmrun(*args: str, stdin: str | None = None, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "glmrun", *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=ENV
    )


def test_ask_greedy_answers_paris_and_announces_the_default():
    proc = glmrun("ask", "--temperature", "0", "--stats", "What is the capital of France?")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "embedded model" in proc.stderr and "--model" in proc.stderr  # the one-line announcement
    assert "TTFT" in proc.stderr and "prompt tokens" in proc.stderr


def test_ask_refuses_a_document_that_does_not_fit(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(planted_document(), encoding="utf-8")
    proc = glmrun("ask", "--context", "1024", "--max-new-tokens", "64", "--file", str(doc), "What is the code?")
    assert proc.returncode == 2
    assert "does not fit" in proc.stderr and "--truncate" in proc.stderr
    assert "1024 tokens of context" in proc.stderr and "64 new tokens" in proc.stderr
    assert proc.stdout == ""  # nothing generated, nothing silently cut


def test_ask_truncates_only_when_asked(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(planted_document(), encoding="utf-8")
    proc = glmrun(
        "ask",
        "--context",
        "1024",
        "--max-new-tokens",
        "16",
        "--temperature",
        "0",
        "--truncate",
        "--file",
        str(doc),
        "Which town is this about?",
    )
    assert proc.returncode == 0, proc.stderr
    assert "cut" in proc.stderr and "document tokens" in proc.stderr
    assert proc.stdout.strip()


def test_ask_reads_a_document_from_stdin():
    text = "Note: the meeting with Ada is on Thursday at 3 pm in room 12."
    proc = glmrun(
        "ask",
        "--temperature",
        "0",
        "--max-new-tokens",
        "24",
        "--file",
        "-",
        "Which room is the meeting in?",
        stdin=text,
    )
    assert proc.returncode == 0, proc.stderr
    assert "12" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ask", "--file", "/nonexistent/doc.txt", "question"], "no such file"),
        (["ask", "   "], "empty"),
        (["ask", "--model", "/nonexistent/chatglm2-6b", "hi"], "does not exist"),
        (["ask", "--device", "tpu", "hi"], "device"),
        (["ask", "--device", "cuda:0", "hi"], "CUDA"),
        (["ask", "--temperature", "-1", "hi"], "temperature"),
    ],
)
def test_ask_bad_input_exits_2_with_a_clear_message(args, message):
    proc = glmrun(*args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_ask_rejects_a_binary_file(tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 4)
    proc = glmrun("ask", "--file", str(blob), "What is this?")
    assert proc.returncode == 2 and "not UTF-8" in proc.stderr


def test_chat_session_with_clear_and_exit():
    proc = glmrun(
        "chat",
        "--temperature",
        "0",
        "--max-new-tokens",
        "24",
        "--stats",
        stdin="What is the capital of France?\n/clear\n/exit\n",
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "(conversation cleared)" in proc.stderr
    assert "TTFT" in proc.stderr


def test_chat_leaves_on_end_of_input():
    proc = glmrun("chat", "--max-new-tokens", "4", stdin="")
    assert proc.returncode == 0


def test_ctrl_c_stops_the_answer_but_not_the_chat():
    proc = subprocess.Popen(
        [sys.executable, "-m", "glmrun", "chat", "--max-new-tokens", "400", "--seed", "1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=lambda s=s, b=b: b.extend(iter(lambda: s.read(1), "")), daemon=True)
        for s, b in ((proc.stdout, out), (proc.stderr, err))
    ]
    for r in readers:
        r.start()
    assert proc.stdin is not None
    proc.stdin.write("Tell me a very long story about a dragon and a knight.\n")
    proc.stdin.flush()
    deadline = time.time() + 180
    while time.time() < deadline and len("".join(out).split("Assistant:")[-1]) < 20:
        time.sleep(0.2)
    assert "Assistant:" in "".join(out), "".join(err)
    proc.send_signal(signal.SIGINT)
    while time.time() < deadline and "(stopped)" not in "".join(err):
        time.sleep(0.2)
    assert "(stopped)" in "".join(err)
    proc.stdin.write("/exit\n")
    proc.stdin.flush()
    assert proc.wait(timeout=60) == 0


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    if not TOKENIZER.is_file():
        pytest.skip("the shared ChatGLM2 tokenizer is not present")
    out = tmp_path_factory.mktemp("tiny")
    write_random_checkpoint(out, PRESETS["tiny"], fmt="bin", shards=2, tokenizer_path=TOKENIZER, seed=1)
    return out


def test_progress_bar_on_a_terminal_only(tiny_folder):
    quiet = glmrun("ask", "--model", str(tiny_folder), "--max-new-tokens", "2", "你好")
    assert quiet.returncode == 0, quiet.stderr
    assert "loading" not in quiet.stderr
    # the same command with stderr on a terminal shows the bar
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "glmrun", "ask", "--model", str(tiny_folder), "--max-new-tokens", "2", "你好"],
        stdout=subprocess.PIPE,
        stderr=follower,
        env=ENV,
    )
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=120) == 0
    os.close(leader)
    assert b"loading" in seen
