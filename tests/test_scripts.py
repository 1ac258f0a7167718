"""The training scripts end to end: on the built-in task (reduced size) in subprocesses as a user runs them, and on a
saved tiny model with a data file."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def run_script(script, *args, cwd, timeout=900):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def report_rows(stdout):
    """The (before, after) oracle rewards and KLs of the script's final table."""
    rows = {}
    for name in ("before", "after"):
        match = re.search(rf"^{name} \(\w+\)\s+([+-][\d.]+) ± [\d.]+\s+([-\d.]+) ±", stdout, flags=re.M)
        assert match, stdout[-2000:]
        rows[name] = (float(match.group(1)), float(match.group(2)))
    return rows


# A reduced built-in task: fewer pairs and samples; several epochs so the few steps still learn
REDUCED = ["--task_num_train_pairs", "192", "--num_train_epochs", "2", "--eval_num_samples_per_prompt", "2"]


@pytest.fixture(scope="module")
def task_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("task-cache"))


@pytest.mark.slow
def test_train_tisdpo_builtin_pipeline(tmp_path, task_cache):
    out = tmp_path / "tisdpo"
    stdout = run_script("train_tisdpo.py", "--output_dir", str(out), "--task_cache_dir", task_cache, *REDUCED, cwd=tmp_path)
    rows = report_rows(stdout)
    assert rows["after"][0] > rows["before"][0], rows
    assert rows["before"][1] == 0.0 and rows["after"][1] > 0.0
    assert (out / "token_rewards.html").exists() and (out / "token_rewards.png").exists()
    assert (out / "model.safetensors").exists()
    # the second run reuses the fitted adapters and the cached scores
    stdout = run_script(
        "train_tisdpo.py", "--output_dir", str(out), "--task_cache_dir", task_cache, *REDUCED, "--max_steps", "1",
        cwd=tmp_path,
    )  # fmt: skip
    assert "after (trained)" in stdout


@pytest.mark.slow
def test_train_tdpo_builtin(tmp_path, task_cache):
    stdout = run_script("train_tdpo.py", "--output_dir", str(tmp_path / "tdpo"), "--task_cache_dir", task_cache, *REDUCED, cwd=tmp_path)
    rows = report_rows(stdout)
    assert rows["after"][0] > rows["before"][0], rows


@pytest.mark.slow
def test_estimate_weights_then_train_tisdpo_on_its_output(tmp_path, task_cache):
    """The documented two-step flow: scripts/estimate_weights.py writes a weighted dataset, scripts/train_tisdpo.py
    trains on it with --weights_method given, on a saved local model and dataset."""
    from trl_tokenpo.synthetic import SyntheticTaskConfig, build_task

    task = build_task(SyntheticTaskConfig(num_train_pairs=64, num_eval_pairs=16), cache_dir=task_cache)
    model, weights = task.model.name_or_path, tmp_path / "weights"
    run_script(
        "estimate_weights.py", "--model_name_or_path", model, "--dataset_name", f"{model}/train_dataset",
        "--method", "sft", "--learning_rate", "3e-3", "--num_train_epochs", "1", "--use_cpu", "--output_dir", str(weights),
        cwd=tmp_path,
    )  # fmt: skip
    assert (weights / "weighted_dataset").is_dir() and (weights / "token_rewards.html").is_file()
    run_script(
        "train_tisdpo.py", "--model_name_or_path", model, "--dataset_name", str(weights / "weighted_dataset"),
        "--weights_method", "given", "--max_steps", "3", "--output_dir", str(tmp_path / "tis"), "--report_to", "none",
        "--gradient_checkpointing", "false", cwd=tmp_path,
    )  # fmt: skip
    assert (tmp_path / "tis" / "model.safetensors").exists()


def adapter_files(directory):
    """{path: modification time} of every saved adapter under `directory` (whatever the estimator's layout)."""
    return {str(p): p.stat().st_mtime_ns for p in Path(directory).rglob("adapter_model.safetensors")}


def run_main(script, *args) -> int:
    """Run a script's __main__ block in this process (cheaper than a subprocess; the same code path); its exit status."""
    import runpy

    argv = sys.argv
    sys.argv = [str(ROOT / "scripts" / script), *map(str, args)]
    try:
        runpy.run_path(str(ROOT / "scripts" / script), run_name="__main__")
    except SystemExit as exit_:
        return exit_.code or 0
    finally:
        sys.argv = argv
    return 0


@pytest.mark.slow
def test_train_tisdpo_reuses_adapters_fitted_in_python(tmp_path, tiny_model_dir, one_thread):
    """Adapters fitted in Python are reused by scripts/train_tisdpo.py when its --estimator_* flags give the same fit
    settings (here max_length, which the script otherwise takes from the trainer), on a .jsonl file as the dataset."""
    from conftest import preference_rows
    from datasets import load_dataset

    from trl_tokenpo import ContrastiveWeightEstimator, WeightEstimatorConfig

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in preference_rows(8)))
    estimator_dir = tmp_path / "weights"
    config = WeightEstimatorConfig(
        output_dir=str(estimator_dir), method="sft", max_length=48, max_steps=1, use_cpu=True, report_to="none",
        disable_tqdm=True,
    )  # fmt: skip
    ContrastiveWeightEstimator(tiny_model_dir, args=config).fit(load_dataset("json", data_files=str(data), split="train"))
    fitted = adapter_files(estimator_dir)
    assert len(fitted) == 2  # plus and minus

    common = [
        "--model_name_or_path", tiny_model_dir, "--dataset_name", data, "--weights_method", "sft",
        "--estimator_output_dir", estimator_dir, "--estimator_max_steps", "1", "--max_steps", "1",
        "--report_to", "none", "--heatmap_examples", "0", "--disable_tqdm", "true",
    ]  # fmt: skip
    status = run_main(
        "train_tisdpo.py", *common, "--estimator_max_length", "48", "--gradient_checkpointing", "false",
        "--output_dir", tmp_path / "reused",
    )  # fmt: skip
    assert status == 0
    assert adapter_files(estimator_dir) == fitted  # nothing retrained, nothing rewritten
    assert (tmp_path / "reused" / "model.safetensors").exists()
    # without the flag the estimator takes the trainer's max_length (1024): another fit (with the trainer's default
    # gradient checkpointing, which the estimator inherits too)
    assert run_main("train_tisdpo.py", *common, "--output_dir", tmp_path / "refit") == 0
    assert len(adapter_files(estimator_dir)) == 4
