"""Smoke test of scripts/benchmark_speed.py: the tiny size runs end to end and prints one finite row per trainer.

No timing is asserted: the numbers of a tiny model on a shared machine mean nothing. It starts one process per
trainer (and per scorer), so it takes minutes on a 2-core machine: marked slow.
"""

import json
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
from test_docs import load_script


REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "benchmark_speed.py"
TRAINERS = ("dpo", "tdpo1", "tdpo2", "tisdpo-none", "tisdpo-reverse", "tisdpo-tdpo")


def _ratio(cell: str) -> float:
    return float(cell.strip().rstrip("x"))


@pytest.mark.slow
def test_tiny_benchmark_prints_a_finite_row_per_trainer(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "tiny", "--warmup", "1", "--steps", "1"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in TRAINERS:
            rows[cells[0]] = cells
    assert set(rows) == set(TRAINERS), proc.stdout
    for name, cells in rows.items():
        # wall / DPO, CPU / DPO, peak / DPO, above setup / DPO, transient / DPO
        ratios = [_ratio(cells[i]) for i in (2, 4, 6, 8, 10)]
        # time and peak ratios are always finite; the "above setup" / "transient" ratios divide by DPO's (small) deltas
        assert all(math.isfinite(r) and r > 0 for r in ratios[:3]), (name, cells)
        assert all(not math.isinf(r) for r in ratios[3:]), (name, cells)
    assert _ratio(rows["dpo"][2]) == 1.0 and _ratio(rows["dpo"][4]) == 1.0
    # the targets column judges the four trainers that have targets
    assert sum(bool(re.search(r"(met|MISSED)", cells[11])) for cells in rows.values()) == 4
    # the scoring-throughput table has the floor row
    assert re.search(r"^\| forward-x2 \|", proc.stdout, re.MULTILINE), proc.stdout
    # the docs are not touched without --write-docs
    assert not (tmp_path / "docs").exists()


@pytest.fixture(scope="module")
def bench():
    return load_script("scripts/benchmark_speed.py")


def _event(name, device_type, start_us, end_us, self_cpu_us=0.0, annotation=False):
    return types.SimpleNamespace(name=name, device_type=device_type, time_range=types.SimpleNamespace(
        start=start_us, end=end_us), self_cpu_time_total=self_cpu_us, is_user_annotation=annotation)


def test_device_time_totals_take_the_gpu_events_on_cuda_and_the_operators_on_cpu(bench):
    # The CUDA branch cannot run here: feed it events as torch.profiler lists them (kernels and copies on the CUDA
    # device; operators and runtime calls, synchronizations included, on the CPU)
    from torch.autograd import DeviceType

    events = [
        _event(bench.STEP_LABEL, DeviceType.CPU, 0, 345, self_cpu_us=200, annotation=True),  # the step's span
        _event(bench.STEP_LABEL, DeviceType.CUDA, 20, 332, annotation=True),  # the same span on the GPU's timeline
        _event("## forward ##", DeviceType.CUDA, 20, 300, annotation=True),  # a library's annotated range
        _event("aten::mm", DeviceType.CPU, 0, 50, self_cpu_us=40),
        _event("cudaLaunchKernel", DeviceType.CPU, 10, 15, self_cpu_us=5),
        _event("ampere_bf16_gemm", DeviceType.CUDA, 20, 320),
        _event("Memcpy DtoH (Device -> Pageable)", DeviceType.CUDA, 330, 332),
        _event("aten::_local_scalar_dense", DeviceType.CPU, 321, 340, self_cpu_us=4),
        _event("cudaStreamSynchronize", DeviceType.CPU, 322, 335, self_cpu_us=13),
        _event("cudaDeviceSynchronize", DeviceType.CPU, 341, 343, self_cpu_us=2),
        _event("cudaDeviceSynchronize", DeviceType.CPU, 350, 900, self_cpu_us=550),  # the profiler's, as it stops
    ]
    assert bench.device_time_totals(events, cuda=True) == {"device_ms": 0.302, "syncs": 2, "sync_ms": 0.015}
    # without a GPU: the operators' CPU time (self times, so nested calls are not counted twice; not the span's own)
    assert bench.device_time_totals(events, cuda=False) == {"device_ms": 0.614, "syncs": None, "sync_ms": None}


def test_interleaved_summary_takes_min_and_median_over_rounds_and_same_round_ratios(bench):
    def rounds(walls, devices, syncs=3):
        return [{"step_time_s": w, "device_ms": d, "syncs": syncs, "sync_ms": 1.0, "step_transient_mib": 100.0 * w,
                 "cpu_time_s": w, "memory_kind": "cuda_max_allocated", "scored_tokens": 10, "tokens": 20}
                for w, d in zip(walls, devices)]

    runs = {"dpo": rounds([1.0, 2.0, 1.5], [10.0, 10.0, 10.0], syncs=21),
            "tdpo2": rounds([1.2, 2.0, 1.8], [10.0, 10.3, 10.1], syncs=2)}
    rows = {r["trainer"]: r for r in bench.summarize_interleaved(runs)}
    tdpo2 = rows["tdpo2"]
    assert (tdpo2["wall_min"], tdpo2["wall_median"]) == (1.2, 1.8)
    assert tdpo2["wall_ratio_min"] == pytest.approx(1.2)  # min / DPO's min
    assert tdpo2["wall_ratio_median"] == pytest.approx(1.2)  # median of 1.2, 1.0, 1.2
    assert tdpo2["device_ratio_median"] == pytest.approx(1.01) and tdpo2["device_ratio_min"] == pytest.approx(1.0)
    assert tdpo2["syncs"] == 2 and rows["dpo"]["wall_ratio_median"] == 1.0
    table = bench.format_interleaved_table(list(rows.values()), "gpu")
    line = next(line for line in table.splitlines() if line.startswith("| tdpo2 |"))
    # the goals at 4 x 1024: wall <= 1.05x (missed here), GPU time <= 1.03x (met)
    assert "wall <= 1.05x: MISSED" in line and "GPU time <= 1.03x: met" in line
    assert "| 1.200x / 1.200x |" in line and "| 2 |" in line


@pytest.mark.slow
def test_in_process_run_interleaves_the_trainers_and_writes_the_block_and_figures(tmp_path):
    # The code path of gpu_check.sh's step benchmarks (`--size gpu --in-process`) at the tiny LoRA shape, on CPU
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    markdown, figures = tmp_path / "block.md", tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "tiny-lora", "--in-process", "--trainers", "dpo", "tdpo2",
         "tisdpo-reverse", "tisdpo-none", "--rounds", "2", "--warmup", "1", "--steps", "1", "--markdown",
         str(markdown), "--json", str(figures)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = markdown.read_text()
    assert text.startswith("<!-- speed:interleaved-tiny-lora:start -->")
    assert text.rstrip().endswith("<!-- speed:interleaved-tiny-lora:end -->")
    data = json.loads(figures.read_text())
    assert [row["trainer"] for row in data["rows"]] == ["dpo", "tdpo2", "tisdpo-reverse", "tisdpo-none"]
    assert all(len(rounds) == 2 for rounds in data["runs"].values())
    for row in data["rows"]:
        assert all(math.isfinite(row[key]) and row[key] > 0 for key in ("wall_min", "wall_median", "device_min",
                                                                         "device_ratio_median")), row
        assert row["syncs"] is None  # no GPU: no device to wait for
    assert data["rows"][0]["wall_ratio_median"] == 1.0 and data["rows"][0]["device_ratio_min"] == 1.0
    assert not (tmp_path / "docs").exists()


@pytest.mark.slow
def test_estimator_throughput_for_the_chosen_scorers_only(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    figures = tmp_path / "estimator.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "tiny", "--only-estimator", "--scorers", "estimator-adapters",
         "--no-memory", "--rounds", "1", "--warmup", "0", "--steps", "1", "--json", str(figures)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    throughput = json.loads(figures.read_text())["throughput"]
    assert list(throughput) == ["forward-x2", "estimator-adapters"]  # the floor first, and no memory rows
    assert all(figure["tokens_per_s"] > 0 for figure in throughput.values())
    assert "tokens/CPU-s >= 0.8x floor" in proc.stdout and "estimator-sft" not in proc.stdout
