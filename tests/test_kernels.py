"""glmrun.kernels: when one-row decode kernels launch as programmatic dependents of the kernel before them."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from glmrun import kernels


def test_overlapped_launch_is_off_on_the_cpu_and_can_be_turned_off(monkeypatch):
    assert not kernels.overlapped_launch(torch.zeros(3))  # a CPU tensor never launches so
    monkeypatch.setattr(kernels, "_overlap", {0: True})  # as on a Hopper GPU whose Triton has griddepcontrol
    on_gpu = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    assert not kernels.overlapped_launch(on_gpu)  # outside a decode row: its weights may just have been written
    try:
        with kernels.overlapped_launches():
            assert kernels.overlapped_launch(on_gpu)
            with kernels.overlapped_launches():
                assert kernels.overlapped_launch(on_gpu)
            assert kernels.overlapped_launch(on_gpu)  # an inner scope leaves the outer one on
            kernels.set_overlapped_launch(False)
            assert not kernels.overlapped_launch(on_gpu)
            kernels.set_overlapped_launch(True)
            assert kernels.overlapped_launch(on_gpu)
            monkeypatch.setattr(kernels, "_overlap", {0: False})  # an older GPU, or a Triton without the instructions
            assert not kernels.overlapped_launch(on_gpu)
    finally:
        kernels.set_overlapped_launch(True)
    monkeypatch.setattr(kernels, "_overlap", {0: True})
    assert not kernels.overlapped_launch(on_gpu)  # the scope is closed again


def test_the_scope_is_per_thread(monkeypatch):
    import threading

    monkeypatch.setattr(kernels, "_overlap", {0: True})
    on_gpu = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    seen = []
    with kernels.overlapped_launches():
        t = threading.Thread(target=lambda: seen.append(kernels.overlapped_launch(on_gpu)))
        t.start()
        t.join()
        assert kernels.overlapped_launch(on_gpu)
    assert seen == [False]  # another thread (a server's, say) launching its own kernels is not inside it


def test_glmrun_pdl_0_turns_it_off_from_the_start(monkeypatch):
    import importlib

    monkeypatch.setenv("GLMRUN_PDL", "0")
    fresh = importlib.reload(kernels)
    try:
        assert fresh._overlap_off == [True]
    finally:
        monkeypatch.delenv("GLMRUN_PDL")
        importlib.reload(kernels)
    assert kernels._overlap_off == [False]


def test_only_a_dependent_launch_names_the_option(monkeypatch):  # Triton before 3.3 knows no launch_pdl
    on_gpu = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    monkeypatch.setattr(kernels, "_overlap", {0: True})
    assert kernels.dependent_launch(on_gpu) == {"PDL": False}  # outside a decode row
    with kernels.overlapped_launches():
        assert kernels.dependent_launch(on_gpu) == {"PDL": True, "launch_pdl": True}  # the wait goes with the option


def test_the_interpreter_has_no_griddepcontrol(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not kernels._triton_has_gdc()
