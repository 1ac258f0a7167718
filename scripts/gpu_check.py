#!/usr/bin/env python
"""The one-shot GPU check: what scripts/gpu_check.sh runs, with the Python it is given (see that script's header for the
parts, their expected times and the exact commands).

Standard library only (plus ``packaging``, or pip's own copy of it), so that it runs before anything is installed:

1. refuse within seconds, with exit status 2, where there is no CUDA GPU or ``PYTHON`` has no CUDA build of torch;
2. install what ``PYTHON`` lacks of the package's dependencies (``pyproject.toml``) and of the check's own
   (``CHECK_REQUIREMENTS``), and their own missing requirements, from the wheels folder ``WHEELS`` with ``pip install
   --no-index --no-deps --target SITE``; ``SITE`` then the repository go first on ``PYTHONPATH`` (no venv, no editable
   install);
3. run the parts (``PARTS``) one after the other, each in its own processes with its own timeout, all within the
   budget (8 minutes by default);
4. print one summary table, write the docs blocks under ``OUT/blocks`` (``--paste`` puts them into
   docs/benchmarks.md) and exit non-zero if a part failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import email.parser
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable
from pathlib import Path


try:
    from packaging.requirements import Requirement
    from packaging.tags import sys_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version
except ImportError:  # pip's vendored copy (pip is needed for the install anyway)
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.tags import sys_tags
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
    from pip._vendor.packaging.version import Version


REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
# What the check runs besides the package's dependencies
CHECK_REQUIREMENTS = ("pytest>=8",)
BUDGET_S = 480
SITE_MARKER = ".trl-tokenpo-gpu-site"  # a SITE folder the check made (and may empty again)
# Modules the environment line of the summary names, and that must import after the install
PROBED = ("torch", "triton", "transformers", "trl", "peft", "datasets", "accelerate", "trl_tokenpo")
ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1",
}  # fmt: skip


class CheckError(Exception):
    """The check cannot run here (exit status 2), with the reason and what to do."""


# ----------------------------------------------------------------------------------------------------------------------
# The install step
# ----------------------------------------------------------------------------------------------------------------------


def project_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """``[project] dependencies`` of pyproject.toml."""
    text = pyproject.read_text()
    try:
        import tomllib

        return list(tomllib.loads(text)["project"]["dependencies"])
    except ModuleNotFoundError:  # Python 3.10: the list itself
        block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
        return re.findall(r'"([^"]+)"', block)


def installed_distributions(exclude: tuple[Path, ...] = ()) -> dict[str, tuple[str, list[str]]]:
    """``{canonical name: (version, requirements)}`` of what this Python imports, as import would find it (the first
    on ``sys.path`` wins), leaving out the folders ``exclude`` (the check's own SITE and the repository)."""
    import importlib.metadata

    excluded = [p.resolve() for p in exclude]
    path = [p for p in sys.path if not any(Path(p or ".").resolve() == e for e in excluded)]
    found = {}
    for dist in importlib.metadata.distributions(path=path):
        name = dist.metadata["Name"]
        if name and canonicalize_name(name) not in found:
            found[canonicalize_name(name)] = (dist.version, list(dist.requires or []))
    return found


@dataclasses.dataclass(frozen=True)
class Wheel:
    path: Path
    name: str
    version: Version

    def requirements(self) -> list[str]:
        with zipfile.ZipFile(self.path) as archive:
            metadata = next(n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
            message = email.parser.Parser().parsestr(archive.read(metadata).decode())
        return message.get_all("Requires-Dist") or []


def compatible_wheels(folder: Path | None) -> dict[str, list[Wheel]]:
    """The wheels of ``folder`` this Python can install (by their tags), by canonical name, newest first."""
    if folder is None:
        return {}
    tags = set(sys_tags())
    wheels: dict[str, list[Wheel]] = {}
    for path in sorted(Path(folder).glob("*.whl")):
        name, version, _, wheel_tags = parse_wheel_filename(path.name)
        if tags & set(wheel_tags):
            wheels.setdefault(name, []).append(Wheel(path, name, version))
    for found in wheels.values():
        found.sort(key=lambda w: w.version, reverse=True)
    return wheels


@dataclasses.dataclass
class Plan:
    install: dict[str, Wheel] = dataclasses.field(default_factory=dict)
    reasons: dict[str, str] = dataclasses.field(default_factory=dict)
    errors: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)


def _applies(requirement: Requirement, extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({"extra": extra}) for extra in extras | {""})


def _extra_requirements(name: str, requirement: Requirement, requires: list[str]) -> list:
    """What the extras ``requirement`` asks for (``fsspec[http]``) add to the installed distribution ``name``."""
    extras = set(requirement.extras)
    subs = [Requirement(r) for r in requires] if extras else []
    return [(sub, f"{name}[{','.join(sorted(extras))}]", False) for sub in subs
            if _applies(sub, extras) and not _applies(sub, set())]  # fmt: skip


def plan_install(requirements, installed: dict[str, tuple[str, list[str]]], wheels: dict[str, list[Wheel]]) -> Plan:
    """Which wheels to install: every requirement (``requirements``: the direct ones) that ``installed`` lacks or
    holds at a version outside its range, and then, through the chosen wheels' metadata, their own requirements.

    A requirement met by an installed distribution is left alone. One that is not, and has a matching wheel, gets the
    newest such wheel. Without a wheel: an error when it is missing, or when a direct requirement is out of range; a
    warning (the installed version is kept, as ``pip --no-deps`` would) when an indirect one is out of range.
    """
    plan = Plan()
    # (a requirement whose environment marker excludes this Python is left out; queued ones were checked already)
    queue = [(r, "pyproject.toml / the check", True) for r in map(Requirement, requirements) if _applies(r, set())]
    while queue:
        requirement, parent, direct = queue.pop(0)
        name = canonicalize_name(requirement.name)
        if name in plan.install:
            if plan.install[name].version not in requirement.specifier:
                plan.errors.append(f"{name} {plan.install[name].version} (chosen for {plan.reasons[name]}) does not "
                                   f"meet {requirement} of {parent}")
            continue
        version, requires = installed.get(name, (None, []))
        if version is not None and requirement.specifier.contains(version, prereleases=True):
            queue.extend(_extra_requirements(name, requirement, requires))
            continue
        candidates = [w for w in wheels.get(name, []) if requirement.specifier.contains(w.version, prereleases=True)]
        have = f"{version} installed" if version else "not installed"
        if candidates:
            wheel = candidates[0]
            plan.install[name], plan.reasons[name] = wheel, f"{requirement} of {parent}: {have}"
            for sub in map(Requirement, wheel.requirements()):
                if _applies(sub, set(requirement.extras)):
                    queue.append((sub, f"{name} {wheel.version}", False))
        elif version is None or direct:
            plan.errors.append(f"{requirement} (for {parent}): {have}, and no matching wheel in the wheels folder")
        else:
            plan.warnings.append(f"{name} {version} is installed, outside {requirement} of {parent}, and no wheel "
                                 "matches: kept (pip --no-deps does the same)")
            queue.extend(_extra_requirements(name, requirement, requires))
    return plan


def prepare_site(site: Path) -> None:
    """An empty SITE folder: made here, or emptied when an earlier check made it (its marker file)."""
    if site.exists():
        if not (site / SITE_MARKER).exists() and any(site.iterdir()):
            raise CheckError(f"SITE={site} is not empty and was not made by this check: choose another folder.")
        shutil.rmtree(site)
    site.mkdir(parents=True)
    (site / SITE_MARKER).write_text("made by scripts/gpu_check.py; emptied at each install\n")


def child_environment(site: Path) -> dict[str, str]:
    """The environment of every process of the check: SITE, then the repository, first on ``PYTHONPATH``."""
    env = dict(os.environ)
    env.update(ENVIRONMENT)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def install(wheels_folder: Path | None, site: Path, log=print) -> dict:
    """The install step: plan, install into ``site``, then check in a fresh process that every requirement is met and
    every module of ``PROBED`` imports. Returns the probe's report plus ``installed`` (name -> version) and
    ``warnings``; raises CheckError when it cannot be done."""
    requirements = project_requirements() + list(CHECK_REQUIREMENTS)
    plan = plan_install(requirements, installed_distributions(exclude=(site, REPO)), compatible_wheels(wheels_folder))
    for warning in plan.warnings:
        log(f"gpu_check: warning: {warning}")
    if plan.errors:
        hint = ("give WHEELS=<folder of wheels> (scripts/download_gpu_wheels.sh downloads them on a machine with a "
                "package index)" if wheels_folder is None else f"add the wheels to {wheels_folder} "
                "(scripts/download_gpu_wheels.sh)")
        raise CheckError("cannot install what this Python lacks:\n  " + "\n  ".join(plan.errors) + f"\n{hint}.")
    prepare_site(site)
    if plan.install:
        for name, wheel in plan.install.items():
            log(f"gpu_check: installing {wheel.path.name} ({plan.reasons[name]})")
        command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--quiet",
                   "--disable-pip-version-check", "--target", str(site), *(str(w.path) for w in plan.install.values())]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CheckError(f"pip install into {site} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    probe = probe_environment(site, requirements)
    problems = probe["unmet"] + [f"import {name}: {info['error']}" for name, info in probe["modules"].items()
                                 if "error" in info]  # fmt: skip
    origin = probe["modules"].get("trl_tokenpo", {}).get("file", "")
    if origin and not Path(origin).resolve().is_relative_to(REPO):
        problems.append(f"trl_tokenpo imports from {origin}, not from this repository")
    if problems:
        raise CheckError("after the install:\n  " + "\n  ".join(problems))
    probe["installed"] = {name: str(w.version) for name, w in plan.install.items()}
    probe["warnings"] = plan.warnings
    return probe


def probe_environment(site: Path, requirements: list[str]) -> dict:
    """Run ``--probe`` in a fresh process with the check's environment."""
    command = [sys.executable, str(Path(__file__).resolve()), "--probe", json.dumps(requirements)]
    proc = subprocess.run(command, capture_output=True, text=True, env=child_environment(site), cwd=REPO)
    if proc.returncode != 0:
        raise CheckError(f"the environment probe failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def probe(requirements: list[str]) -> dict:
    """In the check's environment: the versions and origins of ``PROBED``, the CUDA device, and the requirements that
    the importable distributions do not meet."""
    import importlib
    import importlib.metadata

    report = {"python": sys.version.split()[0], "modules": {}, "unmet": []}
    for name in PROBED:
        try:
            module = importlib.import_module(name)
            report["modules"][name] = {"version": getattr(module, "__version__", "?"), "file": module.__file__}
        except Exception as exc:  # noqa: BLE001 - reported, the check stops on it
            report["modules"][name] = {"error": f"{type(exc).__name__}: {exc}"}
    for text in requirements:
        requirement = Requirement(text)
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            report["unmet"].append(f"{requirement}: not installed")
            continue
        if not requirement.specifier.contains(version, prereleases=True):
            report["unmet"].append(f"{requirement}: {version} installed")
    import torch

    report["cuda"] = torch.version.cuda
    report["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return report


# ----------------------------------------------------------------------------------------------------------------------
# The parts
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    python: str
    out: Path
    rounds: int

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def blocks(self) -> Path:
        return self.out / "blocks"


@dataclasses.dataclass(frozen=True)
class Part:
    """One part of the check: its commands (run in order, in the repository, with the check's environment), its
    expected time on one H200 and its timeout, and how its outcome reads (``summarize(ctx, return_codes)`` ->
    ``(status, key figure)``)."""

    name: str
    title: str
    expected_s: int
    timeout_s: int
    commands: Callable[[Context], list[list[str]]]
    summarize: Callable[[Context, list[int]], tuple[str, str]]


def cuda_test_files() -> list[str]:
    """The test files with CUDA-marked tests, except the whole jobs, which are parts of their own."""
    return [f"tests/{p.name}" for p in sorted((REPO / "tests").glob("test_*.py"))
            if "pytest.mark.cuda" in p.read_text() and p.name != "test_cuda_jobs.py"]  # fmt: skip


def pytest_command(ctx: Context, name: str, targets: list[str], *options: str) -> list[str]:
    return [ctx.python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-o", "junit_family=legacy",
            f"--junitxml={ctx.logs / (name + '.xml')}", *options, *targets]  # fmt: skip


def junit_outcomes(path: Path) -> list[dict]:
    """Per test case of a JUnit XML file: its name, outcome (passed, failed, skipped), message and properties."""
    if not path.exists():
        return []
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "skipped" if child.tag == "skipped" else "failed"
                message = (child.get("message") or "").strip()
        properties = {p.get("name"): p.get("value") for p in case.iter("property")}
        cases.append({"name": case.get("name"), "outcome": outcome, "message": message, "properties": properties})
    return cases


def summarize_tests(ctx: Context, name: str, codes: list[int]) -> tuple[str, str]:
    """A pytest part: failed if pytest failed or a test failed, skipped if every test was skipped."""
    cases = junit_outcomes(ctx.logs / f"{name}.xml")
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "skipped")}
    figure = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    failed = [c["name"] for c in cases if c["outcome"] == "failed"]
    if failed:
        figure += " (" + ", ".join(failed[:3]) + (", ..." if len(failed) > 3 else "") + ")"
    properties = [f"{k} {v}" for c in cases for k, v in c["properties"].items()]
    if properties:
        figure += "; " + ", ".join(properties)
    reasons = sorted({re.sub(r"^Skipped: ", "", c["message"]) for c in cases if c["outcome"] == "skipped"})
    if cases and counts["skipped"] == len(cases):
        return "skipped", "; ".join(reasons)
    if failed or not cases or any(code != 0 for code in codes):
        return "failed", figure if cases else f"pytest exit status {codes[-1] if codes else '?'}, no test ran"
    return "ok", figure


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _ok(codes: list[int]) -> str:
    return "ok" if codes and all(code == 0 for code in codes) else "failed"


def summarize_lm_head(ctx: Context, codes: list[int]) -> tuple[str, str]:
    figures = _read_json(ctx.logs / "lm-head.json").get("Qwen2.5-0.5B", {})
    keys = (("dpo", "DPO"), ("tdpo2/fused", "TDPO2"), ("tisdpo-reverse/fused", "TIS-DPO rev."))
    cells = [f"{label} {figures[key]['measured_ms']:.1f}" for key, label in keys if key in figures]
    return _ok(codes), ("Qwen2.5-0.5B head, ms: " + ", ".join(cells)) if cells else "no figures"


def _speed_figure(rows: list[dict], label: str) -> str:
    cells = []
    for row in rows:
        if row["trainer"] in ("tdpo2", "tisdpo-reverse"):
            syncs = "" if row.get("syncs") is None else f", {row['syncs']:.0f} syncs"
            cells.append(f"{row['trainer']} wall {row['wall_ratio_median']:.2f}x, GPU {row['device_ratio_median']:.3f}x"
                         + syncs)
    dpo = next((r for r in rows if r["trainer"] == "dpo"), None)
    if dpo is not None and dpo.get("syncs") is not None:
        cells.append(f"dpo {dpo['syncs']:.0f} syncs")
    return f"{label}: " + "; ".join(cells)


def summarize_speed(ctx: Context, codes: list[int], sizes=(("gpu", "4x1024"), ("gpu-2k", "8x2048"))) -> tuple[str, str]:
    parts = [_speed_figure(_read_json(ctx.logs / f"speed-{size}.json").get("rows", []), label)
             for size, label in sizes if (ctx.logs / f"speed-{size}.json").exists()]
    return _ok(codes), " | ".join(parts) or "no figures"


def summarize_llama(ctx: Context, codes: list[int]) -> tuple[str, str]:
    rows = _read_json(ctx.logs / "speed-gpu-llama8b.json").get("rows", [])
    figure = _speed_figure(rows, "8B-shaped")
    peaks = [f"{r['trainer']} {r['step_transient_mib']:.0f}" for r in rows if r.get("step_transient_mib") is not None]
    return _ok(codes), (figure + "; step peak MiB: " + ", ".join(peaks)) if rows else "no figures"


def summarize_estimator(ctx: Context, codes: list[int]) -> tuple[str, str]:
    status, figure = summarize_tests(ctx, "estimator", codes[:1])
    throughput = _read_json(ctx.logs / "estimator-gpu.json").get("throughput", {})
    if "forward-x2" in throughput and "estimator-adapters" in throughput:
        ratio = throughput["estimator-adapters"]["tokens_per_s"] / throughput["forward-x2"]["tokens_per_s"]
        figure += f"; scoring {ratio:.2f}x of two plain forwards (goal >= 0.8x)"
    return (status if _ok(codes[1:]) == "ok" else "failed"), figure


def _python_script(ctx: Context, script: str, *args: str) -> list[str]:
    return [ctx.python, f"scripts/{script}", *args]


def _speed_command(ctx: Context, size: str, trainers: tuple[str, ...], rounds: int) -> list[str]:
    return _python_script(ctx, "benchmark_speed.py", "--size", size, "--in-process", "--trainers", *trainers,
                          "--rounds", str(rounds), "--warmup", "1", "--steps", "2",
                          "--markdown", str(ctx.blocks / f"speed-interleaved-{size}.md"),
                          "--json", str(ctx.logs / f"speed-{size}.json"))  # fmt: skip


SPEED_TRAINERS = ("dpo", "tdpo2", "tisdpo-reverse", "tisdpo-none")
JOBS = "tests/test_cuda_jobs.py::"

PARTS = (
    Part("tests", "CUDA tests (pytest -m cuda)", 100, 200,
         lambda ctx: [pytest_command(ctx, "tests", cuda_test_files(), "-m", "cuda")],
         lambda ctx, codes: summarize_tests(ctx, "tests", codes)),
    Part("speed", "one step, 4 x 1024 and 8 x 2048 (benchmark_speed --in-process)", 120, 230,
         lambda ctx: [_speed_command(ctx, "gpu", SPEED_TRAINERS, ctx.rounds),
                      _speed_command(ctx, "gpu-2k", SPEED_TRAINERS, ctx.rounds)],
         summarize_speed),
    Part("lm-head", "LM head alone (roofline.py --measure)", 35, 100,
         lambda ctx: [_python_script(ctx, "roofline.py", "--measure",
                                     "--markdown", str(ctx.blocks / "roofline-measured.md"),
                                     "--json", str(ctx.logs / "lm-head.json"))],
         summarize_lm_head),
    Part("estimator", "estimator: fit, score, AUROC; scoring throughput", 70, 180,
         lambda ctx: [pytest_command(ctx, "estimator", [JOBS + "test_estimator_end_to_end_on_cuda"]),
                      _python_script(ctx, "benchmark_speed.py", "--size", "gpu", "--only-estimator", "--scorers",
                                     "estimator-adapters", "--no-memory", "--rounds", "1", "--warmup", "1", "--steps",
                                     "3", "--markdown", str(ctx.blocks / "estimator-gpu.md"),
                                     "--json", str(ctx.logs / "estimator-gpu.json"))],
         summarize_estimator),
    Part("main-job", "scripts/train_tisdpo.py end to end", 55, 150,
         lambda ctx: [pytest_command(ctx, "main-job", [JOBS + "test_train_tisdpo_script_end_to_end_on_cuda"])],
         lambda ctx, codes: summarize_tests(ctx, "main-job", codes)),
    Part("llama8b", "Llama-3.1-8B-shaped LoRA step (2 layers)", 40, 100,
         lambda ctx: [_speed_command(ctx, "gpu-llama8b", SPEED_TRAINERS[:3], 2)],
         summarize_llama),
    Part("qlora", "QLoRA step (bitsandbytes)", 10, 60,
         lambda ctx: [pytest_command(ctx, "qlora", [JOBS + "test_qlora_step_on_cuda"])],
         lambda ctx, codes: summarize_tests(ctx, "qlora", codes)),
    Part("zero3", "DeepSpeed ZeRO-3 step, one process", 10, 90,
         lambda ctx: [pytest_command(ctx, "zero3", [JOBS + "test_deepspeed_zero3_step_on_cuda"])],
         lambda ctx, codes: summarize_tests(ctx, "zero3", codes)),
)
PART_NAMES = tuple(p.name for p in PARTS)


@dataclasses.dataclass
class Outcome:
    name: str
    title: str
    status: str  # ok, failed, skipped, not run
    seconds: float
    figure: str


def run_command(command: list[str], env: dict, log_path: Path, timeout: float) -> int:
    """Run one command, its output appended to ``log_path``; on timeout its whole process group is killed (exit
    status 124, as ``timeout`` gives)."""
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)  # fmt: skip
        try:
            return proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.write(f"\ngpu_check: killed after {timeout:.0f} s (timeout)\n")
            return 124


