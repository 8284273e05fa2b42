"""``glmrun doctor``: text and JSON reports, exit codes, with simulated or faked GPUs (no GPU needed)."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from glmrun import doctor
from glmrun.placement import CUDA_CONTEXT_RESERVE, CUDA_LIBRARY_RESERVE

from .test_placement import CHATGLM2_6B

GiB = 1024**3


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CHATGLM2_6B.to_chatglm_dict()), encoding="utf-8")
    return str(tmp_path)


def run_doctor(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    doctor.add_parser(sub)
    args = parser.parse_args(["doctor", *argv])
    code = args.func(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_two_simulated_cards_fit(model_dir, capsys):
    code, out, _ = run_doctor(
        [
            "--model",
            model_dir,
            "--simulate-gpus",
            "8GiB,12GiB",
            "--max-memory",
            "0=7.5GiB,1=11.5GiB",
            "--context",
            "8192",
        ],
        capsys,
    )
    assert code == 0
    assert "simulated GPU 0" in out and "simulated GPU 1" in out and "8.00 GiB" in out and "12.00 GiB" in out
    assert "28 layers, 6.24 B parameters; float16" in out
    assert "embedding, layers 0-" in out and "7.50" in out and "11.50" in out
    assert "result: fits" in out
    assert "torch" in out and "CPU:" in out


def test_json_report(model_dir, capsys):
    code, out, _ = run_doctor(
        [
            "--model",
            model_dir,
            "--simulate-gpus",
            "8GiB,12GiB",
            "--max-memory",
            "0=7.5GiB,1=11.5GiB",
            "--context",
            "8192",
            "--json",
        ],
        capsys,
    )
    assert code == 0
    report = json.loads(out)  # one JSON object, nothing else on stdout
    assert report["fits"] is True and report["error"] is None and report["suggestions"] == []
    assert [g["name"] for g in report["gpus"]] == ["simulated GPU 0", "simulated GPU 1"]
    assert report["simulated"] is True and report["host"]["torch"]
    small, big = report["plan"]["devices"]
    assert big["num_layers"] > small["num_layers"]
    assert small["budget_bytes"] == int(7.5 * GiB) and small["predicted_peak_bytes"] <= small["budget_bytes"]
    assert report["model"]["parameters"] == 6_243_584_000


def test_no_fit_exits_3_with_suggestions(model_dir, capsys):
    code, out, _ = run_doctor(["--model", model_dir, "--simulate-gpus", "4GiB,4GiB", "--context", "8192"], capsys)
    assert code == 3
    assert "does NOT fit" in out and "does not fit" in out
    assert re.search(
        r"cuda:0 \(simulated GPU 0\): needs 6\.\d\d GiB for embedding, layers 0-\d+, budget 3\.50 GiB", out
    )
    assert "--quantize int4" in out and "add a" in out

    code, out, _ = run_doctor(
        ["--model", model_dir, "--simulate-gpus", "4GiB,4GiB", "--context", "8192", "--json"], capsys
    )
    assert code == 3
    report = json.loads(out)
    assert report["fits"] is False and report["error"]["kind"] == "no_fit"
    assert report["error"]["available_bytes"] == {
        "0": 4 * GiB - CUDA_CONTEXT_RESERVE,
        "1": 4 * GiB - CUDA_CONTEXT_RESERVE,
    }
    assert all(report["error"]["needed_bytes"][k] > 4 * GiB for k in ("0", "1"))
    assert "int4" in [s["value"] for s in report["suggestions"]]


def test_quantized_plan_fits_where_fp16_does_not(model_dir, capsys):
    code, out, _ = run_doctor(
        ["--model", model_dir, "--simulate-gpus", "4GiB,4GiB", "--context", "8192", "--quantize", "int4"], capsys
    )
    assert code == 0 and "int4" in out


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--simulate-gpus", "8GiB,12GiB", "--max-memory", "0=lots"], "'lots'"),
        (["--simulate-gpus", "8GiB,12GiB", "--devices", "0,5"], "GPU 5"),
        (["--simulate-gpus", "8GiB,12GiB", "--devices", "1", "--max-memory", "0=4GiB"], "GPU 0"),
        (["--simulate-gpus", "8GiB", "--max-memory", "0=9GiB"], "in all"),
        (["--simulate-gpus", "8GiB,,12GiB"], "--simulate-gpus"),
        (["--simulate-gpus", "8GiB", "--batch", "0"], "batch"),
        (["--simulate-gpus", "8GiB", "--context", "0"], "context length"),
        (["--simulate-gpus", "8GiB", "--preset", "no-such-model"], "no-such-model"),
    ],
)
def test_bad_arguments_exit_2(argv, fragment, model_dir, capsys):
    if "--preset" in argv:
        pytest.importorskip("glmrun.checkpoint")
    else:
        argv = ["--model", model_dir, *argv]
    code, out, err = run_doctor(argv, capsys)
    assert code == 2
    assert fragment in err

    code, out, _ = run_doctor([*argv, "--json"], capsys)
    assert code == 2
    error = json.loads(out)["error"]
    assert error["kind"] == "invalid_input" and fragment in error["message"]


def test_missing_model_folder_exits_2(tmp_path, capsys):
    code, _, err = run_doctor(["--model", str(tmp_path / "nowhere"), "--simulate-gpus", "8GiB"], capsys)
    assert code == 2 and "config.json" in err


def test_argparse_rejects_unknown_dtype(capsys):
    with pytest.raises(SystemExit) as info:
        run_doctor(["--dtype", "int3"], capsys)
    assert info.value.code == 2


def test_preset(capsys):
    pytest.importorskip("glmrun.checkpoint")
    code, out, _ = run_doctor(["--preset", "chatglm2-6b", "--simulate-gpus", "24GiB", "--context", "4096"], capsys)
    assert code == 0 and "preset chatglm2-6b" in out


def test_real_gpus_use_free_memory(model_dir, capsys, monkeypatch):
    fake = [
        doctor.GpuInfo(0, "NVIDIA GeForce RTX 3060 Ti", 8 * GiB, 7 * GiB, "8.6", 38),
        doctor.GpuInfo(1, "NVIDIA GeForce RTX 3060", 12 * GiB, 11 * GiB, "8.6", 28),
    ]
    monkeypatch.setattr(doctor, "cuda_gpus", lambda: fake)
    code, out, _ = run_doctor(["--model", model_dir, "--context", "8192", "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["simulated"] is False
    budgets = [d["budget_bytes"] for d in report["plan"]["devices"]]
    assert budgets == [7 * GiB - CUDA_LIBRARY_RESERVE, 11 * GiB - CUDA_LIBRARY_RESERVE]
    assert report["model"]["dtype"] == "float16"

    code, out, _ = run_doctor(
        ["--model", model_dir, "--context", "8192", "--devices", "1", "--quantize", "int8"], capsys
    )
    assert code == 0 and "RTX 3060 Ti" in out  # every card is listed...
    assert "cuda:1  NVIDIA GeForce RTX 3060  embedding, layers 0-27, head" in out  # ...but only cuda:1 planned
    assert "int8" in out and "cuda:0  NVIDIA GeForce RTX 3060 Ti  embedding" not in out


def test_no_gpu_plans_for_ram(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(doctor, "cuda_gpus", lambda: [])
    monkeypatch.setattr(doctor, "_meminfo", lambda: (64 * GiB, 60 * GiB))
    code, out, _ = run_doctor(["--model", model_dir, "--context", "4096"], capsys)
    assert code == 0
    assert "no CUDA GPU" in out and "float32" in out and "cpu " in out

    monkeypatch.setattr(doctor, "_meminfo", lambda: (16 * GiB, 12 * GiB))
    code, out, _ = run_doctor(["--model", model_dir, "--context", "4096"], capsys)
    assert code == 3 and "--quantize int8" in out and "add a" not in out

    code, _, err = run_doctor(["--model", model_dir, "--devices", "0"], capsys)
    assert code == 2 and "--simulate-gpus" in err
