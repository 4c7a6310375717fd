"""Every training schedule side by side, as the simulator times the instruction lists the
executor runs: bubble, peak activations per rank and messages per rank, at one pipe degree
and micro-batch count, and (with --png) each one's timeline picture.

Costs are per *whole stage*, split evenly over a rank's chunks: a forward costs 1 and a
backward 2 (1 for the input gradient, 1 for the weights where a schedule splits them), so
schedules with 1 and 2 chunks per rank are compared on the same model. Activations are
counted in whole-stage units (a chunk's activations are 1/v of its rank's layers').

``python benchmarks/schedule_table.py --ranks 4 --micro-batches 8 --png-dir docs/schedules``
"""

from __future__ import annotations

import argparse
import os
import sys
from fractions import Fraction

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from record import write_record  # noqa: E402

from pipegrid.schedules import build, is_recv, is_send, parts, simulate, validate  # noqa: E402
from pipegrid.schedules.render import to_png  # noqa: E402

# (schedule, chunks per rank): interleaved runs at 2 chunks, like the V schedules.
CASES = (("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zb_h1", 1), ("zb_v", 2), ("dualpipev", 2))


def _costs(split: bool, chunks: int) -> dict[str, Fraction]:
    share = Fraction(1, chunks)
    backward = {"B": share, "W": share} if split else {"B": 2 * share, "W": Fraction(0)}
    return {"F": share, **backward, "comm": Fraction(0)}


def _messages(schedule) -> int:
    """Most point-to-point messages any rank sends or receives in one step."""
    return max(sum(is_send(part) or is_recv(part) for op in stream for part in parts(op))
               for stream in schedule.streams)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", "--stages", dest="ranks", type=int, default=4,
                        help="pipe ranks p (--stages is the old name)")
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--png-dir", help="write <schedule>.png timelines here")
    parser.add_argument("--out", default="benchmarks/results/schedule_table.json")
    args = parser.parse_args()
    p, m = args.ranks, args.micro_batches
    one_f_one_b = Fraction(p - 1, m + p - 1)
    rows, table = [], [f"p={p}, m={m}; per stage F=1, B=2 (I=1 + W=1 where split), split over the chunks",
                       "| schedule | chunks/rank | placement | bubble | vs 1F1B | peak activations/rank "
                       "| messages/rank |", "|---|---|---|---|---|---|---|"]
    for name, chunks in CASES:
        schedule = build(name, p, m, chunks)
        validate(schedule)
        result = simulate(schedule, _costs(schedule.split_backward, chunks))
        bubble = Fraction(result.bubble_fraction)
        peak = Fraction(max(result.peak_held), chunks)
        row = {"schedule": name, "chunks": chunks, "placement": schedule.placement.kind,
               "bubble": float(bubble), "vs_1f1b": float(bubble / one_f_one_b),
               "peak_activations": float(peak), "messages": _messages(schedule)}
        rows.append(row)
        table.append(f"| {name} | {chunks} | {row['placement']} | {row['bubble']:.3f} | {row['vs_1f1b']:.2f} "
                     f"| {row['peak_activations']:g} | {row['messages']} |")
        if args.png_dir:
            os.makedirs(args.png_dir, exist_ok=True)
            to_png(simulate(schedule, {k: float(v) for k, v in _costs(schedule.split_backward, chunks).items()}),
                   os.path.join(args.png_dir, f"{name}.png"))
    print("\n".join(table))
    write_record(args.out, rows, table, pipe_ranks=p, micro_batches=m)


if __name__ == "__main__":
    main()
