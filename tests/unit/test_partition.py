"""Partitioning: balanced splits are optimal against brute force, deterministic, never
leave a part empty; every method and every bad input."""

import itertools
import random

import pytest

from pipegrid.pipe.partition import (
    owner_of,
    part_costs,
    partition,
    partition_balanced,
    partition_uniform,
)


def brute_force_best(weights, num_parts):
    n = len(weights)
    best = None
    for cuts in itertools.combinations(range(1, n), num_parts - 1):
        parts = [0, *cuts, n]
        worst = max(part_costs(weights, parts))
        best = worst if best is None else min(best, worst)
    return best


def check_shape(parts, num_layers, num_parts):
    assert len(parts) == num_parts + 1
    assert parts[0] == 0 and parts[-1] == num_layers
    assert all(b > a for a, b in zip(parts, parts[1:])), f"empty part in {parts}"


CASES = [(n, k, seed) for n in range(1, 9) for k in range(1, n + 1) for seed in range(3)]


@pytest.mark.parametrize("n,k,seed", CASES)
def test_balanced_is_optimal_on_integers(n, k, seed):
    rng = random.Random(1000 * n + 10 * k + seed)
    weights = [rng.choice([0, 0, 1, 2, 3, 5, 8, 13]) for _ in range(n)]
    parts = partition_balanced(weights, k)
    check_shape(parts, n, k)
    assert max(part_costs(weights, parts)) == brute_force_best(weights, k)
    assert partition_balanced(weights, k) == parts  # deterministic


@pytest.mark.parametrize("seed", range(40))
def test_balanced_is_optimal_on_floats(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 9)
    k = rng.randint(1, n)
    weights = [rng.uniform(0.01, 10.0) for _ in range(n)]
    parts = partition_balanced(weights, k)
    check_shape(parts, n, k)
    assert max(part_costs(weights, parts)) == pytest.approx(brute_force_best(weights, k),
                                                            rel=1e-12)


def test_zero_weight_layers_are_spread_not_piled():
    parts = partition_balanced([0.0] * 7, 3)
    check_shape(parts, 7, 3)
    assert max(b - a for a, b in zip(parts, parts[1:])) == 3
    assert partition_balanced([100, 0, 0, 0], 2) == [0, 2, 4]


def test_equal_weights_give_even_counts():
    parts = partition_balanced([1] * 10, 4)
    assert sorted(b - a for a, b in zip(parts, parts[1:])) == [2, 2, 3, 3]


@pytest.mark.parametrize("n,k", [(1, 1), (5, 5), (10, 3), (10, 4), (7, 2), (100, 7)])
def test_uniform_counts_differ_by_at_most_one(n, k):
    parts = partition_uniform(n, k)
    check_shape(parts, n, k)
    sizes = [b - a for a, b in zip(parts, parts[1:])]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the extra layers go first
    assert partition("uniform", k, class_names=["L"] * n) == parts


NAMES = ["Embed", "Block", "Block", "Block", "Block", "LayerNorm", "Head"]


def test_parameters_method_balances_counts_lazily():
    counts = [40, 10, 10, 10, 10, 1, 40]
    parts = partition("parameters", 3, class_names=NAMES, param_counts=lambda: counts)
    assert max(part_costs(counts, parts)) == brute_force_best(counts, 3)
    called = []
    assert partition("parameters", 1, class_names=NAMES,
                     param_counts=lambda: called.append(1) or counts) == [0, 7]
    assert not called


def test_type_regex_balances_matching_layers():
    parts = partition("type:block", 2, class_names=NAMES)
    weights = [1 if n == "Block" else 0 for n in NAMES]
    assert part_costs(weights, parts) == [2, 2]
    parts = partition("type:^(Block|Head)$", 3, class_names=NAMES)
    weights = [1 if n in ("Block", "Head") else 0 for n in NAMES]
    assert max(part_costs(weights, parts)) == 2


def test_explicit_costs_as_list_or_balanced():
    costs = [3.0, 1.0, 1.0, 1.0, 4.0, 2.0, 2.0]
    by_list = partition(costs, 3, class_names=NAMES)
    assert by_list == partition("balanced", 3, class_names=NAMES, costs=costs)
    assert by_list == partition("profile", 3, class_names=NAMES, costs=costs)
    assert max(part_costs(costs, by_list)) == brute_force_best(costs, 3)


def test_owner_of():
    parts = [0, 2, 3, 7]
    assert [owner_of(parts, i) for i in range(7)] == [0, 0, 1, 2, 2, 2, 2]
    with pytest.raises(ValueError, match=r"\[0, 7\)"):
        owner_of(parts, 7)


@pytest.mark.parametrize("method,kwargs,match", [
    ("uniform", {}, "cannot split 7 layers into 8 parts"),
    ("parameters", {"param_counts": [1] * 7}, "cannot split 7 layers into 8 parts"),
])
def test_fewer_layers_than_parts(method, kwargs, match):
    with pytest.raises(ValueError, match=match):
        partition(method, 8, class_names=NAMES, **kwargs)


@pytest.mark.parametrize("num_parts", [2.5, "2", True, None, 0, -1])
def test_bad_num_parts(num_parts):
    with pytest.raises(ValueError, match="num_parts"):
        partition("uniform", num_parts, class_names=NAMES)


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="unknown partition method 'fancy'.*'uniform'"):
        partition("fancy", 2, class_names=NAMES)
    with pytest.raises(TypeError, match="partition method"):
        partition(3, 2, class_names=NAMES)


def test_regex_matching_nothing_lists_classes():
    with pytest.raises(ValueError, match="matches no layer class.*Block"):
        partition("type:Conv", 2, class_names=NAMES)
    with pytest.raises(ValueError, match="not a valid regex"):
        partition("type:(", 2, class_names=NAMES)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_non_positive_or_non_finite_cost(bad):
    costs = [1.0] * 6 + [bad]
    with pytest.raises(ValueError, match=r"costs\[6\] must be finite and > 0"):
        partition(costs, 2, class_names=NAMES)


def test_cost_list_problems():
    with pytest.raises(ValueError, match="one entry per layer: 7 layers, got 2"):
        partition([1.0, 2.0], 2, class_names=NAMES)
    with pytest.raises(ValueError, match="needs one cost per layer"):
        partition("balanced", 2, class_names=NAMES)
    with pytest.raises(TypeError, match=r"costs\[0\] must be a number"):
        partition(["a"] * 7, 2, class_names=NAMES)
    with pytest.raises(ValueError, match=r"param_counts\[0\] must be finite and >= 0"):
        partition("parameters", 2, class_names=NAMES, param_counts=[-1] * 7)
