"""Each local rank's threads on its own share of the host's cores."""

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
