"""The one table ``benchmarks/gpu_check.sh`` ends with, from what its steps left in ``$OUT``.

Reads ``steps.tsv`` (step, status, seconds, log), ``env.json``, ``kernels_*.json``,
``engine_*.json``, ``models_*.json`` and the GPT run's ``metrics.csv``; writes
``gpu_check.md`` and ``gpu_check.json`` beside them and prints the table, ending with issue
27's must-be-trues, each yes, NO, or n/a saying why. A step that failed shows the last
line of its log, so the table alone says what to fix.

    python benchmarks/gpu_report.py "$OUT"
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

# issue 27: >= 80% of copy bandwidth at 1 GB; 1000 small tensors >= 3x torch.cat, >= 10x split+copy_
GOALS = {"copy_fraction": 0.80, "small_speedup": 3.0, "small_unpack_speedup": 10.0}
# issue 27, one H200, tokens/s against the plain compiled bf16 loop (and MFU floors)
MODEL_GOALS = (("llama-1.1b", "pipegrid compiled", 1.05, 0.50), ("llama-1.1b", "pipegrid compiled+fp8", 1.3, None),
               ("gpt2-124m", "pipegrid compiled", 1.0, 0.35))


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _steps(out: Path) -> list[dict[str, Any]]:
    rows = []
    for line in (out / "steps.tsv").read_text().splitlines() if (out / "steps.tsv").exists() else []:
        name, status, seconds, log = (line.split("\t") + ["", "", "", ""])[:4]
        tail = ""
        if log and (out / log).exists():  # a failure's last words, or pytest's summary
            lines = [x for x in (out / log).read_text(errors="replace").splitlines() if x.strip()]
            tail = lines[-1][:200].replace("|", "/") if lines else ""
            tail = "" if tail.startswith(("wrote", "{", "[")) else tail
        rows.append({"step": name, "status": status, "seconds": float(seconds or 0), "log": log, "last_line": tail})
    return rows


def _kernel_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Headline numbers: the fused path on the largest buffers and on 1000 small tensors."""
    rows = result["rows"]
    if not rows:  # e.g. only the host-time part ran
        return []
    backends = result.get("backends", [])
    methods = [f"pipegrid/{b}" for b in ("cupy", "auto") if b in backends] or ["pipegrid/torch"]
    largest = max(r["total_mb"] for r in rows)
    smallest = min(r["total_mb"] for r in rows)
    out = []
    for (op, baselines), best in ((o, m) for m in methods for o in (
            ("pack", ("torch.cat", "_flatten_dense_tensors")), ("unpack", ("split+copy_",)))):
        def time_of(method: str, tensors: int, mb: float, op: str = op) -> float | None:
            return next((r["time_us"] for r in rows if (r["op"], r["method"], r["tensors"], r["total_mb"])
                         == (op, method, tensors, mb)), None)
        big = next((r for r in rows if (r["op"], r["method"], r["tensors"], r["total_mb"])
                    == (op, best, 10, largest)), None)
        small = time_of(best, 1000, smallest)
        entry = {"op": op, "method": best, "large_mb": largest, "large_copy_fraction": big and big["copy_fraction"]}
        for base in baselines:
            other = time_of(base, 1000, smallest)
            entry[f"small_vs_{base}"] = round(other / small, 2) if other and small else None
        out.append(entry)
    return out


