"""Smoke test of scripts/benchmark_speed.py: the tiny size runs end to end and prints one finite row per trainer.

No timing is asserted: the numbers of a tiny model on a shared machine mean nothing. It starts one process per
trainer (and per scorer), so it takes minutes on a 2-core machine: marked slow.
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


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
