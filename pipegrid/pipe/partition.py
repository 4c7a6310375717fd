"""Cutting a layer list into contiguous pipeline parts: pure functions over numbers and
class names (no torch), returning boundaries ``parts`` with part j = layers[parts[j]:parts[j+1]].

Methods: ``uniform`` (layer counts), ``parameters`` (parameter counts), ``type:REGEX``
(count of layers whose class name matches), ``balanced`` / ``profile`` or a list
(explicit positive per-layer costs). Balanced splits minimise the largest part's cost.
"""

from __future__ import annotations

import bisect
import math
import numbers
import re
from collections.abc import Callable, Sequence

__all__ = [
    "METHODS",
    "layer_weights",
    "owner_of",
    "part_costs",
    "partition",
    "partition_balanced",
    "partition_uniform",
]

METHODS = ("uniform", "parameters", "type:REGEX", "balanced", "profile")
"""The named methods; a list of numbers is also accepted as explicit costs."""

_FIX_METHOD = (
    "use 'uniform', 'parameters', 'type:REGEX' (e.g. 'type:Block'), 'balanced' or "
    "'profile' with per-layer costs, or pass the list of per-layer costs itself"
)


def _check_num_parts(num_parts: object, num_layers: int) -> int:
    if isinstance(num_parts, bool) or not isinstance(num_parts, int):
        raise ValueError(
            f"num_parts must be an integer >= 1, got {num_parts!r} "
            f"({type(num_parts).__name__}); pass an int such as num_parts=2"
        )
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    if num_layers < num_parts:
        raise ValueError(
            f"cannot split {num_layers} layers into {num_parts} parts: every pipeline "
            f"stage needs at least one layer; use at most {num_layers} stages "
            f"(pipe x virtual_stages) or add layers"
        )
    return num_parts


def partition_uniform(num_layers: int, num_parts: int) -> list[int]:
    """Equal layer counts; the first ``num_layers % num_parts`` parts get one extra."""
    _check_num_parts(num_parts, num_layers)
    size, extra = divmod(num_layers, num_parts)
    parts = [0]
    for j in range(num_parts):
        parts.append(parts[-1] + size + (1 if j < extra else 0))
    return parts


def part_costs(weights: Sequence[float], parts: Sequence[int]) -> list[float]:
    """The summed weight of each part."""
    return [float(sum(weights[a:b])) for a, b in zip(parts[:-1], parts[1:])]


def _check_weights(weights: Sequence[float], what: str, *, allow_zero: bool) -> list[float]:
    checked = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise TypeError(f"{what}[{i}] must be a number, got {type(w).__name__} {w!r}")
        bad = not math.isfinite(w) or w < 0 or (w == 0 and not allow_zero)
        if bad:
            need = "finite and >= 0" if allow_zero else "finite and > 0"
            raise ValueError(
                f"{what}[{i}] must be {need}, got {w!r}; give every layer a positive "
                f"cost (e.g. its time in ms), or use partition_method='uniform'"
            )
        checked.append(float(w))
    return checked


def _min_parts(prefix: list[float], cost_cap: float, count_cap: int) -> list[int]:
    """For each start i, the fewest parts covering layers[i:] within both caps.

    Greedy (always take the longest fitting part) is optimal for this, since any
    sub-range of a fitting part also fits; ``reach`` never moves left as i grows.
    """
    n = len(prefix) - 1
    fewest = [0] * (n + 1)
    reach = n
    for i in range(n - 1, -1, -1):
        reach = min(reach, i + count_cap)
        while prefix[reach] - prefix[i] > cost_cap:
            reach -= 1
        fewest[i] = 1 + fewest[reach] if reach > i else n + 1  # n + 1: impossible
    return fewest


def _fits(prefix: list[float], num_parts: int, cost_cap: float, count_cap: int) -> bool:
    return _min_parts(prefix, cost_cap, count_cap)[0] <= num_parts


def _optimal_cost_cap(prefix: list[float], num_parts: int) -> float:
    """The smallest achievable largest-part cost: the least range sum that fits."""
    n = len(prefix) - 1
    candidates = sorted({prefix[b] - prefix[a] for a in range(n) for b in range(a + 1, n + 1)})
    lo, hi = 0, len(candidates) - 1  # the largest candidate (the whole list) always fits
    while lo < hi:
        mid = (lo + hi) // 2
        if _fits(prefix, num_parts, candidates[mid], n):
            hi = mid
        else:
            lo = mid + 1
    return candidates[lo]


