"""scripts/gpu_check.sh and the `--size gpu` code path of scripts/benchmark_speed.py, on a machine without a GPU.

gpu_check.sh must refuse within seconds, before installing anything; the LoRA benchmark path it runs is smoke-tested
at the tiny shape (`--size tiny-lora`) so that a GPU session is not spent finding a bug in it.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: gpu_check.sh would run")
@pytest.mark.parametrize("driver", ["absent", "no-devices"])
def test_gpu_check_refuses_quickly_without_a_gpu(tmp_path, driver):
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep) if not (Path(d) / "nvidia-smi").exists()]
    if driver == "no-devices":
        fake = tmp_path / "bin" / "nvidia-smi"
        fake.parent.mkdir()
        fake.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
        fake.chmod(0o755)
        path.insert(0, str(fake.parent))
    env = dict(os.environ, PATH=os.pathsep.join(path), VENV=str(tmp_path / "venv"), OUT=str(tmp_path / "out"))
    start = time.monotonic()
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA GPU here" in proc.stderr and "one CUDA GPU" in proc.stderr
    assert time.monotonic() - start < 20
    assert not (tmp_path / "venv").exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_lora_benchmark_path_writes_the_docs_block(tmp_path):
    markdown = tmp_path / "gpu.md"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark_speed.py"), "--size", "tiny-lora", "--trainers", "dpo",
         "tisdpo-reverse", "--no-estimator", "--rounds", "1", "--warmup", "1", "--steps", "1",
         "--markdown", str(markdown)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = markdown.read_text()
    assert text.startswith("<!-- speed:main-tiny-lora:start -->") and text.rstrip().endswith(
        "<!-- speed:main-tiny-lora:end -->"
    )
    assert "LoRA r=16 on all linear layers (reference: adapter disabled)" in text
    rows = [line for line in text.splitlines() if line.startswith(("| dpo |", "| tisdpo-reverse |"))]
    assert len(rows) == 2 and "| 1.00x |" in rows[0]
    assert not (tmp_path / "docs").exists()  # --markdown writes the block, not the docs
