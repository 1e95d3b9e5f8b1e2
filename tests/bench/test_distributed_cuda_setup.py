"""The NCCL set-up path of ``init_from_env`` and the CLI, checked on a CPU-only machine.

No GPU is needed: ``torch.cuda`` queries and ``init_process_group`` are replaced by recorders,
so these tests pin what the code asks of torch (backend, device, ``device_id``, timeout) and the
errors for more processes than GPUs. A real NCCL run is in docs/distributed.md's GPU check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import toy_problem  # noqa: F401  (registers toy_blobs)

from bpgrad.bench import distributed as bdist
from bpgrad.cli import main


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, gpus: int) -> list[torch.device]:
    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(torch.device(d)))
    return chosen


def _torchrun_env(monkeypatch: pytest.MonkeyPatch, rank: int, world: int, local: int) -> None:
    for key, value in {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": local,
                       "LOCAL_WORLD_SIZE": world}.items():
        monkeypatch.setenv(key, str(value))


def test_backend_is_nccl_for_cuda_and_gloo_otherwise() -> None:
    assert bdist.backend_for("cuda") == "nccl"
    assert bdist.backend_for("cuda:3") == "nccl"
    assert bdist.backend_for("cpu") == "gloo"


def test_a_cuda_rank_binds_its_local_gpu_and_starts_nccl(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = _fake_cuda(monkeypatch, gpus=2)
    _torchrun_env(monkeypatch, rank=1, world=2, local=1)
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    ctx, device = bdist.init_from_env("cuda", timeout_s=42.0)
    assert device == "cuda:1"
    assert chosen == [torch.device("cuda:1")]
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend) == (1, 2, 1, "nccl")
    assert len(calls) == 1
    args, kwargs = calls[0]
    assert args == ("nccl",)
    # device_id binds the communicator to this rank's GPU at init (eager NCCL init)
    assert kwargs["device_id"] == torch.device("cuda:1")
    assert kwargs["timeout"].total_seconds() == 42.0


def test_gloo_ranks_get_no_device_id(monkeypatch: pytest.MonkeyPatch) -> None:
    _torchrun_env(monkeypatch, rank=0, world=2, local=0)
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append(k))
    ctx, device = bdist.init_from_env("cpu")
    assert (device, ctx.backend) == ("cpu", "gloo")
    assert "device_id" not in calls[0]


def test_more_ranks_than_gpus_fails_before_nccl_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, gpus=1)
    _torchrun_env(monkeypatch, rank=1, world=2, local=1)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)

    def must_not_start(*_a: Any, **_k: Any) -> None:
        raise AssertionError("init_process_group called")

    monkeypatch.setattr(dist, "init_process_group", must_not_start)
    with pytest.raises(RuntimeError, match=r"only 1 visible GPU.*one GPU per process"):
        bdist.init_from_env("cuda")


def test_no_cuda_under_a_launcher_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, gpus=0)
    _torchrun_env(monkeypatch, rank=0, world=2, local=0)
    with pytest.raises(RuntimeError, match="sees no CUDA device on rank 0"):
        bdist.init_from_env("cuda")


def test_cli_refuses_more_processes_than_gpus(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_cuda(monkeypatch, gpus=1)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    rc = main(["compare", "--problem", "toy_blobs", "--optimizers", "sgd", "--device", "cuda",
               "--nproc-per-node", "2", "--out", str(tmp_path / "run"), "--quiet"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "1 visible GPU(s)" in err and "--nproc-per-node 1" in err
    assert not (tmp_path / "run").exists()  # nothing launched, nothing written