def _gpt(out: Path) -> dict[str, Any] | None:
    found = sorted(out.glob("gpt/**/metrics.csv"))
    if not found:
        return None
    with open(found[-1], newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return None
    tail = rows[len(rows) // 2:]  # the second half: warm-up and compilation behind it
    result = {"steps": len(rows), "final_loss": float(rows[-1]["loss"]),
              "tokens_per_s": statistics.median(float(r["tokens_per_s"]) for r in tail)}
    if rows[-1].get("mfu"):
        result["mfu"] = statistics.median(float(r["mfu"]) for r in tail if r.get("mfu"))
    return result


def build_report(out: Path) -> tuple[str, dict[str, Any]]:
    """(markdown, data) for the run whose files are in ``out``."""
    env = _json(out / "env.json") or {}
    data: dict[str, Any] = {"env": env, "steps": _steps(out)}
    kernels = next((k for k in map(_json, sorted(out.glob("kernels_*.json"))) if k), None)
    engine = next((e for e in map(_json, sorted(out.glob("engine_*.json"))) if e), None)
    data["kernels"] = _kernel_rows(kernels) if kernels else None
    data["kernels_copy_gb_s"] = kernels and kernels.get("copy_gb_s")
    data["kernels_host"] = (kernels or {}).get("host")
    data["engine"] = engine
    data["gpt"] = _gpt(out)
    models = next((m for m in map(_json, sorted(out.glob("models_*.json"))) if m), None)
    data["models"] = models
    data["must_be_true"] = must_be_true(models, kernels)
    lines = [f"# pipegrid GPU check: {env.get('device', 'unknown device')}", "",
             f"torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, CuPy {env.get('cupy', 'none')}, "
             f"NCCL {env.get('nccl', '?')}, commit {env.get('commit', '?')}", "",
             "| step | status | seconds | note |", "|---|---|---:|---|"]
    for s in data["steps"]:
        lines.append(f"| {s['step']} | {s['status']} | {s['seconds']:.0f} | {s['last_line']} |")
    lines += ["", *_kernel_lines(data), *_host_lines(data["kernels_host"]), *_engine_lines(engine),
              *_models_lines(models), *_gpt_lines(data["gpt"]),
              "", "issue 27, what must be true:", "", "| claim | measured | holds |", "|---|---|---|",
              *(f"| {c['claim']} | {c['measured']} | {c['holds']} |" for c in data["must_be_true"])]
    return "\n".join(lines) + "\n", data


def _kernel_lines(data: dict[str, Any]) -> list[str]:
    if not data["kernels"]:
        return ["kernels: no result"]
    lines = [f"kernels (device copy bandwidth {data['kernels_copy_gb_s']} GB/s, read + write):", "",
             "| op | path | largest buffer: of copy bw | 1000 small tensors: vs torch.cat | "
             "vs _flatten_dense_tensors / split+copy_ |", "|---|---|---:|---:|---:|"]
    for k in data["kernels"]:
        base = k.get("small_vs_torch.cat")
        other = k.get("small_vs__flatten_dense_tensors") or k.get("small_vs_split+copy_")
        frac = k["large_copy_fraction"]
        lines.append(f"| {k['op']} | {k['method']} | {'' if frac is None else f'{frac:.0%}'} "
                     f"| {'' if base is None else f'{base}x'} | {'' if other is None else f'{other}x'} |")
    return lines + [f"(goals: >= {GOALS['copy_fraction']:.0%} of copy bandwidth for large buffers; 1000 small "
                    f"tensors >= {GOALS['small_speedup']:g}x torch.cat (pack), "
                    f">= {GOALS['small_unpack_speedup']:g}x split+copy_ (unpack))", ""]


def _host_lines(host: dict[str, Any] | None) -> list[str]:
    """The host time per call of the 1000-tensor moves (kernel_host_cost.py): whole calls, then phases."""
    if not host:
        return ["kernel host time: no result", ""]
    times = host["median_us"]["this tree"]
    bases = {op: (times.get(name) or [None])[0] for op, name in (("pack", "pack: torch.cat"),
                                                                  ("unpack", "unpack: split+copy_"))}
    stand_ins = "" if host["device"].startswith("cuda") else "; /cupy rows: CuPy's host side, no launch"
    lines = [f"kernel host time per call, {host['tensors']} small tensors on {host['device']} "
             "(host: until the calls are queued; wall: until the device is done; vs: torch.cat's or "
             f"split+copy_'s host time over this one's{stand_ins}):", "",
             "| case | host us | wall us | vs baseline |", "|---|---:|---:|---:|"]
    for case, (host_us, wall_us) in sorted(times.items()):
        if case.startswith("phase"):
            continue
        base = bases.get(case.split(":")[0])
        ratio = f"{base / host_us:.2f}x" if base and host_us else ""
        lines.append(f"| {case} | {host_us:.1f} | {wall_us:.1f} | {ratio} |")
    phases = ", ".join(f"{case[7:]} {us[0]:.0f}" for case, us in times.items() if case.startswith("phase"))
    return lines + ["", f"phases (host us): {phases}", ""]


def _models_lines(models: dict[str, Any] | None) -> list[str]:
    if not models:
        return ["models side by side: no result", ""]
    return ["transformers models side by side at pipe=1 (benchmarks/gpu_models.py):", "", models["table"], ""]


def _claim(claim: str, measured: str, holds: bool | None, why: str = "") -> dict[str, str]:
    return {"claim": claim, "measured": measured or why,
            "holds": "n/a" if holds is None else ("yes" if holds else "NO")}


def _model_claims(models: dict[str, Any] | None) -> list[dict[str, str]]:
    found = {(m["model"], r["system"]): r for m in (models or {}).get("models", []) for r in m["systems"]}
    claims = []
    for model, system, ratio, mfu in MODEL_GOALS:
        claim = f"{model}: {system} >= {ratio}x plain compiled" + (f", MFU >= {mfu:.0%}" if mfu else "")
        mine, base = found.get((model, system), {}), found.get((model, "plain compiled"), {})
        if not mine.get("tokens_per_s") or not base.get("tokens_per_s"):
            why = mine.get("note") or base.get("note") or "not measured"
            claims.append(_claim(claim, "", None, why))
            continue
        got = mine["tokens_per_s"] / base["tokens_per_s"]
        holds = got >= ratio and (mfu is None or mine["mfu"] >= mfu)
        claims.append(_claim(claim, f"{got:.2f}x, MFU {mine['mfu']:.1%}", holds))
    for m in (models or {}).get("models", []):
        today, mine = m.get("today_peak_gib"), found.get((m["model"], "pipegrid compiled"), {})
        if today:
            peak = mine.get("peak_gib")
            claims.append(_claim(f"{m['model']}: pipegrid compiled peak memory <= today's {today} GiB",
                                 "" if peak is None else f"{peak} GiB", None if peak is None else peak <= today,
                                 mine.get("note") or "not measured"))
        gap = m.get("fp8_loss_gap")
        claims.append(_claim(f"{m['model']}: fp8 loss tracks bf16 (reported)",
                             gap and f"max {gap['max_rel']:.2%}, final {gap['final_rel']:.2%} over {gap['steps']} steps",
                             None, "fp8 not measured"))
    return claims


def _kernel_claims(kernels: dict[str, Any] | None) -> list[dict[str, str]]:
    rows = {(k["op"], k["method"]): k for k in (_kernel_rows(kernels) if kernels else [])}
    goals = (("unpack", "large_copy_fraction", GOALS["copy_fraction"], "of copy bandwidth at the largest size"),
             ("pack", "small_vs_torch.cat", GOALS["small_speedup"], "x torch.cat, 1000 small tensors"),
             ("unpack", "small_vs_split+copy_", GOALS["small_unpack_speedup"], "x split+copy_, 1000 small tensors"))
    claims = []
    for op, key, goal, what in goals:
        fraction = key == "large_copy_fraction"
        for method in ("pipegrid/cupy", "pipegrid/auto"):
            value = rows.get((op, method), {}).get(key)
            shown = "" if value is None else (f"{value:.0%}" if fraction else f"{value}x")
            claims.append(_claim(f"{op} {method} >= {f'{goal:.0%} ' if fraction else f'{goal:g}'}{what}", shown,
                                 None if value is None else value >= goal, "no CuPy run"))
    claims.append(_auto_never_slower(kernels))
    return claims


def _auto_never_slower(kernels: dict[str, Any] | None) -> dict[str, str]:
    """kernels.backend=auto against the torch path, at every size measured (5% for noise)."""
    claim = "kernels.backend=auto never slower than the torch path (within 5%)"
    times = {(r["op"], r["tensors"], r["total_mb"], r["method"]): r["time_us"] for r in (kernels or {}).get("rows", [])}
    pairs = [(t, times.get((*k[:3], "pipegrid/torch"))) for k, t in times.items() if k[3] == "pipegrid/auto"]
    pairs = [(auto, torch) for auto, torch in pairs if torch]
    if not pairs:
        return _claim(claim, "", None, "no auto run (needs CUDA and CuPy)")
    worst = max(auto / torch for auto, torch in pairs)
    return _claim(claim, f"worst {worst:.2f}x torch's time over {len(pairs)} cases", worst <= 1.05)


def must_be_true(models: dict[str, Any] | None, kernels: dict[str, Any] | None) -> list[dict[str, str]]:
    """Issue 27's GPU claims, each with what was measured and whether it holds (n/a: why not)."""
    return [*_model_claims(models), *_kernel_claims(kernels)]


def _engine_lines(engine: dict[str, Any] | None) -> list[str]:
    if not engine:
        return ["engine: no result", ""]
    lines = ["engine at pipe=1 against plain torch (CPU float32 reference):", "",
             "| dtype | zero.stage | loss rel. error | param rel. error | ok |", "|---|---|---:|---:|---|"]
    for r in engine["correctness"]:
        lines.append(f"| {r['dtype']} | {r['zero']} | {r['loss_rel_err']:.1e} | {r['param_rel_err']:.1e} | {r['ok']} |")
    cost = engine["overhead"]
    return lines + ["", f"per step ({cost['micro_batches']} micro-batches): plain loop {cost['plain_ms']:.2f} ms, "
                        f"train_batch {cost['engine_ms']:.2f} ms: host overhead {cost['overhead_ms']:.2f} ms/step", ""]


def _gpt_lines(gpt: dict[str, Any] | None) -> list[str]:
    if not gpt:
        return ["GPT example: no metrics"]
    mfu = f", MFU {gpt['mfu']:.1%}" if "mfu" in gpt else ""
    overrides = os.environ.get("GPU_CHECK_GPT", "model=gpt_small precision=bf16")
    return [f"GPT example ({overrides}; {gpt['steps']} steps): "
            f"{gpt['tokens_per_s']:,.0f} tokens/s{mfu}, final loss {gpt['final_loss']:.3f}"]


def main(argv: list[str] | None = None) -> int:
    out = Path((argv or sys.argv[1:])[0])
    markdown, data = build_report(out)
    (out / "gpu_check.md").write_text(markdown)
    (out / "gpu_check.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(markdown)
    return 0 if all(s["status"] in ("pass", "skip") for s in data["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
