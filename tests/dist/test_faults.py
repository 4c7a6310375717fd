"""Faults (issue 10): a worker SIGKILLed mid-step or mid-save, exact resume after a kill,
torchrun --max-restarts, and what the local launcher exposes (loopback only, no pickles).

The launcher runs in a subprocess wherever its exit code, stderr or leftover processes
matter; workers write their pid and, when they fail, their own error into ``tmp_path``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch.distributed as dist

import pipegrid as pg
from pipegrid.launch import INIT_METHOD_ENV, WorkerError, run_local
from pipegrid.pipe import checkpoint as ckpt
from pipegrid.pipe.checkpoint import files as ckpt_files
from tests.support.engine_cases import N_LAYER, config, global_batches, loaded_outputs
from tests.support.models import TinyGPT

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 3.0  # comm.timeout_s of the runs that lose a worker

# --- a worker SIGKILLed in the middle of train_batch --------------------------------

KILL_MID_STEP = textwrap.dedent('''
    import os, signal, sys, time, traceback
    import pipegrid as pg
    from pipegrid.launch import launch
    from pipegrid.schedules.instructions import Backward
    from tests.support.engine_cases import N_LAYER, config, global_batches
    from tests.support.models import TinyGPT

    def work(out, pipe, data, victim, timeout_s, how):
        rank = int(os.environ["RANK"])
        with open(os.path.join(out, f"pid-{rank}"), "w") as f:
            f.write(str(os.getpid()))
        topo = pg.Topology(pipe=pipe, data=data)
        engine = pg.initialize(TinyGPT(N_LAYER, topology=topo),
                               config("1f1b", pipe, data, 2, comm={"timeout_s": timeout_s}))
        if rank == victim:  # dies (or hangs) in the backward of micro-batch 1 of the second step
            def dying(op):
                if isinstance(op, Backward) and engine.global_steps == 1 and op.micro_batch == 1:
                    with open(os.path.join(out, "killed-at"), "w") as f:
                        f.write(repr(time.time()))
                    os.kill(os.getpid(), getattr(signal, how))
            engine.before_instruction = dying
        d = topo.coord(rank).data
        try:
            for step in range(3):
                engine.train_batch(iter(global_batches(step, data, 2)[d * 2:(d + 1) * 2]))
        except BaseException as error:  # the survivor's own error, before the launcher stops it
            with open(os.path.join(out, f"error-{rank}"), "w") as f:
                f.write(f"{time.time()!r}\\n{type(error).__name__}: {error}\\n{traceback.format_exc()}")
            raise

    if __name__ == "__main__":
        out, pipe, data, victim, timeout_s, how = sys.argv[1:]
        launch(work, out, int(pipe), int(data), int(victim), float(timeout_s), how,
               world_size=int(pipe) * int(data), backend="gloo")
''')


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _assert_none_left(pids: list[int]) -> None:
    deadline = time.monotonic() + 5.0
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)], "workers left behind"


def _kill_mid_step(out: Path, pipe: int, data: int, victim: int, how: str = "SIGKILL") -> subprocess.CompletedProcess:
    script = out / "job.py"
    script.write_text(KILL_MID_STEP)
    proc = subprocess.run([sys.executable, str(script), str(out), str(pipe), str(data), str(victim),
                           str(TIMEOUT_S), how], cwd=out, env=_env(), capture_output=True, text=True, timeout=60)
    _assert_none_left([int((out / f"pid-{r}").read_text()) for r in range(pipe * data)])
    return proc


def _survivor_errors(out: Path, survivors: list[int], within_s: float = TIMEOUT_S) -> dict[int, str]:
    """Each survivor's own final error (first line: type and message); each came within ``within_s``."""
    killed_at = float((out / "killed-at").read_text())
    errors = {}
    for rank in survivors:
        when, first_line = (out / f"error-{rank}").read_text().splitlines()[:2]
        assert float(when) - killed_at < within_s, f"rank {rank} noticed after {float(when) - killed_at:.1f} s"
        errors[rank] = first_line
    return errors


