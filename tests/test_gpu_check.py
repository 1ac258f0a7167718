"""scripts/gpu_check.sh (and scripts/gpu_check.py, which it runs) on a machine without a GPU: it refuses within seconds,
before installing anything; its install step works against a Python that, like the GPU machine's, has torch but lacks
trl and datasets and holds a too-old transformers, from a wheels folder only; its arguments, summary table, docs
blocks, part timeouts and budget behave; and the LoRA benchmark path it runs is smoke-tested at the tiny shape
(`--size tiny-lora`) so that a GPU session is not spent finding a bug in it.
"""

import base64
import hashlib
import importlib.metadata
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from test_docs import load_script


REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"


@pytest.fixture(scope="module")
def check():
    return load_script("scripts/gpu_check.py")


def _without_nvidia_smi(tmp_path, driver):
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep) if not (Path(d) / "nvidia-smi").exists()]
    if driver == "no-devices":
        fake = tmp_path / "bin" / "nvidia-smi"
        fake.parent.mkdir()
        fake.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
        fake.chmod(0o755)
        path.insert(0, str(fake.parent))
    return os.pathsep.join(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: gpu_check.sh would run")
@pytest.mark.parametrize("driver", ["absent", "no-devices"])
def test_gpu_check_refuses_quickly_without_a_gpu(tmp_path, driver):
    env = dict(os.environ, PATH=_without_nvidia_smi(tmp_path, driver), PYTHON=sys.executable,
               SITE=str(tmp_path / "site"), GPU_CHECK_OUT=str(tmp_path / "out"), WHEELS=str(tmp_path))  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA GPU here" in proc.stderr and "one CUDA GPU" in proc.stderr
    assert time.monotonic() - start < 20
    assert not (tmp_path / "site").exists() and not (tmp_path / "out").exists()


def test_a_missing_python_is_refused(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT)], env=dict(os.environ, PYTHON=str(tmp_path / "python-nowhere")),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "set PYTHON" in proc.stderr


# ----------------------------------------------------------------------------------------------------------------------
# Arguments and the documented parts


def test_arguments(check):
    args = check.parse_args([])
    assert args.parts is None and args.skip == [] and args.budget == 480 and args.rounds == 3  # None: every part
    args = check.parse_args(["--parts", "tests", "speed", "--skip", "speed", "--rounds", "2", "--out", "x"])
    assert args.parts == ["tests", "speed"] and args.skip == ["speed"] and args.rounds == 2 and args.out == "x"
    for bad in (["--parts", "nonsense"], ["--rounds", "0"], ["--budget", "-1"], ["--unknown"]):
        with pytest.raises(SystemExit) as exit_info:
            check.parse_args(bad)
        assert exit_info.value.code == 2, bad


def test_the_header_documents_every_part_with_the_codes_times(check):
    header = SCRIPT.read_text().split("\nset -uo pipefail")[0]
    documented = {m.group(1): (int(m.group(2)), int(m.group(3)))
                  for m in re.finditer(r"^#   ([\w-]+) .*?(\d+) s / (\d+) s$", header, re.M)}  # fmt: skip
    assert documented == {p.name: (p.expected_s, p.timeout_s) for p in check.PARTS}
    # the expected times fit the budget with the install's seconds to spare
    assert sum(p.expected_s for p in check.PARTS) + 10 <= check.BUDGET_S
    assert sum(p.timeout_s for p in check.PARTS) > check.BUDGET_S  # so the budget, not the timeouts, bounds the total
    listing = subprocess.run(["bash", str(SCRIPT), "--list"], capture_output=True, text=True, timeout=60).stdout
    assert all(re.search(rf"^{p.name} +{p.expected_s}s +{p.timeout_s}s", listing, re.M) for p in check.PARTS)


