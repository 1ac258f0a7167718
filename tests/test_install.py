"""What a pip user gets: a wheel built from this checkout, installed (not editable) into a fresh virtual environment,
and its `trl-tokenpo` command training TDPO and TIS-DPO on a .jsonl file, on CPU, from a directory outside the
checkout.

As the README's Install section says: torch 2.13.0 first, then the wheel with its dependencies from the package index
(about 3 minutes and 1.5 GB; nothing of this environment is visible there, so a missing dependency, e.g. an optional
one the command needs, fails here). `TRL_TOKENPO_INSTALL_REUSE_SITE=1` makes it fast and offline instead: the fresh
environment then sees this environment's site-packages through a `.pth` line (which, unlike a site directory, does
not run this checkout's editable-install hook), the wheel goes in with `--no-deps`, and the test checks that every
requirement the wheel declares is met; `trl_tokenpo` is imported from the fresh environment either way.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from conftest import build_model, build_tokenizer, preference_rows


ROOT = Path(__file__).resolve().parents[1]


def sh(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


def build_wheel(tmp_path) -> Path:
    """A wheel of the checkout's tracked files (as a fresh clone has them), built without network."""
    source = tmp_path / "source"
    for name in sh(["git", "ls-files", "-z"], cwd=ROOT).split("\0"):
        if name and (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    dist = tmp_path / "dist"
    sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(source)])
    (wheel,) = dist.glob("trl_tokenpo-*.whl")
    return wheel


def fresh_environment(tmp_path, wheel) -> Path:
    env = tmp_path / "venv"
    if os.environ.get("TRL_TOKENPO_INSTALL_REUSE_SITE") != "1":
        venv.create(env, with_pip=True)
        sh([str(env / "bin" / "python"), "-m", "pip", "install", "-q", "torch==2.13.0"])
        sh([str(env / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)])
        return env
    venv.create(env, with_pip=False)
    site = Path(sh([str(env / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).strip())
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    sh([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "-q", "--no-deps",
        "--ignore-installed", "--no-index", str(wheel)])  # fmt: skip
    return env


REQUIREMENTS_MET = """
import importlib.metadata as metadata, pathlib, sys
from packaging.requirements import Requirement
import trl_tokenpo
unmet = []
for text in metadata.requires("trl-tokenpo"):
    requirement = Requirement(text)
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
        continue
    try:
        found = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        found = None
    if found is None or not requirement.specifier.contains(found, prereleases=True):
        unmet.append(f"{requirement} (found {found})")
assert not unmet, unmet
print(pathlib.Path(trl_tokenpo.__file__).resolve())
"""


@pytest.fixture
def fresh_venv(tmp_path):
    """The fresh environment with the wheel in it; removed afterwards (1.5 GB with the full install)."""
    env = fresh_environment(tmp_path, build_wheel(tmp_path))
    yield env
    shutil.rmtree(env, ignore_errors=True)


@pytest.mark.slow
def test_the_wheel_command_trains_tdpo_and_tisdpo_outside_the_checkout(tmp_path, fresh_venv):
    env = fresh_venv
    package = Path(sh([str(env / "bin" / "python"), "-c", REQUIREMENTS_MET], cwd=tmp_path).strip())
    assert package.is_relative_to(env.resolve()), package  # the wheel's copy, not this checkout
    command = env / "bin" / "trl-tokenpo"
    assert command.is_file()

    work = tmp_path / "work"  # outside the checkout; the command finds nothing of it there
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    (work / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in preference_rows(8)))
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1",
                   "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}  # fmt: skip
    common = ["--model_name_or_path", "model", "--dataset_name", "pairs.jsonl", "--max_steps", "2",
              "--per_device_train_batch_size", "4", "--report_to", "none", "--gradient_checkpointing", "false"]  # fmt: skip
    output = sh([str(command), "tdpo", *common, "--output_dir", "tdpo"], cwd=work, env=environment)
    output += sh(
        [str(command), "tisdpo", *common, "--output_dir", "tisdpo", "--weights_method", "sft", "--estimator_max_steps", "1"],
        cwd=work, env=environment,
    )  # fmt: skip
    assert output.count("Training completed.") == 2 and "Model saved to tisdpo." in output
    for run in ("tdpo", "tisdpo"):
        assert (work / run / "model.safetensors").is_file()
    assert (work / "tisdpo" / "token_rewards.html").is_file()