def test_a_worker_killed_mid_step_ends_every_rank_and_the_launcher(tmp_path):
    proc = _kill_mid_step(tmp_path, pipe=2, data=1, victim=1)
    assert proc.returncode != 0
    assert "WorkerError: rank 1 was killed by signal 9" in proc.stderr
    error = _survivor_errors(tmp_path, [0])[0]
    assert error.startswith("PeerLostError: rank 0 (pipe rank 0) lost rank 1 (stage 1)"), error


def test_a_worker_stopped_mid_step_ends_the_launcher_with_the_peer_named_last(tmp_path):
    """SIGSTOP: the survivor times out; its PeerLostError is the launcher's last line (no
    clean-up error after it) and the stopped worker is taken down with the others."""
    proc = _kill_mid_step(tmp_path, pipe=2, data=1, victim=1, how="SIGSTOP")
    assert proc.returncode != 0
    error = _survivor_errors(tmp_path, [0], within_s=TIMEOUT_S + 2)[0]
    assert error.startswith("PeerLostError: rank 0 (pipe rank 0) lost rank 1 (stage 1)"), error
    assert "WorkerError: rank 0 raised" in proc.stderr and "During handling" not in proc.stderr
    assert re.match(r"\S*PeerLostError: rank 0 \(pipe rank 0\) lost rank 1 \(stage 1\)",
                    proc.stderr.strip().splitlines()[-1]), proc.stderr[-2000:]


# --- the same, two processes started by hand (no launcher): what the process itself prints ---

RAW_PEER = textwrap.dedent('''
    import os, signal, sys, time
    import pipegrid as pg
    from tests.support.engine_cases import N_LAYER, config, global_batches
    from tests.support.models import TinyGPT

    out, how, timeout_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
    rank = int(os.environ["RANK"])
    engine = pg.initialize(TinyGPT(N_LAYER, topology=pg.Topology(pipe=2)),
                           config("1f1b", 2, 1, 2, comm={"timeout_s": timeout_s}))
    for step in range(100):
        if rank == 1 and step == 2:
            with open(os.path.join(out, "killed-at"), "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), getattr(signal, how))
        try:
            engine.train_batch(iter(global_batches(step, 1, 2)))
        except BaseException:
            with open(os.path.join(out, "noticed-at"), "w") as f:
                f.write(repr(time.time()))
            raise  # the process ends on whatever propagates: it must be the PeerLostError
''')


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_lost_peer_is_the_last_error_a_process_prints(tmp_path, how):
    script = tmp_path / "raw.py"
    script.write_text(RAW_PEER)
    env = {**_env(), "WORLD_SIZE": "2", INIT_METHOD_ENV: f"file://{tmp_path / 'store'}"}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), how, str(TIMEOUT_S)], cwd=tmp_path,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    try:
        _, stderr = procs[0].communicate(timeout=60)
        exited = time.time()
    finally:
        procs[1].kill()
        procs[1].communicate()
    killed_at, noticed_at = (float((tmp_path / name).read_text()) for name in ("killed-at", "noticed-at"))
    assert procs[0].returncode == 1, stderr[-3000:]
    assert "During handling of the above exception" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert re.search(r"pipegrid.pipe.executor.PeerLostError: rank 0 \(pipe rank 0\) lost rank 1 \(stage 1\)",
                     last), last
    limit = TIMEOUT_S if how == "SIGKILL" else TIMEOUT_S + 2  # a stopped peer is found by the timeout
    assert noticed_at - killed_at < limit, f"noticed after {noticed_at - killed_at:.1f} s"
    print(f"\n{how}: error after {noticed_at - killed_at:.2f} s, exit after {exited - killed_at:.2f} s")