def _optimal_count_cap(prefix: list[float], num_parts: int, cost_cap: float) -> int:
    """Among splits at the optimal cost, the smallest possible largest layer count.

    This spreads zero-cost layers (activations, reshapes) instead of piling them up.
    """
    n = len(prefix) - 1
    lo, hi = -(-n // num_parts), n
    while lo < hi:
        mid = (lo + hi) // 2
        if _fits(prefix, num_parts, cost_cap, mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def partition_balanced(weights: Sequence[float], num_parts: int) -> list[int]:
    """Contiguous split minimising the largest part's summed weight (optimal).

    Weights must be >= 0. Ties are broken deterministically: first the largest layer
    count is minimised, then each boundary, left to right, brings its part closest to
    an equal share of what remains (cost first, layer count second, earlier cut last).
    """
    weights = _check_weights(weights, "weights", allow_zero=True)
    n = len(weights)
    _check_num_parts(num_parts, n)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    cost_cap = _optimal_cost_cap(prefix, num_parts)
    count_cap = _optimal_count_cap(prefix, num_parts, cost_cap)
    fewest = _min_parts(prefix, cost_cap, count_cap)
    parts = [0]
    for j in range(num_parts):
        parts.append(_next_cut(prefix, parts[-1], num_parts - j, cost_cap, count_cap, fewest))
    return parts


def _next_cut(
    prefix: list[float], start: int, parts_left: int, cost_cap: float, count_cap: int,
    fewest: list[int],
) -> int:
    """The end of the part starting at ``start`` that keeps the rest splittable."""
    n = len(prefix) - 1
    if parts_left == 1:
        return n
    share = (prefix[n] - prefix[start]) / parts_left
    count_share = (n - start) / parts_left
    best: tuple[float, float, int] | None = None
    for end in range(start + 1, min(start + count_cap, n) + 1):
        cost = prefix[end] - prefix[start]
        if cost > cost_cap:
            break
        rest_ok = fewest[end] <= parts_left - 1 <= n - end
        if rest_ok:
            key = (abs(cost - share), abs((end - start) - count_share), end)
            best = key if best is None or key < best else best
    assert best is not None, "the caps were checked to fit; a cut must exist"
    return best[2]


def layer_weights(
    method: str,
    *,
    class_names: Sequence[str],
    param_counts: Sequence[int] | Callable[[], Sequence[int]] | None = None,
    costs: Sequence[float] | None = None,
) -> list[float]:
    """The per-layer weights a named method balances (see ``partition``)."""
    if not isinstance(method, str):
        raise TypeError(f"partition method must be a str, got {type(method).__name__}")
    name = method.lower()
    if name == "uniform":
        return [1.0] * len(class_names)
    if name == "parameters":
        if param_counts is None:
            raise ValueError("partition method 'parameters' needs param_counts")
        counts = param_counts() if callable(param_counts) else param_counts
        return _check_weights(_same_length(counts, class_names, "param_counts"),
                              "param_counts", allow_zero=True)
    if name.startswith("type:"):
        return _type_weights(method[len("type:"):], class_names)
    if name in ("balanced", "profile"):
        if costs is None:
            raise ValueError(
                f"partition method {method!r} needs one cost per layer; pass "
                f"partition_costs=[...] (or profile_input=... for 'profile')"
            )
        return _check_weights(_same_length(costs, class_names, "costs"), "costs",
                              allow_zero=False)
    raise ValueError(f"unknown partition method {method!r}; {_FIX_METHOD}")


def _same_length(values: Sequence, class_names: Sequence[str], what: str) -> Sequence:
    if len(values) != len(class_names):
        raise ValueError(
            f"{what} must have one entry per layer: {len(class_names)} layers, got "
            f"{len(values)} entries"
        )
    return values


def _type_weights(pattern: str, class_names: Sequence[str]) -> list[float]:
    try:
        regex = re.compile(pattern, re.IGNORECASE)
    except re.error as err:
        raise ValueError(f"partition method 'type:{pattern}' is not a valid regex: {err}") from err
    weights = [1.0 if regex.search(name) else 0.0 for name in class_names]
    if not any(weights):
        shown = ", ".join(sorted(set(class_names)))
        raise ValueError(
            f"partition method 'type:{pattern}' matches no layer class; the classes "
            f"are: {shown}; use a regex that matches at least one of them"
        )
    return weights


def partition(
    method: str | Sequence[float],
    num_parts: int,
    *,
    class_names: Sequence[str],
    param_counts: Sequence[int] | Callable[[], Sequence[int]] | None = None,
    costs: Sequence[float] | None = None,
) -> list[int]:
    """Boundaries (``num_parts + 1`` ints from 0 to ``len(class_names)``) for a method.

    ``class_names`` names every layer (it fixes the layer count and feeds
    ``type:REGEX``); ``param_counts`` (a list, or a callable producing it lazily)
    feeds ``parameters``; ``costs`` feeds ``balanced`` and ``profile``. ``method`` may
    also be the list of per-layer costs itself. Every part gets at least one layer.
    """
    num_layers = len(class_names)
    if not isinstance(method, str):
        if not isinstance(method, Sequence):
            raise TypeError(
                f"partition method must be a str or a list of per-layer costs, got "
                f"{type(method).__name__}; {_FIX_METHOD}"
            )
        costs, method = method, "balanced"
    if method.lower() == "uniform":
        return partition_uniform(num_layers, num_parts)
    if num_parts == 1 and method.lower() == "parameters":
        return [0, num_layers]  # nothing to balance: skip counting parameters
    weights = layer_weights(method, class_names=class_names, param_counts=param_counts,
                            costs=costs)
    return partition_balanced(weights, num_parts)


def owner_of(parts: Sequence[int], layer: int) -> int:
    """The part holding ``layer`` (an index into the partitioned list)."""
    if not 0 <= layer < parts[-1]:
        raise ValueError(f"layer index must be in [0, {parts[-1]}), got {layer}")
    return bisect.bisect_right(parts, layer) - 1
