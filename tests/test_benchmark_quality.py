"""The quality benchmark's `--quick` mode still runs end to end and writes finite results (no claim on who wins)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_quality.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("benchmark_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def test_auroc_and_frontier_helpers():
    bq = _load_script()
    assert bq.auroc([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == 1.0
    assert bq.auroc([0.4, 0.3, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert bq.auroc([1.0, 1.0, 1.0, 1.0], [0, 1, 0, 1]) == 0.5
    assert math.isnan(bq.auroc([1.0, 2.0], [1, 1]))
    points = [(0.0, 0.1), (0.5, 0.4), (1.5, 0.9), (3.0, 0.7)]
    assert bq.frontier_at(points, 1.0) == 0.4
    assert bq.frontier_at(points, 10.0) == 0.9
    assert bq.pareto(points) == [(0.0, 0.1), (0.5, 0.4), (1.5, 0.9)]


@pytest.mark.slow
def test_quick_benchmark_runs(tmp_path):
    bq = _load_script()
    out, images = tmp_path / "out", tmp_path / "images"
    cache = os.environ.get("TRL_TOKENPO_TASK_CACHE", str(tmp_path / "task_cache"))
    # as a user runs it: a subprocess, whose spawned workers re-import the script as their main module
    args = ["--quick", "--output_dir", str(out), "--images_dir", str(images), "--task_cache_dir", cache]
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())

    for name in ("results.jsonl", "summary.json", "summary.md", "auroc.json"):
        assert (out / name).is_file(), name
    for name in ("quality_frontier.png", "quality_kl_steps.png"):
        assert (images / name).stat().st_size > 1000, name

    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    runs = [r for r in rows if r["kind"] != "reference"]
    assert {r["method"] for r in runs} == set(bq.QUICK_METHODS)
    assert len([r for r in rows if r["kind"] == "reference"]) == 1
    for r in rows:
        for key in ("reward_mean", "reward_sem", "kl_mean", "entropy_mean", "preference_accuracy"):
            assert math.isfinite(r[key]), (r["method"], key, r[key])
        assert 0.0 <= r["preference_accuracy"] <= 1.0
    for r in runs:
        assert r["kl_steps"] and all(
            math.isfinite(h["chosen"]) and math.isfinite(h["rejected"]) for h in r["kl_steps"]
        )
        assert len(r["checkpoints"]) >= 2
    assert all(r["logged_kl"] for r in runs if r["kind"] == "tdpo")

    auroc = json.loads((out / "auroc.json").read_text())
    assert auroc["oracle (sanity)"]["auroc"] == 1.0
    assert 0.0 <= auroc["est:tuned:prompt"]["auroc"] <= 1.0
    for entry in summary["methods"].values():
        for mean, _std in entry["frontier"].values():
            assert math.isfinite(mean)
    assert "| DPO |" in (out / "summary.md").read_text()
