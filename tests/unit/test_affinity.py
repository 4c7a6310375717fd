"""Each local rank's threads on its own share of the host's cores."""

import multiprocessing as mp
import os
import threading

import pytest

from pipegrid.topology.affinity import bind_cores, cores_for


def test_cores_are_split_evenly_and_never_shared():
    pool = list(range(8))
    slices = [cores_for(r, 4, pool) for r in range(4)]
    assert slices == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert cores_for(0, 3, pool) == [0, 1] and cores_for(2, 3, pool) == [4, 5]  # 6, 7 stay free
    assert cores_for(1, 2, [3, 9]) == [9]


def test_too_few_cores_or_a_bad_rank_binds_nothing():
    assert cores_for(0, 4, [0, 1]) is None
    assert cores_for(4, 4, list(range(8))) is None


def test_without_launcher_variables_or_alone_nothing_is_bound():
    assert bind_cores({}) is None
    assert bind_cores({"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}) is None


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
