"""``python -m pipegrid.plan model=gpt_1t cluster=a100_3072``: print the fastest layouts.
``python -m pipegrid.plan --hf-config path/config.json cluster=a100_64 model.seq_len=4096``:
for a transformers model (its sizes; seq_len, global_batch, dtype, recompute, sequence_parallel from
``model.*``).

Hydra's compose API reads ``pipegrid/plan/conf`` (presets: model=gpt_1t|gpt_175b|gpt_145b|
gpt_18b, cluster=a100_3072|a100_1536|a100_64|cpu_2); any key can be overridden, e.g.
``search.top=5 model.global_batch=1536``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from pipegrid.plan.hf_config import transformer_config_from_hf
from pipegrid.plan.predict import DEFAULT_BUCKET_ELEMENTS, Candidate, Prediction, predict_transformer
from pipegrid.plan.presets import cluster_from_dict, model_from_dict
from pipegrid.plan.search import SearchSpace, explain, search

__all__ = ["main", "format_table"]


def compose(overrides: Sequence[str]) -> dict[str, Any]:
    """The composed config as plain containers (Hydra stays at this entry point)."""
    from hydra import compose as hydra_compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module(config_module="pipegrid.plan.conf", version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def format_table(predictions: Sequence[Prediction]) -> str:
    """One row per layout: grid, schedule, step time, bubble, memory, MFU."""
    header = ("rank", "layout", "m", "step s", "bubble", "dp sync s", "mem GiB", "TFLOP/s/dev",
              "HFU", "MFU")
    rows = [header]
    for i, pr in enumerate(predictions, 1):
        rows.append((str(i), pr.candidate.label(), str(pr.micro_batches), f"{pr.step_s:.2f}",
                     f"{pr.bubble_fraction:.1%}", f"{pr.data_sync_s:.2f}",
                     f"{pr.peak_memory_bytes / 2**30:.1f}", _fmt(pr.tflops_per_device, "{:.0f}"),
                     _fmt(pr.hfu, "{:.1%}"), _fmt(pr.mfu, "{:.1%}")))
    widths = [max(len(row[k]) for row in rows) for k in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def _published(cfg: dict[str, Any], model, cluster, ranked: list[Prediction]) -> list[str]:  # noqa: ANN001
    pub = cfg["model"].get("published")
    if not pub:
        return []
    published = Candidate(**pub["layout"])
    if published.devices != cluster.num_devices:
        return [f"(the published layout {published.label()} needs {published.devices} devices)"]
    pred = predict_transformer(model, published, cluster, cfg["search"]["optimizer"])
    published = pred.candidate  # with sequence parallelism where model.sequence_parallel=true forces it
    place = next((i for i, pr in enumerate(ranked, 1) if pr.candidate == published), None)
    lines = [f"published layout {published.label()}: {pub['tflops_per_device']} TFLOP/s/device, "
             f"{pub['fraction_of_peak']:.0%} of peak; predicted {pred.tflops_per_device:.0f} TFLOP/s, "
             f"HFU {pred.hfu:.1%} ({(pred.hfu / pub['fraction_of_peak'] - 1):+.1%}), step "
             f"{pred.step_s:.2f}s, rank {place if place else 'not in the list'}"]
    lines += [f"  {explain(pr, pred)}" for pr in ranked[:3] if pr.step_s < pred.step_s and pr.candidate != published]
    return lines


def _hf_config_path(argv: list[str]) -> str | None:
    """Take ``--hf-config PATH`` (or ``--hf-config=PATH``) out of ``argv``; the rest is Hydra's."""
    for i, arg in enumerate(argv):
        if arg == "--hf-config":
            if i + 1 == len(argv):
                raise SystemExit("--hf-config needs a path: --hf-config path/config.json")
            path = argv[i + 1]
            del argv[i:i + 2]
            return path
        if arg.startswith("--hf-config="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    hf_config = _hf_config_path(args)
    cfg = compose(args)
    if hf_config is not None:
        training = {k: cfg["model"][k] for k in ("seq_len", "global_batch", "dtype", "recompute")}
        training["sequence_parallel"] = bool(cfg["model"].get("sequence_parallel", False))
        model = transformer_config_from_hf(hf_config, **training)
        cfg["model"] = {"published": None}
    else:
        model = model_from_dict(cfg["model"])
    cluster = cluster_from_dict(cfg["cluster"])
    s = cfg["search"]
    space = SearchSpace(schedules=tuple(s["schedules"]), micro_batch_sizes=tuple(s["micro_batch_sizes"]),
                        virtual_stages=tuple(s["virtual_stages"]), zero=tuple(s["zero"]),
                        shortlist=s["shortlist"], optimizer=s["optimizer"],
                        offload=tuple(s.get("offload", (False,))),
                        bucket_elements=s.get("bucket_elements", DEFAULT_BUCKET_ELEMENTS))
    ranked = search(model, cluster, space, top=s["top"])
    print(f"{model.name} ({model.parameters / 1e9:.1f}B parameters, batch {model.global_batch}) on "
          f"{cluster.name} ({cluster.num_devices} devices); HFU counts recomputation "
          "(Narayanan et al. eq. 3), MFU does not")
    print(format_table(ranked))
    for note in dict.fromkeys(note for pr in ranked[:3] for note in pr.notes):  # why ZeRO-2/3 or offload
        print(note)
    pick = ranked[0]
    print(f"run rank 1 with: {' '.join(pick.candidate.overrides(pick.micro_batches))} "
          f"(micro-batch size {pick.candidate.micro_batch_size} from your data loader)")
    for line in _published(cfg, model, cluster, ranked):
        print(line)


if __name__ == "__main__":
    main()