def test_the_cuda_parts_run_the_cuda_marked_tests(check):
    files = check.cuda_test_files()
    assert {"tests/test_kernels_cuda.py", "tests/test_kernels_triton.py"} <= set(files)
    assert "tests/test_cuda_jobs.py" not in files  # the whole jobs are parts of their own
    jobs = (REPO / "tests" / "test_cuda_jobs.py").read_text()
    ctx = check.Context(python="python", out=Path("/o"), rounds=3)
    for part in check.PARTS:
        for command in part.commands(ctx):
            for target in command:
                if target.startswith(check.JOBS):
                    assert f"def {target[len(check.JOBS):]}(" in jobs, target
                if target.startswith("scripts/"):
                    assert (REPO / target).exists(), target


def test_the_wheel_set_meets_the_declared_ranges_and_the_download_takes_all_of_it(check):
    from packaging.requirements import Requirement

    pins = [line.split("#")[0].strip() for line in (REPO / "scripts" / "gpu_wheels.txt").read_text().splitlines()]
    pins = [Requirement(p) for p in pins if p]
    assert all(len(p.specifier) == 1 and next(iter(p.specifier)).operator == "==" for p in pins)
    versions = {p.name: next(iter(p.specifier)).version for p in pins}
    assert {"trl", "transformers", "datasets"} <= set(versions)
    for requirement in map(Requirement, check.project_requirements()):
        if requirement.name in versions:
            assert requirement.specifier.contains(versions[requirement.name]), (requirement, versions)
    command = subprocess.run(["bash", str(REPO / "scripts" / "download_gpu_wheels.sh"), "--print", "/w"],
                             capture_output=True, text=True, check=True, timeout=60).stdout.split()  # fmt: skip
    assert command[command.index("--python-version") + 1] == "3.12" and "--no-deps" in command
    assert command[command.index("-d") + 1] == "/w" and command[command.index("-d") + 2:] == [str(p) for p in pins]
    assert "/.whl/" in (REPO / ".gitignore").read_text().splitlines()  # the default folder is never committed


# ----------------------------------------------------------------------------------------------------------------------
# The install plan


def _wheel(folder, name, version, requires=(), tag="py3-none-any"):
    """A minimal wheel file: its name and METADATA are all the plan reads."""
    path = folder / f"{name.replace('-', '_')}-{version}-{tag}.whl"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", metadata)
    return path


def test_the_plan_installs_what_is_missing_or_too_old_and_what_those_need(check, tmp_path):
    _wheel(tmp_path, "trl", "1.16.0", ["datasets>=4.7", "accelerate>=1.10.1", "transformers>=4.56"])
    _wheel(tmp_path, "transformers", "5.18.0", ["huggingface-hub>=1.31,<3", "tokenizers>=0.23.1,<0.24"])
    _wheel(tmp_path, "transformers", "5.17.0")  # too old: never chosen
    _wheel(tmp_path, "datasets", "4.7.0", ["dill<0.4.1,>=0.3.0", "multiprocess<0.70.19", "fsspec[http]<=2026.2.0",
                                           "xxhash"])  # fmt: skip
    _wheel(tmp_path, "dill", "0.4.0")
    _wheel(tmp_path, "multiprocess", "0.70.18", ["dill>=0.4.0"])
    _wheel(tmp_path, "peft", "0.21.2")  # installed at a version in range: left alone
    _wheel(tmp_path, "bitsandbytes", "0.50.2", tag="py3-none-win_arm64")  # another platform: never a candidate
    installed = {
        "torch": ("2.11.0+cu130", []), "transformers": ("5.17.0", []), "peft": ("0.18.1", []),
        "accelerate": ("1.15.0", []), "huggingface-hub": ("1.33.0", []), "tokenizers": ("0.23.2", []),
        "xxhash": ("3.6.0", []), "fsspec": ("2026.9.0", ['aiohttp!=4.0.0a0,!=4.0.0a1; extra == "http"']),
    }  # fmt: skip
    requirements = ["torch>=2.4", "trl>=1.16.0,<1.17", "transformers>=5.18,<6", "peft>=0.19,<0.22",
                    "datasets>=4.7,<6", "bitsandbytes>=0.46; sys_platform == 'nonexistent'"]  # fmt: skip
    plan = check.plan_install(requirements, installed, check.compatible_wheels(tmp_path))
    assert {n: str(w.version) for n, w in plan.install.items()} == {
        "trl": "1.16.0", "transformers": "5.18.0", "peft": "0.21.2", "datasets": "4.7.0", "dill": "0.4.0",
        "multiprocess": "0.70.18",
    }  # fmt: skip
    assert "5.17.0 installed" in plan.reasons["transformers"] and "not installed" in plan.reasons["trl"]
    assert "0.18.1 installed" in plan.reasons["peft"]
    # an indirect requirement out of range with no wheel is kept (as pip --no-deps would); the extra's own requirement
    # (aiohttp for fsspec[http]) is missing and has no wheel: that one stops the install
    assert len(plan.warnings) == 1 and "fsspec 2026.9.0" in plan.warnings[0]
    assert len(plan.errors) == 1 and plan.errors[0].startswith("aiohttp") and "fsspec[http]" in plan.errors[0]

    installed["aiohttp"] = ("3.13.0", [])
    installed["peft"] = ("0.21.2", [])
    plan = check.plan_install(requirements, installed, check.compatible_wheels(tmp_path))
    assert plan.errors == [] and "peft" not in plan.install
    # a direct requirement out of range without a wheel is an error, not a warning
    plan = check.plan_install(["accelerate>=2"], installed, check.compatible_wheels(tmp_path))
    assert plan.errors and "1.15.0 installed" in plan.errors[0] and "no matching wheel" in plan.errors[0]
    assert check.plan_install(["torch>=2.4"], installed, {}).install == {}  # nothing missing: no wheels needed


