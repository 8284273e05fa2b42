"""``glmrun bench`` on the CPU with the tiny preset: its JSON record, chunked prefill, and bad input."""

from __future__ import annotations

import json

import pytest

from glmrun.cli import main


def _bench(tmp_path, name: str, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    args = ["bench", "--preset", "tiny", "--device", "cpu", "--prompt-len", "16", "--gen-len", "4"]
    assert main([*args, *extra, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_bench_records_its_run_and_chunking_does_not_change_the_tokens(tmp_path):
    whole = _bench(tmp_path, "whole", "--prefill-chunk", "16")
    chunked = _bench(tmp_path, "chunked", "--prefill-chunk", "5")
    assert chunked["prefill_chunk"] == 5 and chunked["prompt_len"] == 16 and chunked["gen_len"] == 4
    assert chunked["environment"]["card"] == "cpu" and "torch" in chunked["environment"]
    assert chunked["cpu_decoder"] is True and chunked["cuda_graphs"] is False  # float32 on the CPU, one row
    assert chunked["cpu_int4_products"] == 0  # random weights: no file blocks to take int4 packs from
    assert chunked["command"].startswith("glmrun bench --preset tiny")
    g = chunked["glmrun"]
    assert g["decode_tok_s"] > 0 and g["prefill_tok_s"] > 0 and g["ttft_s"] > 0
    assert len(chunked["greedy_tokens"]) == 4
    assert chunked["greedy_tokens"] == whole["greedy_tokens"]  # four chunks of a prompt = one piece


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prefill-chunk", "0"], "--prefill-chunk: must be at least 1"),
        (["--gen-len", "-3"], "--gen-len: must be at least 1"),
        (["--batch", "two"], "'two' is not a whole number"),
    ],
)
def test_bad_numbers_are_refused_by_name(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--preset", "tiny", "--device", "cpu", *flags])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_preset_lists_the_known_ones(capsys):
    assert main(["bench", "--preset", "chatglm9", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "unknown --preset 'chatglm9'" in err and "chatglm2-6b" in err and "tiny" in err