def run_part(part: Part, ctx: Context, env: dict, deadline: float, log=print) -> Outcome:
    """The part's commands in order, each within what is left of the part's timeout and of the whole budget."""
    log_path = ctx.logs / f"{part.name}.log"
    start = time.monotonic()
    codes = []
    for command in part.commands(ctx):
        left = min(part.timeout_s - (time.monotonic() - start), deadline - time.monotonic())
        if left < 5 and not codes:
            return Outcome(part.name, part.title, "not run", 0.0, f"{max(left, 0):.0f} s of the budget left")
        if left < 5:
            codes.append(124)
            break
        codes.append(run_command(command, env, log_path, left))
    seconds = time.monotonic() - start
    try:
        status, figure = part.summarize(ctx, codes)
    except Exception as exc:  # noqa: BLE001 - a broken summary is this part's failure, not the check's
        status, figure = "failed", f"summary: {type(exc).__name__}: {exc}"
    if 124 in codes:
        status, figure = "failed", f"timeout ({seconds:.0f} s); " + figure
    if status == "failed" and log_path.exists():
        tail = log_path.read_text(errors="replace").splitlines()[-40:]
        log(f"gpu_check: {part.name} FAILED; the end of {log_path}:\n" + "\n".join("    " + line for line in tail))
    return Outcome(part.name, part.title, status, seconds, figure)


