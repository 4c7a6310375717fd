"""examples/finetune_hf.py as a user runs it (tiny sizes, a few steps): pretrain from scratch
through the pipeline, save, load with plain transformers and generate; then fine-tune
the saved directory with ``model.path``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=64", "data.seq_len=32", "data.micro_batch_size=2", "train.log_interval=2",
        "generate.lines=2", "generate.max_new_tokens=12"]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "examples" / "finetune_hf.py"), *TINY, *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune_hf")
    proc = run("train.steps=4", f"hydra.run.dir={root / 'scratch'}", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc


def test_pretrains_saves_and_generates_with_plain_transformers(pretrained):
    root, proc = pretrained
    out = proc.stdout
    assert "LlamaForCausalLM" in out and "new (random init)" in out and out.count("step 4/4: loss") == 1
    saved = root / "scratch" / "hf_model"
    assert "saved " + str(saved) in out and "with AutoModelForCausalLM.from_pretrained; it writes:" in out
    assert "engine.generate through the pipeline (KV cache per stage) writes:" in out
    assert "greedy round trip: engine.generate and transformers' generate of the saved model write the same" in out
    lines = out.split("it writes:")[1].strip().splitlines()
    assert len(lines) >= 2 and all(line.strip().startswith("'The ") for line in lines[:2])
    names = set(os.listdir(saved))
    assert {"config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "tokenizer_config.json"} <= names


def test_fine_tunes_a_saved_model(pretrained, tmp_path):
    root, _ = pretrained
    saved = root / "scratch" / "hf_model"
    proc = run(f"model.path={saved}", "train.steps=2", "topology=single", "generate.lines=0",
               f"hydra.run.dir={tmp_path / 'tune'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"from {saved}" in proc.stdout and "step 2/2: loss" in proc.stdout
    assert (tmp_path / "tune" / "hf_model" / "config.json").is_file()