def test_a_site_folder_is_only_emptied_when_the_check_made_it(check, tmp_path):
    site = tmp_path / "site"
    check.prepare_site(site)
    (site / "leftover").write_text("x")
    check.prepare_site(site)  # made by the check: emptied
    assert sorted(p.name for p in site.iterdir()) == [check.SITE_MARKER]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "precious").write_text("x")
    with pytest.raises(check.CheckError, match="not made by this check"):
        check.prepare_site(other)
    assert (other / "precious").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Parts, summary table and docs blocks


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_cuda_jobs" name="test_estimator_end_to_end_on_cuda[sft]" time="20.1">
  <properties><property name="auroc_sft" value="0.93" /></properties></testcase>
<testcase classname="tests.test_cuda_jobs" name="test_estimator_end_to_end_on_cuda[dpo]" time="18.0">{dpo}</testcase>
</testsuite></testsuites>"""


@pytest.mark.parametrize("dpo, status, figure", [
    ('<properties><property name="auroc_dpo" value="0.81" /></properties>', "ok",
     "2 passed, 0 failed, 0 skipped; auroc_sft 0.93, auroc_dpo 0.81"),
    ('<failure message="assert 0.5 &gt; 0.65">trace</failure>', "failed",
     "1 passed, 1 failed, 0 skipped (test_estimator_end_to_end_on_cuda[dpo]); auroc_sft 0.93"),
])  # fmt: skip
def test_pytest_parts_read_their_junit_report(check, tmp_path, dpo, status, figure):
    ctx = check.Context(python=sys.executable, out=tmp_path, rounds=1)
    ctx.logs.mkdir()
    (ctx.logs / "estimator.xml").write_text(JUNIT.format(dpo=dpo))
    assert check.summarize_tests(ctx, "estimator", [0 if status == "ok" else 1]) == (status, figure)


def test_a_part_whose_tests_all_skip_is_skipped_with_the_reason(check, tmp_path):
    ctx = check.Context(python=sys.executable, out=tmp_path, rounds=1)
    ctx.logs.mkdir()
    (ctx.logs / "qlora.xml").write_text(
        '<testsuites><testsuite><testcase name="test_qlora_step_on_cuda[tdpo]"><skipped message="bitsandbytes is '
        'not installed (QLoRA needs it)" /></testcase></testsuite></testsuites>'
    )
    assert check.summarize_tests(ctx, "qlora", [0]) == ("skipped", "bitsandbytes is not installed (QLoRA needs it)")
    assert check.summarize_tests(ctx, "missing", [4])[0] == "failed"  # no report at all: pytest did not run


def test_a_hanging_part_is_killed_at_its_timeout_and_the_budget_bounds_the_rest(check, tmp_path):
    ctx = check.Context(python=sys.executable, out=tmp_path, rounds=1)
    ctx.logs.mkdir()
    sleeper = [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
               "'import time; time.sleep(60)']); print('started', flush=True); time.sleep(60)"]  # fmt: skip
    part = check.Part("hang", "a part that hangs", 1, 6, lambda ctx: [sleeper, sleeper],
                      lambda ctx, codes: ("ok", "finished"))  # fmt: skip
    start = time.monotonic()
    outcome = check.run_part(part, ctx, dict(os.environ), deadline=time.monotonic() + 60, log=lambda m: None)
    assert time.monotonic() - start < 20  # its child process was killed with it (the process group)
    assert outcome.status == "failed" and outcome.figure.startswith("timeout")
    assert "started" in (ctx.logs / "hang.log").read_text() and "killed after" in (ctx.logs / "hang.log").read_text()
    quick = check.Part("late", "after the budget", 1, 100, lambda ctx: [[sys.executable, "-c", "pass"]],
                       lambda ctx, codes: ("ok", ""))  # fmt: skip
    outcome = check.run_part(quick, ctx, dict(os.environ), deadline=time.monotonic() + 2, log=lambda m: None)
    assert outcome.status == "not run" and "budget" in outcome.figure  # not started: too little budget left


def test_summary_block_and_pasting_the_blocks_into_the_docs(check, tmp_path):
    outcomes = [check.Outcome("install", "missing dependencies", "ok", 6.2, "nothing missing"),
                check.Outcome("tests", "CUDA tests", "failed", 85.0, "30 passed, 1 failed | odd"),
                check.Outcome("qlora", "QLoRA step", "skipped", 4.0, "bitsandbytes is not installed")]  # fmt: skip
    block = check.summary_block(outcomes, "NVIDIA H200; torch 2.11.0", total_s=500, budget_s=480)
    assert block.startswith("<!-- gpu:check:start -->\n") and block.endswith("<!-- gpu:check:end -->\n")
    assert "Total 8 min 20 s (over the 8 min 00 s budget); 1 failed or not run (tests)." in block
    assert "| tests: CUDA tests | failed | 85 s | 30 passed, 1 failed / odd |" in block  # a | would break the table
    blocks = tmp_path / "blocks"
    blocks.mkdir()
    (blocks / "check.md").write_text(block)
    (blocks / "speed.md").write_text("<!-- speed:interleaved-gpu:start -->\nnew speed\n<!-- speed:interleaved-gpu:end -->\n")
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# B\n\n## GPU: roofline\n\ntext\n\n<!-- speed:interleaved-gpu:start -->\nold\n"
                    "<!-- speed:interleaved-gpu:end -->\n\nmore\n\n## Quality\n\nq\n")  # fmt: skip
    assert check.paste_blocks(blocks, docs) == ["gpu:check", "speed:interleaved-gpu"]
    text = docs.read_text()
    assert "new speed" in text and "old" not in text  # replaced in place
    assert text.index("more") < text.index("<!-- gpu:check:start -->") < text.index("## Quality")  # appended to GPU
    assert check.paste_blocks(blocks, docs) and docs.read_text() == text  # pasting again changes nothing


def test_the_speed_summary_names_the_ratios(check, tmp_path):
    ctx = check.Context(python=sys.executable, out=tmp_path, rounds=1)
    ctx.logs.mkdir()
    rows = [{"trainer": "dpo", "wall_ratio_median": 1.0, "device_ratio_median": 1.0, "syncs": 21},
            {"trainer": "tdpo2", "wall_ratio_median": 1.24, "device_ratio_median": 1.004, "syncs": 2}]  # fmt: skip
    (ctx.logs / "speed-gpu.json").write_text(check.json.dumps({"rows": rows}))
    assert check.summarize_speed(ctx, [0, 1]) == ("failed", "4x1024: tdpo2 wall 1.24x, GPU 1.004x, 2 syncs; dpo 21 syncs")


@pytest.mark.slow
def test_a_whole_check_with_stand_in_parts_writes_the_table_and_blocks_and_fails_on_a_failed_part(check, tmp_path,
                                                                                                     monkeypatch):
    # Everything but the GPU: here nothing is missing (no WHEELS needed), the environment probe runs for real, and
    # two stand-in parts (one passes, one fails) take the places of the GPU parts
    monkeypatch.setattr(check, "gpu_present", lambda: None)
    monkeypatch.setattr(check, "torch_state", lambda: "cuda")
    python = [sys.executable, "-c"]
    monkeypatch.setattr(check, "PARTS", (
        check.Part("good", "a part that passes", 1, 30, lambda ctx: [python + ["print('fine')"]],
                   lambda ctx, codes: (check._ok(codes), "figure 1.00x")),
        check.Part("bad", "a part that fails", 1, 30, lambda ctx: [python + ["raise SystemExit('broken')"]],
                   lambda ctx, codes: (check._ok(codes), "no figures")),
    ))  # fmt: skip
    out = tmp_path / "out"
    code = check.main(["--out", str(out), "--site", str(tmp_path / "site"), "--commit", "abc1234", "--budget", "120"])
    assert code == 1
    summary = (out / "summary.md").read_text()
    assert summary == (out / "blocks" / "check.md").read_text()
    assert "commit abc1234" in summary and f"torch {torch.__version__}" in summary and "1 failed or not run (bad)" in summary
    assert "| install: missing dependencies from WHEELS | ok |" in summary and "| nothing missing |" in summary
    assert "| good: a part that passes | ok |" in summary and "| bad: a part that fails | failed |" in summary
    assert "broken" in (out / "logs" / "bad.log").read_text() and "broken" in (out / "gpu_check.log").read_text()
    assert [o["status"] for o in check.json.loads((out / "results.json").read_text())["outcomes"]] == [
        "ok", "ok", "failed"]


# ----------------------------------------------------------------------------------------------------------------------
# The install step end to end, against a Python like the GPU machine's


def _repack(name: str, folder: Path) -> Path:
    """A wheel of an installed distribution of this Python, made from its installed files (no network)."""
    dist = importlib.metadata.distribution(name)
    stem = f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}"
    path = folder / f"{stem}-py3-none-any.whl"
    records = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for file in dist.files:
            text = str(file)
            if text.startswith("..") or "__pycache__" in text or text.endswith((".dist-info/RECORD", "INSTALLER",
                                                                                  "direct_url.json", "REQUESTED")):
                continue
            data = Path(dist.locate_file(file)).read_bytes()
            if text.endswith(".dist-info/WHEEL"):
                data = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
            archive.writestr(text, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{text},sha256={digest},{len(data)}")
        dist_info = next(str(f).split("/")[0] for f in dist.files if ".dist-info/" in str(f))
        archive.writestr(f"{dist_info}/RECORD", "\n".join(records + [f"{dist_info}/RECORD,,"]) + "\n")
    return path


MISSING_ON_THE_GPU_MACHINE = ("trl", "datasets", "dill", "multiprocess")


@pytest.fixture(scope="module")
def gpu_like_python(tmp_path_factory):
    """A venv whose Python sees this one's packages (torch, peft, accelerate, ...) except trl, datasets, dill,
    multiprocess and this package, and sees transformers as 5.17.0: the GPU machine's situation. Its own pip."""
    root = tmp_path_factory.mktemp("gpu-like")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=300)
    python = root / "venv" / "bin" / "python"
    site_packages = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    hidden = {"pip", "setuptools", "wheel", "trl-tokenpo", "transformers", *MISSING_ON_THE_GPU_MACHINE}
    hidden_entries = set()
    for dist in importlib.metadata.distributions():
        if (dist.metadata["Name"] or "").lower().replace("_", "-") in hidden:
            hidden_entries |= {str(f).split("/")[0] for f in dist.files or [] if not str(f).startswith("..")}
    ours = Path(importlib.metadata.distribution("torch").locate_file(""))
    base = root / "base"
    base.mkdir()
    for entry in ours.iterdir():
        if entry.name in hidden_entries or entry.suffix == ".pth" or entry.name.startswith(("__editable__", "_distutils")):
            continue
        (base / entry.name).symlink_to(entry)
    # transformers 5.17: the package itself, with metadata that says 5.17.0 (below the 5.18 lower bound)
    (base / "transformers").symlink_to(ours / "transformers")
    info = base / "transformers-5.17.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 5.17.0\n")
    (site_packages / "gpu_machine_packages.pth").write_text(str(base) + "\n")
    wheels = root / "wheels"
    wheels.mkdir()
    for name in ("transformers", *MISSING_ON_THE_GPU_MACHINE):
        _repack(name, wheels)
    return python, wheels