# ----------------------------------------------------------------------------------------------------------------------
# Summary table and docs blocks
# ----------------------------------------------------------------------------------------------------------------------

BLOCK_MARKERS = re.compile(r"<!-- (?P<name>[\w:.-]+):start -->\n.*?<!-- (?P=name):end -->\n?", re.S)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def environment_line(report: dict, commit: str) -> str:
    modules = report.get("modules", {})
    versions = ", ".join(f"{name} {modules[name]['version']}" for name in PROBED[:-1]
                         if "version" in modules.get(name, {}))  # fmt: skip
    return (f"{report.get('device') or 'no CUDA device'}; Python {report.get('python', '?')}, CUDA "
            f"{report.get('cuda') or '-'}, {versions}; commit {commit}; {datetime.date.today().isoformat()}")


def summary_table(outcomes: list[Outcome]) -> str:
    lines = ["| part | status | time | key figure |", "|---|---|---:|---|"]
    for o in outcomes:
        figure = o.figure.replace("|", "/").replace("\n", " ")
        lines.append(f"| {o.name}: {o.title} | {o.status} | {_duration(o.seconds)} | {figure} |")
    return "\n".join(lines)


def summary_block(outcomes: list[Outcome], environment: str, total_s: float, budget_s: float) -> str:
    """The docs block of the check: environment, total time against the budget, the table."""
    failed = [o.name for o in outcomes if o.status in ("failed", "not run")]
    verdict = f"{len(failed)} failed or not run ({', '.join(failed)})" if failed else "nothing failed"
    over = "" if total_s <= budget_s else f" (over the {_duration(budget_s)} budget)"
    return (
        "<!-- gpu:check:start -->\n"
        "### The one-shot check, `bash scripts/gpu_check.sh`\n\n"
        f"{environment}. Total {_duration(total_s)}{over}; {verdict}.\n\n"
        f"{summary_table(outcomes)}\n"
        "<!-- gpu:check:end -->\n"
    )