@pytest.fixture(scope="module")
def killed_in_a_grid(tmp_path_factory):
    """pipe=2 x data=2, rank 3 (pipe 1, data 1) killed mid-step: one run for two tests."""
    out = tmp_path_factory.mktemp("grid")
    return out, _kill_mid_step(out, pipe=2, data=2, victim=3)


def test_a_worker_killed_mid_step_in_a_grid_ends_every_rank(killed_in_a_grid):
    out, proc = killed_in_a_grid
    assert proc.returncode != 0
    assert "WorkerError: rank 3 was killed by signal 9" in proc.stderr
    errors = _survivor_errors(out, [0, 1, 2])  # every survivor failed on its own, in time
    assert errors[1].startswith("PeerLostError: rank 1 (pipe rank 0) lost rank 3 (stage 1)"), errors[1]


def test_a_data_parallel_peer_names_the_rank_it_lost(killed_in_a_grid):
    out, _ = killed_in_a_grid
    error = _survivor_errors(out, [2])[2]  # rank 2 meets rank 3 only in the data-parallel all-reduce
    assert re.match(r"PeerLostError: .*\brank(s \[| )3\b", error), error


LAUNCHER_ONLY = textwrap.dedent('''
    import os, sys, time
    from pipegrid.launch import launch

    def work(out):
        with open(os.path.join(out, f"pid-{os.environ['RANK']}"), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(60)

    if __name__ == "__main__":
        launch(work, sys.argv[1], world_size=2, backend="gloo")
''')


def test_workers_die_with_a_killed_launcher(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(LAUNCHER_ONLY)
    launcher = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=_env())
    try:
        deadline = time.monotonic() + 30
        while not all((tmp_path / f"pid-{r}").exists() for r in range(2)) and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = [int((tmp_path / f"pid-{r}").read_text()) for r in range(2)]
    finally:
        launcher.kill()  # SIGKILL: the launcher cannot clean up; the workers must follow it
        launcher.wait()
    _assert_none_left(pids)


# --- a worker killed in the middle of a checkpoint save --------------------------------
# (rank 1 killed while writing its shards: test_checkpoint.py::
#  test_a_save_killed_midway_leaves_the_previous_checkpoint_whole; here rank 0 dies while
#  publishing: after the step directory's rename, before ``latest`` is replaced)

def _killed_while_publishing(cfg, directory, step_two_twice=False):
    topo = pg.Topology(**cfg["topology"])
    engine = pg.initialize(TinyGPT(N_LAYER, topology=topo), cfg)
    for step in range(2):
        engine.train_batch(iter(global_batches(step, 1, 2)))
        if step == 0 or step_two_twice:
            engine.save_checkpoint(directory)  # step 1 (and step 2) whole
    if dist.get_rank() == 0:
        if step_two_twice:  # a second save of step 2 dies at its worst moment: the old copy
            replace = os.replace  # moved aside, the new one not yet in place, `latest` stale

            def dying_replace(src, dst, *args, **kwargs):
                replace(src, dst, *args, **kwargs)
                if os.path.basename(src) == ckpt.step_dir_name(2):
                    os.kill(os.getpid(), signal.SIGKILL)
            os.replace = dying_replace  # (a forked worker: patching os is local to it)
        else:
            write = ckpt_files.atomic_write_text

            def dying_write(path, text):
                if os.path.basename(path) == ckpt.LATEST:
                    with open(f"{path}.tmp-{os.getpid()}", "w") as f:
                        f.write(text)
                    os.kill(os.getpid(), signal.SIGKILL)  # the new pointer written, not yet renamed
                write(path, text)
            ckpt_files.atomic_write_text = dying_write  # what publishing calls (local to this fork)
    engine.save_checkpoint(directory)