@pytest.mark.slow
def test_install_only_makes_trl_datasets_and_the_package_importable_from_wheels_alone(gpu_like_python, tmp_path):
    python, wheels = gpu_like_python
    missing = subprocess.run([str(python), "-c", "import trl"], capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "No module named 'trl'" in missing.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHON=str(python), SITE=str(tmp_path / "site"), PIP_NO_INDEX="1", PIP_FIND_LINKS="")

    # without the wheels: refused, naming what is missing, before installing anything
    proc = subprocess.run(["bash", str(SCRIPT), "--install-only"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    for name, state in (("trl", "not installed"), ("datasets", "not installed"), ("transformers", "5.17.0 installed")):
        assert re.search(rf"^  {name}[<>=].*: {state}, and no matching wheel", proc.stderr, re.M), proc.stderr
    assert "download_gpu_wheels.sh" in proc.stderr and not (tmp_path / "site").exists()

    proc = subprocess.run(["bash", str(SCRIPT), "--install-only"], env=dict(env, WHEELS=str(wheels)),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    installing = set(re.findall(r"installing (\S+?)-", proc.stdout))
    assert installing == {"transformers", "trl", "datasets", "dill", "multiprocess"}, proc.stdout
    assert "5.17.0 installed" in proc.stdout  # transformers: too old, replaced
    pythonpath = re.search(r"^export PYTHONPATH=(.+)$", proc.stdout, re.M).group(1)
    assert pythonpath.split(os.pathsep)[:2] == [str((tmp_path / "site").resolve()), str(REPO)]

    code = ("import datasets, torch, transformers, trl, trl_tokenpo; "
            "print(trl.__file__, datasets.__file__, transformers.__version__, trl_tokenpo.__file__, torch.__file__)")
    proc = subprocess.run([str(python), "-c", code], env=dict(env, PYTHONPATH=pythonpath), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    trl_file, datasets_file, transformers_version, package_file, torch_file = proc.stdout.split()
    site = str((tmp_path / "site").resolve())
    assert trl_file.startswith(site) and datasets_file.startswith(site)
    assert transformers_version == importlib.metadata.version("transformers") != "5.17.0"
    assert package_file.startswith(str(REPO)) and not torch_file.startswith(site)
    # the check's pytest runs there: the CUDA-marked tests collect (and skip without a GPU)
    proc = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", "-m", "cuda",
                           "tests/test_kernels_cuda.py", "tests/test_cuda_jobs.py"], env=dict(env, PYTHONPATH=pythonpath),
                          capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and re.search(r"\d+ tests collected", proc.stdout), proc.stdout[-3000:]


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