def paste_blocks(folder: Path, docs: Path = DOCS) -> list[str]:
    """Put every marked block of ``folder``'s ``*.md`` files into ``docs`` verbatim: over the block of the same name,
    or, when the docs lack it, at the end of the ``## GPU`` section. Returns the names pasted."""
    text = docs.read_text()
    pasted = []
    for path in sorted(Path(folder).glob("*.md")):
        for match in BLOCK_MARKERS.finditer(path.read_text()):
            block, name = match.group(0).rstrip("\n") + "\n", match.group("name")
            existing = re.search(rf"<!-- {re.escape(name)}:start -->\n.*?<!-- {re.escape(name)}:end -->\n?", text,
                                 re.S)  # fmt: skip
            if existing:
                text = text[: existing.start()] + block + text[existing.end():]
            else:
                section = re.search(r"^## GPU.*$", text, re.M)
                if section is None:
                    raise CheckError(f"{docs} has no '## GPU' section to put the block {name} in")
                following = re.search(r"^## ", text[section.end():], re.M)
                cut = section.end() + following.start() if following else len(text)
                text = text[:cut].rstrip("\n") + "\n\n" + block + ("\n" + text[cut:] if following else "")
            pasted.append(name)
    docs.write_text(text)
    return pasted


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def gpu_present() -> None:
    """Raise CheckError unless ``nvidia-smi`` lists a GPU (no Python package is imported for this)."""
    if shutil.which("nvidia-smi") is None:
        raise CheckError("no CUDA GPU here (no NVIDIA driver: nvidia-smi not found). This check needs a machine with "
                         "one CUDA GPU; on a CPU machine the test suite checks the Triton kernels in Triton's "
                         "interpreter: .venv/bin/python -m pytest -q. (--install-only runs the install step alone.)")
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        listing = ""
    if not re.search(r"^GPU \d", listing, re.M):
        raise CheckError("no CUDA GPU here (nvidia-smi lists none). This check needs a machine with one CUDA GPU.")