def test_rank0_killed_while_publishing_leaves_latest_on_the_previous_checkpoint(tmp_path):
    cfg = config("1f1b", 2, 1, 2, comm={"timeout_s": 10})
    with pytest.raises(WorkerError, match="rank 0 was killed by signal 9"):
        run_local(_killed_while_publishing, 2, (cfg, str(tmp_path)), timeout_s=60)
    assert (tmp_path / "latest").read_text() == "step_00000001"
    assert ckpt.whole_checkpoints(str(tmp_path)) == ["step_00000001", "step_00000002"]
    step, _ = run_local(loaded_outputs, 2, (config("1f1b", 2, 1, 2), str(tmp_path)), timeout_s=60)[0]
    assert step == 1  # ``latest`` decides; the unpublished step 2 is ignored (and overwritten later)


def test_a_second_save_of_the_same_step_killed_midway_leaves_a_whole_checkpoint(tmp_path):
    cfg = config("1f1b", 2, 1, 2, comm={"timeout_s": 10})
    with pytest.raises(WorkerError, match="rank 0 was killed by signal 9"):
        run_local(_killed_while_publishing, 2, (cfg, str(tmp_path), True), timeout_s=60)
    assert (tmp_path / "latest").read_text() == "step_00000002" and not (tmp_path / "step_00000002").exists()
    with pytest.warns(RuntimeWarning, match="incomplete; loading step_00000001"):
        ckpt.latest_step_dir(str(tmp_path))
    step, _ = run_local(loaded_outputs, 2, (config("1f1b", 2, 1, 2), str(tmp_path)), timeout_s=60)[0]
    assert step == 1  # the newest whole checkpoint is used


# --- resume after a kill: examples/train_gpt.py, exact losses ----------------------------

GPT_JOB = textwrap.dedent('''
    """examples/train_gpt.py with hooks: rank 0 appends each step's exact loss to $LOSS_FILE;
    rank $KILL_RANK SIGKILLs itself before step $KILL_AT + 1 (first attempt only); rank
    $STOP_RANK sends $STOP_SIGNAL to its parent (the launcher, or torchrun's agent) during
    step $STOP_AT + 1 and goes on once its own engine has the signal passed on."""
    import os, runpy, signal, sys, time
    import pipegrid as pg

    _train_batch = pg.PipelineEngine.train_batch
    with open(os.environ["LOSS_FILE"] + ".pids", "a") as f:  # torchrun's workers are in their own sessions
        f.write(f"{os.getpid()}\\n")

    def train_batch(self, data_iter=None):
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if (os.environ.get("KILL_AT") and first_attempt and self.global_steps == int(os.environ["KILL_AT"])
                and self.groups.rank == int(os.environ["KILL_RANK"])):
            os.kill(os.getpid(), signal.SIGKILL)
        if (os.environ.get("STOP_AT") and self.global_steps == int(os.environ["STOP_AT"])
                and self.groups.rank == int(os.environ["STOP_RANK"])):
            with open(os.environ["LOSS_FILE"] + ".signalled", "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getppid(), getattr(signal, os.environ["STOP_SIGNAL"]))
            deadline = time.monotonic() + 10  # (without checkpoint.dir the signal ends this process)
            while self.stop_requested is None and time.monotonic() < deadline:
                time.sleep(0.01)
        loss = _train_batch(self, data_iter)
        if self.groups.rank == 0:
            with open(os.environ["LOSS_FILE"], "a") as f:
                f.write(f"{self.global_steps} {loss!r}\\n")
        return loss

    pg.PipelineEngine.train_batch = train_batch
    sys.argv[0] = os.path.join(os.environ["PYTHONPATH"], "examples", "train_gpt.py")
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as stop:  # how the script ends: the launcher here, each rank under torchrun
        with open(os.environ["LOSS_FILE"] + ".exits", "a") as f:
            f.write(f"{os.environ.get('RANK', 'launcher')} {type(stop).__name__} {stop.code}\\n")
        raise
''')
# dropout on: the RNG state must come back from the checkpoint too
GPT = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.seq_len=16", "model.dropout=0.1",
       "data.micro_batch_size=4", "train.steps=6", "train.log_interval=1", "eval.interval=0", "eval.batches=1",
       "sample.length=0"]
