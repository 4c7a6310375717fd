"""The launcher as users meet it, in subprocesses: a failed worker ends the run with its
traceback, CPU launchers re-execute with OMP_NUM_THREADS=1, torchrun runs unchanged, and a
rank's core binding reaches every thread (in a forked child)."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pipegrid.topology.affinity import bind_cores, cores_for

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import os, sys, time
    from pipegrid.launch import launch

    def work(mode):
        rank = int(os.environ["RANK"])
        if mode == "fail" and rank == 1:
            raise ValueError("boom on rank 1")
        if mode == "fail":
            time.sleep(60)  # without the launcher, rank 0 would wait here for its dead peer
        if mode == "compiled":  # inductor compiles here too, after the parent did
            import torch
            return float(torch.compile(lambda x: (x.cos() * 3).sum())(torch.ones(8)))
        return (rank, os.environ["WORLD_SIZE"], os.environ.get("OMP_NUM_THREADS"))

    if __name__ == "__main__":
        print("launcher OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS"), flush=True)
        method = sys.argv[3] if len(sys.argv) > 3 else None
        if sys.argv[1] == "compiled":
            import torch
            print("parent", float(torch.compile(lambda x: (x.sin() * 2).sum())(torch.ones(8))), flush=True)
        result = launch(work, sys.argv[1], world_size=int(sys.argv[2]), backend="gloo", start_method=method)
        # one string per print: under torchrun two ranks print into the same pipe
        print(f"result {result}", flush=True)
''')


def run(tmp_path: Path, *prefix: str, mode: str, world_size: int, env: dict | None = None,
        start_method: str = "", timeout: float = 60) -> subprocess.CompletedProcess:
    """``prefix + [the script, mode, world_size]`` in a subprocess; its result."""
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    env = {**(env if env is not None else os.environ), "PYTHONPATH": str(REPO)}
    argv = [*prefix, str(script), mode, str(world_size), *([start_method] if start_method else [])]
    return subprocess.run(argv, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _without_omp() -> dict:
    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")


def test_failed_worker_ends_the_run_with_its_traceback(tmp_path):
    start = time.monotonic()
    proc = run(tmp_path, sys.executable, mode="fail", world_size=2)
    assert proc.returncode != 0
    assert "rank 1 raised" in proc.stderr and "ValueError: boom on rank 1" in proc.stderr
    assert 'in work' in proc.stderr  # the worker's traceback, not only its message
    assert time.monotonic() - start < 20


def test_cpu_launcher_reexecutes_with_one_omp_thread(tmp_path):
    proc = run(tmp_path, sys.executable, mode="ok", world_size=2, env=_without_omp())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[:2] == ["launcher OMP_NUM_THREADS None", "launcher OMP_NUM_THREADS 1"]
    assert "result (0, '2', '1')" in proc.stdout


def test_spawned_workers_start_with_one_omp_thread(tmp_path):
    """The CUDA start method, on CPU: a spawned worker imports torch before it runs, so the
    launcher must hand it OMP_NUM_THREADS at birth (and needs no re-exec)."""
    proc = run(tmp_path, sys.executable, mode="ok", world_size=2, env=_without_omp(), start_method="spawn")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["launcher OMP_NUM_THREADS None", "result (0, '2', '1')"]


def test_workers_forked_after_inductor_compiled_in_the_launcher_compile_too(tmp_path):
    # the forked child inherits inductor's cached compile thread pool without its thread: it hung
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "2", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    out = run(tmp_path, sys.executable, mode="compiled", world_size=2, env=env, start_method="fork", timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "result 12.96" in out.stdout, out.stdout  # rank 0's 3 * 8 * cos(1)


def test_one_process_runs_in_place(tmp_path):
    proc = run(tmp_path, sys.executable, mode="ok", world_size=1, env=_without_omp())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["launcher OMP_NUM_THREADS None", "result (0, '1', None)"]


def test_under_torchrun_each_rank_runs_in_place(tmp_path):
    proc = run(tmp_path, *TORCHRUN, mode="ok", world_size=2)
    assert proc.returncode == 0, proc.stderr
    assert "result (0, '2', '1')" in proc.stdout and "result (1, '2', '1')" in proc.stdout


def test_torchrun_world_size_must_match(tmp_path):
    proc = run(tmp_path, *TORCHRUN, mode="ok", world_size=4)
    assert proc.returncode != 0
    assert "the job needs 4 processes but torchrun started WORLD_SIZE=2" in proc.stderr


QUICKSTART_EXIT = textwrap.dedent('''
    import atexit, os, sys
    from torch import nn
    import pipegrid as pg

    def threads():  # registered first, so it runs after pipegrid's own exit handler
        names = []
        for t in os.listdir("/proc/self/task"):
            try:
                names.append(open(f"/proc/self/task/{t}/comm").read().strip())
            except OSError:  # ended while listed
                pass
        gloo = [n for n in names if "gloo" in n]
        print("gloo threads at exit:", len(gloo), gloo, flush=True)
    atexit.register(threads)

    def main():
        model = pg.PipelineModule([nn.Linear(4, 4), nn.Linear(4, 4)], loss_fn=nn.functional.mse_loss)
        engine = pg.initialize(model, {"schedule": {"name": "1f1b", "micro_batches": 2},
                                       "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.1}})
        import torch
        return engine.train_batch(iter([(torch.ones(2, 4), torch.zeros(2, 4))] * 2))

    print("loss", main(), flush=True)  # no destroy_process_group: the quickstart has none
''')


def test_a_script_that_never_destroys_the_group_exits_without_gloo_threads(tmp_path):
    # gloo threads alive at interpreter shutdown can abort the process after a finished job
    script = tmp_path / "quick.py"
    script.write_text(QUICKSTART_EXIT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "gloo threads at exit: 0" in proc.stdout, proc.stdout


# --- core binding, in a forked child: every thread, and later threads, on the rank's cores ---

def _bound_in_child(queue):
    started = threading.Event()
    worker = threading.Thread(target=started.wait)  # a thread that exists before binding
    worker.start()
    cores = bind_cores({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    after = []
    late = threading.Thread(target=lambda: after.append(sorted(os.sched_getaffinity(0))))
    late.start()
    late.join()
    tids = os.listdir("/proc/self/task")
    masks = {tid: sorted(os.sched_getaffinity(int(tid))) for tid in tids}
    started.set()
    worker.join()
    queue.put((cores, masks, after[0]))


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs sched_setaffinity and two cores")
def test_every_thread_and_later_threads_get_the_rank_cores():
    queue = mp.get_context("fork").Queue()
    child = mp.get_context("fork").Process(target=_bound_in_child, args=(queue,))
    child.start()
    cores, masks, late = queue.get(timeout=30)
    child.join(timeout=30)
    pool = sorted(os.sched_getaffinity(0))
    assert cores == cores_for(1, 2, pool)
    assert all(mask == cores for mask in masks.values()) and len(masks) >= 2
    assert late == cores
