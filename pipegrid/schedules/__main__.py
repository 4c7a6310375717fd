"""Command line: build a schedule, print its timeline table and simulated bubble.

``python -m pipegrid.schedules 1f1b --ranks 4 --micro-batches 8 --png out.png``;
``python -m pipegrid.schedules generate --ranks 2 --micro-batches 4 --new-tokens 3``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from pipegrid.schedules import generate
from pipegrid.schedules.errors import ScheduleError
from pipegrid.schedules.lower import build
from pipegrid.schedules.placement import PLACEMENTS
from pipegrid.schedules.registry import SCHEDULE_NAMES, SCHEDULES
from pipegrid.schedules.schedule import Schedule
from pipegrid.schedules.render import to_chrome_trace, to_png, to_text
from pipegrid.schedules.simulate import simulate
from pipegrid.schedules.validate import validate


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipegrid.schedules",
                                     description=__doc__.splitlines()[0])
    summaries = [f"{spec.name}: {spec.summary}" for spec in SCHEDULES.values()]
    summaries.append(f"{generate.NAME}: prefill then decode steps, sampled tokens fed back (see --new-tokens)")
    parser.add_argument("name", choices=(*SCHEDULE_NAMES, generate.NAME), help="; ".join(summaries))
    parser.add_argument("--ranks", "--stages", dest="ranks", type=int, required=True,
                        help="pipe ranks: the pipeline degree p (--stages is the old name)")
    parser.add_argument("--micro-batches", type=int, required=True, help="micro-batches m")
    parser.add_argument("--virtual", type=int, default=None,
                        help="chunks per rank v (default: the schedule's own, else 1)")
    parser.add_argument("--placement", choices=PLACEMENTS, default=None,
                        help="stage -> rank map (default: the schedule's own; inference takes any)")
    parser.add_argument("--coalesce", type=int, default=1, help="micro-batches per message")
    parser.add_argument("--new-tokens", type=int, default=3,
                        help="generate only: forward steps (the prefill and each decode step make one token)")
    for key, default in (("F", 1.0), ("B", 2.0), ("W", 0.0), ("comm", 0.0)):
        parser.add_argument(f"--cost-{key}", type=float, default=None,
                            help=f"cost of {key} (default {default}; split-backward schedules: F=B=W=1)")
    parser.add_argument("--streams", action="store_true",
                        help="also print every rank's instruction stream")
    parser.add_argument("--png", help="write the timeline picture here (needs matplotlib)")
    parser.add_argument("--trace", help="write Chrome-trace JSON here (open in Perfetto)")
    return parser


def _build(args: argparse.Namespace) -> Schedule:
    if args.name == generate.NAME:
        if args.coalesce != 1:
            raise ScheduleError("generate sends one micro-batch per message; leave --coalesce unset")
        return generate.build(args.ranks, args.micro_batches, args.new_tokens, args.virtual or 1,
                              args.placement or "loop")
    chunks = SCHEDULES[args.name].chunks
    virtual = args.virtual if args.virtual is not None else (chunks or (1,))[0]
    return build(args.name, args.ranks, args.micro_batches, virtual, coalesce=args.coalesce,
                 placement=args.placement)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        schedule = _build(args)
        validate(schedule)
    except ScheduleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    costs = ({"F": 1.0, "B": 1.0, "W": 1.0, "comm": 0.0} if schedule.split_backward
             else {"F": 1.0, "B": 2.0, "W": 0.0, "comm": 0.0})
    for key in costs:
        value = getattr(args, f"cost_{key}")
        costs[key] = costs[key] if value is None else value
    result = simulate(schedule, costs)
    if args.streams:
        print(schedule.table() + "\n")
    print(to_text(result))
    print(f"simulated bubble fraction: {result.bubble_fraction:.4f} "
          f"(costs {costs}; makespan {result.makespan:g})")
    if args.png:
        to_png(result, args.png)
        print(f"wrote {args.png}")
    if args.trace:
        with open(args.trace, "w", encoding="utf-8") as handle:
            json.dump(to_chrome_trace(result), handle)
        print(f"wrote {args.trace}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