KILL = {"KILL_AT": "3", "KILL_RANK": "1"}  # after step 3; the last checkpoint is step 2


def _gpt(root: Path, name: str, *args: str, prefix: tuple = (sys.executable,), env: dict | None = None,
         timeout: float = 60) -> tuple[int, list[tuple[int, float]]]:
    """Run the GPT job; its exit code and the (step, loss) pairs rank 0 wrote."""
    script = root / "gpt_job.py"
    script.write_text(GPT_JOB)
    losses = root / f"{name}.losses"
    proc = subprocess.Popen([*prefix, str(script), *GPT, f"hydra.run.dir={root / name}", *args], cwd=root,
                            env={**_env(), "LOSS_FILE": str(losses), **(env or {})}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = "", ""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # hung: take torchrun's workers (no parent-death signal) with it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        pid_file = Path(f"{losses}.pids")
        for pid in filter(_alive, map(int, pid_file.read_text().split() if pid_file.exists() else [])):
            os.kill(pid, signal.SIGKILL)
    (root / f"{name}.stderr").write_text(stderr or "")  # (and $LOSS_FILE.exits: how the script ended)
    (root / f"{name}.stdout").write_text(stdout or "")
    pairs = [line.split() for line in losses.read_text().splitlines()] if losses.exists() else []
    return proc.returncode, [(int(step), float(loss)) for step, loss in pairs]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """Six GPT steps that never stop: the reference loss curve."""
    root = tmp_path_factory.mktemp("gpt")
    code, losses = _gpt(root, "straight")
    assert code == 0, (root / "straight.stderr").read_text()[-3000:]
    assert [step for step, _ in losses] == [1, 2, 3, 4, 5, 6]
    return losses


def test_a_killed_run_resumes_the_same_loss_curve(tmp_path, straight_run):
    ckpt_args = (f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.interval=2")
    code, first = _gpt(tmp_path, "first", *ckpt_args, env=KILL)
    assert code != 0 and "rank 1 was killed by signal 9" in (tmp_path / "first.stderr").read_text()
    assert first == straight_run[:3]
    code, resumed = _gpt(tmp_path, "resumed", *ckpt_args)
    assert code == 0, (tmp_path / "resumed.stderr").read_text()[-3000:]
    assert resumed == straight_run[2:]  # from step 2's checkpoint: steps 3-6, bit for bit


TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "--max-restarts=1")


@pytest.mark.slow
def test_torchrun_restarts_the_group_from_the_last_checkpoint(tmp_path, straight_run):
    code, losses = _gpt(tmp_path, "elastic", f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.interval=2",
                        prefix=TORCHRUN, env=KILL, timeout=30)
    assert code == 0, (tmp_path / "elastic.stderr").read_text()[-3000:]
    assert losses == straight_run[:3] + straight_run[2:]  # attempt 0: steps 1-3; attempt 1: 3-6


# --- preemption: a signal saves the step in flight, the same command resumes ------------

STOP = {"STOP_AT": "2", "STOP_RANK": "1", "STOP_SIGNAL": "SIGTERM"}  # during step 3, via rank 1's parent


def _exits(root: Path, name: str) -> list[str]:
    path = root / f"{name}.losses.exits"
    return sorted(path.read_text().splitlines()) if path.exists() else []


def _said(root: Path, name: str) -> str:
    return (root / f"{name}.stdout").read_text() + (root / f"{name}.stderr").read_text()


def test_sigterm_to_the_launcher_saves_the_step_in_flight_and_the_same_command_resumes(tmp_path, straight_run):
    ckpt_args = (f"checkpoint.dir={tmp_path / 'ckpt'}",)
    code, first = _gpt(tmp_path, "first", *ckpt_args, env=STOP)
    assert code == 0, _said(tmp_path, "first")[-3000:]
    assert _exits(tmp_path, "first") == ["launcher Preempted 0"]
    saved = tmp_path / "ckpt" / "step_00000003"
    assert f"pipegrid: SIGTERM: saved step 3 to {saved}; run the same command to resume" in _said(tmp_path, "first")
    assert ckpt.whole_checkpoints(str(tmp_path / "ckpt")) == ["step_00000003"]  # the step in flight
    assert first == straight_run[:2]  # step 3 ended in the save, not in a returned loss
    code, resumed = _gpt(tmp_path, "resumed", *ckpt_args)
    assert code == 0, _said(tmp_path, "resumed")[-3000:]
    assert resumed == straight_run[3:]  # steps 4-6, bit for bit


def test_sigterm_without_a_checkpoint_dir_ends_the_run_at_once_saying_nothing_was_saved(tmp_path):
    code, losses = _gpt(tmp_path, "unsaved", env=STOP)
    assert code == 128 + signal.SIGTERM, _said(tmp_path, "unsaved")[-3000:]  # as the signal would end it
    assert "pipegrid: SIGTERM received; checkpoint.dir is not set, so nothing was saved; exiting" in \
        _said(tmp_path, "unsaved")
    assert "Traceback" not in _said(tmp_path, "unsaved")
    assert [step for step, _ in losses] == [1, 2]


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_the_step_in_flight_and_torchrun_resumes(tmp_path, straight_run):
    """torchrun's agent passes SIGTERM on to its workers (then waits --shutdown-timeout, 30 s,
    before a SIGKILL); each worker saves and exits 0. torchrun itself still ends with its
    SignalException (status 1): that is torch's."""
    ckpt_args = (f"checkpoint.dir={tmp_path / 'ckpt'}",)
    torchrun = TORCHRUN[:-1]  # no restarts
    code, first = _gpt(tmp_path, "first", *ckpt_args, prefix=torchrun, env=STOP, timeout=90)
    assert _exits(tmp_path, "first") == ["0 Preempted 0", "1 Preempted 0"], _said(tmp_path, "first")[-3000:]
    assert "SignalException" in _said(tmp_path, "first") and code != 0
    assert "pipegrid: SIGTERM: saved step 3" in _said(tmp_path, "first")
    assert ckpt.whole_checkpoints(str(tmp_path / "ckpt")) == ["step_00000003"] and first == straight_run[:2]
    code, resumed = _gpt(tmp_path, "resumed", *ckpt_args, prefix=torchrun, timeout=90)
    assert code == 0, _said(tmp_path, "resumed")[-3000:]
    assert resumed == straight_run[3:]


# --- security ----------------------------------------------------------------------
# (a checkpoint file carrying a pickled object is refused by weights_only loading:
#  test_checkpoint.py::test_bad_checkpoints_are_refused_with_the_file_named)

def _tcp_sockets() -> list[tuple[str, str]]:
    """(local address, state) of this process's TCP sockets, from /proc (hex, as the kernel writes)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    sockets = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/self/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                sockets.append((fields[1].split(":")[0], fields[3]))
    return sockets


def _rendezvous_and_sockets():
    environment = {key: os.environ.get(key) for key in (INIT_METHOD_ENV, "GLOO_SOCKET_IFNAME", "MASTER_PORT")}
    pg.init_distributed(config("1f1b", 2, 1, 1))  # the world group and the grid's groups, as training does
    dist.barrier()
    return environment, _tcp_sockets()


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def test_the_local_launcher_rendezvous_stays_on_loopback(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)  # the launcher must set it, not the test
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    for environment, sockets in run_local(_rendezvous_and_sockets, 2, backend=None, timeout_s=60):
        assert environment[INIT_METHOD_ENV].startswith("file://")  # a FileStore: no TCP store port
        assert environment["GLOO_SOCKET_IFNAME"] == "lo" and environment["MASTER_PORT"] is None
        assert sockets, "gloo opened no TCP socket"
        assert {address for address, _ in sockets} <= LOOPBACK, sockets  # listeners included (state 0A)