def torch_state() -> str:
    """``"cuda"``, ``"cpu"`` (torch without a usable GPU) or ``"missing"``, asked in a fresh process (PYTHONPATH as
    given: torch must be this Python's own)."""
    code = "import torch, sys; print('cuda' if torch.cuda.is_available() else 'cpu')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "missing"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="The one-shot GPU check (run it through scripts/gpu_check.sh; see its header).")
    parser.add_argument("--parts", nargs="+", choices=PART_NAMES, default=None,
                        help="The parts to run, in the check's order (default: all).")
    parser.add_argument("--skip", nargs="+", choices=PART_NAMES, default=[], help="Parts not to run.")
    parser.add_argument("--install-only", action="store_true",
                        help="Only the install step (no GPU needed; torch must be installed): prints the PYTHONPATH.")
    parser.add_argument("--list", action="store_true", help="List the parts, their expected time and timeout.")
    parser.add_argument("--paste", metavar="BLOCKS", default=None,
                        help="Put the docs blocks of a finished check (OUT/blocks) into docs/benchmarks.md; no GPU.")
    parser.add_argument("--docs", default=str(DOCS), help="With --paste: the docs file (default docs/benchmarks.md).")
    parser.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT", str(REPO / "outputs" / "gpu_check")),
                        help="Results folder (env GPU_CHECK_OUT; default outputs/gpu_check in the repository).")
    parser.add_argument("--wheels", default=os.environ.get("WHEELS") or None,
                        help="Folder of wheels for what is missing (env WHEELS).")
    parser.add_argument("--site", default=os.environ.get("SITE") or str(Path(tempfile.gettempdir())
                                                                        / "trl-tokenpo-gpu-site"),
                        help="Where the missing packages are installed (env SITE; default $TMPDIR/trl-tokenpo-gpu-site).")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="Seconds for all parts together (default 480).")
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("ROUNDS", 3)),
                        help="Interleaved rounds of the step benchmarks (env ROUNDS; default 3).")
    parser.add_argument("--commit", default=os.environ.get("GPU_CHECK_COMMIT"),
                        help="The commit measured, for the docs (default: git rev-parse, when there is a .git).")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.budget <= 0:
        parser.error("--rounds must be >= 1 and --budget > 0")
    return args


