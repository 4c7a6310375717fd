"""comm.backend on hosts with fewer GPUs than local ranks (GPUs faked): auto trains on the
CPU with a notice, an explicit nccl that cannot work is refused before any process group."""

import pytest
import torch
import torch.distributed as dist

from pipegrid.conf.schema import to_train_config
from pipegrid.launch import uses_cuda
from pipegrid.topology import join


def _initialises_cuda(*args, **kwargs):
    raise AssertionError("the backend choice called an API that initialises CUDA (a launcher could no longer fork)")


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this host has ``n`` visible GPUs, counted as torch counts them without initialising
    CUDA (NVML); the calls that would initialise it fail the test."""
    def fake(n: int) -> None:
        monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "is_available", _initialises_cuda)
        monkeypatch.setattr(torch.cuda, "init", _initialises_cuda)
        if hasattr(torch._C, "_cuda_getDeviceCount"):  # a CUDA build (its absence is how torch tells a CPU one)
            monkeypatch.setattr(torch._C, "_cuda_getDeviceCount", _initialises_cuda)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


@pytest.mark.parametrize("count,ranks,expected", [
    (0, 1, "gloo"), (0, 4, "gloo"),     # no GPU: gloo, nothing to say
    (1, 1, "nccl"), (8, 8, "nccl"), (8, 2, "nccl"),
    (1, 2, "gloo"), (2, 4, "gloo"),     # too few GPUs: the CPU, with a notice
])
def test_auto_takes_nccl_only_with_a_gpu_per_rank(gpus, count, ranks, expected):
    gpus(count)
    backend, notice = join.resolve_backend("auto", ranks)
    assert backend == expected
    assert (notice is not None) == (0 < count < ranks)
    if notice:
        assert f"{ranks} ranks on this host but {count} visible GPU" in notice
        assert "comm.backend=nccl" in notice and "\n" not in notice  # one line, naming the override
    assert uses_cuda("auto", ranks) == (expected == "nccl")  # the launcher spawns only for NCCL


def test_explicit_nccl_without_enough_gpus_is_refused_naming_the_fix(gpus):
    gpus(0)
    with pytest.raises(RuntimeError, match="torch sees no GPU.*set comm.backend=gloo or auto"):
        join.resolve_backend("nccl", 1)
    gpus(2)
    with pytest.raises(RuntimeError, match="4 ranks share 2 visible GPU.*CUDA_VISIBLE_DEVICES.*comm.backend=auto"):
        join.resolve_backend("nccl", 4)
    assert join.resolve_backend("gloo", 4) == ("gloo", None)


def test_explicit_nccl_trusts_one_visible_gpu_per_rank(gpus, monkeypatch):
    gpus(1)  # SLURM --gpus-per-task=1: each rank sees only its own GPU, as device 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert join.resolve_backend("nccl", 8) == ("nccl", None)
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert join.local_cuda_device() == torch.device("cuda", 0)
    assert join.resolve_backend("auto", 8)[0] == "gloo"  # auto does not guess


def test_local_rank_beyond_the_visible_gpus_is_refused(gpus, monkeypatch):
    gpus(2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert join.local_cuda_device() == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(RuntimeError, match="LOCAL_RANK=2 but this process sees 2 GPU"):
        join.local_cuda_device()


def test_joining_with_one_gpu_and_two_ranks_uses_gloo_and_says_so_once(gpus, monkeypatch, capsys, tmp_path):
    """The README's first command (pipe=2, one host) on a laptop with one GPU."""
    gpus(1)
    joined = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: joined.append((backend, kwargs)))
    cfg = to_train_config({"topology": {"pipe": 2}})
    for local_rank in ("0", "1"):
        monkeypatch.setenv("RANK", local_rank)
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setenv("PIPEGRID_INIT_METHOD", f"file://{tmp_path}/store")
        join._join_process_group(cfg)
    assert [backend for backend, _ in joined] == ["gloo", "gloo"]
    assert all("device_id" not in kwargs for _, kwargs in joined)
    notices = capsys.readouterr().err.strip().splitlines()
    assert len(notices) == 1 and "trains on the CPU over gloo" in notices[0]  # local rank 0 only


def test_nccl_binds_the_group_to_this_ranks_gpu(gpus, monkeypatch, tmp_path):
    """Eager NCCL init: every transfer and collective on one communicator per group."""
    gpus(2)
    joined, current = [], []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: joined.append((backend, kwargs)))
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("PIPEGRID_INIT_METHOD", f"file://{tmp_path}/store")
    join._join_process_group(to_train_config({"topology": {"pipe": 2}}))
    assert joined[0][0] == "nccl" and joined[0][1]["device_id"] == torch.device("cuda", 1)
    assert current == [torch.device("cuda", 1)]