def commit_of(args) -> str:
    if args.commit:
        return args.commit
    try:
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                              timeout=10)  # fmt: skip
        if proc.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, cwd=REPO, timeout=10).stdout.strip()  # fmt: skip
            return proc.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "unknown (no git here: pass --commit)"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe(json.loads(args.probe))))
        return 0
    if args.list:
        print(f"{'part':10s} {'expected':>8s} {'timeout':>8s}  what")
        for part in PARTS:
            print(f"{part.name:10s} {part.expected_s:7d}s {part.timeout_s:7d}s  {part.title}")
        print(f"budget: {BUDGET_S} s for the install and all parts together")
        return 0
    try:
        if args.paste:
            names = paste_blocks(Path(args.paste), Path(args.docs))
            print(f"gpu_check: pasted {', '.join(names) or 'nothing'} into {args.docs}")
            return 0
        return run_check(args)
    except CheckError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2


def run_check(args) -> int:
    started = time.monotonic()
    site = Path(args.site).resolve()
    wheels = Path(args.wheels).resolve() if args.wheels else None
    if not args.install_only:
        gpu_present()
    state = torch_state()
    if state == "missing" or (state != "cuda" and not args.install_only):
        what = "has no torch" if state == "missing" else "has a torch that sees no CUDA device"
        raise CheckError(f"PYTHON={sys.executable} {what}. The check uses the Python it is given (no venv): set "
                         "PYTHON to one with a CUDA build of torch (the GPU machine's python3 has one).")
    if wheels is not None and not wheels.is_dir():
        raise CheckError(f"WHEELS={wheels} is not a folder")
    out = Path(args.out).resolve()
    ctx = Context(python=sys.executable, out=out, rounds=args.rounds)
    if not args.install_only:
        for folder in (ctx.logs, ctx.blocks):
            folder.mkdir(parents=True, exist_ok=True)
    transcript = open(out / "gpu_check.log", "w") if not args.install_only else None

    def log(message: str) -> None:
        print(message, flush=True)
        if transcript:
            transcript.write(message + "\n")
            transcript.flush()

    report = install(wheels, site, log)
    env = child_environment(site)
    installed = ", ".join(f"{name} {version}" for name, version in report["installed"].items())
    install_figure = f"into {site}: {installed}" if installed else "nothing missing"
    if report["warnings"]:
        install_figure += f" ({len(report['warnings'])} warning(s), see the log)"
    log(f"gpu_check: environment ready in {time.monotonic() - started:.0f} s ({install_figure})")
    if args.install_only:
        print(f"export PYTHONPATH={env['PYTHONPATH']}")
        return 0
    environment = environment_line(report, commit_of(args))
    log(f"gpu_check: {environment}; results in {out}")
    outcomes = [Outcome("install", "missing dependencies from WHEELS", "ok", time.monotonic() - started,
                        install_figure)]  # fmt: skip
    deadline = started + args.budget  # the install counts too
    for part in PARTS:
        if (args.parts is not None and part.name not in args.parts) or part.name in args.skip:
            continue
        log(f"gpu_check: {part.name}: {part.title} (expected {part.expected_s} s, timeout {part.timeout_s} s) ...")
        outcome = run_part(part, ctx, env, deadline, log)
        outcomes.append(outcome)
        log(f"gpu_check: {part.name}: {outcome.status} in {_duration(outcome.seconds)}: {outcome.figure}")
    total = time.monotonic() - started
    block = summary_block(outcomes, environment, total, args.budget)
    (ctx.blocks / "check.md").write_text(block)
    (out / "summary.md").write_text(block)
    (out / "results.json").write_text(json.dumps({"environment": report, "outcomes": [dataclasses.asdict(o) for o in
                                                                                      outcomes]}, indent=1) + "\n")
    log("\n" + block)
    log(f"gpu_check: docs blocks in {ctx.blocks} (python scripts/gpu_check.py --paste {ctx.blocks}); logs in "
        f"{ctx.logs}")
    if transcript:
        transcript.close()
    return 1 if any(o.status in ("failed", "not run") for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
