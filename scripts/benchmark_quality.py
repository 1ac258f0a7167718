# Copyright 2026 The trl-tokenpo developers. Licensed under the Apache License, Version 2.0.
"""
Quality benchmark: do the TDPO and TIS-DPO papers' claims hold on the built-in task with a known token reward?

From ONE SFT'd tiny model and ONE preference dataset (the built-in synthetic task, `trl_tokenpo.synthetic`), trains

- DPO (`trl.DPOTrainer`), TDPO1, TDPO2 with alpha in {0.1, 0.5, 1.0} (and TDPO2 with alpha=0, which is DPO's
  objective and logs `kl/*`: a consistency check);
- TIS-DPO (exp transform, no KL term) with token rewards from the contrastive estimator (methods prompt, sft, dpo),
  with the TRUE token rewards (oracle), with random rewards (uniform in the transform's clamp range, the paper's random
  weights ablation) and with all weights 1 (must equal DPO),

at several `beta` values (each method traces a reward-vs-KL frontier) and several training seeds (the task, hence the
SFT model, the data and the estimated weights, stays fixed: task seed 0). Every policy is evaluated on the task's
held-out prompts (oracle reward of sampled responses, Monte-Carlo KL(policy || reference), entropy) and held-out pairs
(preference accuracy); the estimator's token rewards are scored against the true ones (AUROC, good vs bad words).

Outputs (under `--output_dir`): `results.jsonl` (one row per run), `auroc.json`, `summary.json`, `summary.md`
(tables), and the plots `quality_frontier.png`, `quality_kl_steps.png` (under `--images_dir`).

```bash
.venv/bin/python scripts/benchmark_quality.py                  # default configuration (~20-30 min on 2 CPU cores)
.venv/bin/python scripts/benchmark_quality.py --quick          # smoke test (< 5 min)
```
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

# Training settings of the built-in run (`trl_tokenpo.cli.BUILTIN_TRAINING_DEFAULTS`), shared by every method.
TRAINING = dict(learning_rate=1e-3, num_train_epochs=1, per_device_train_batch_size=16, max_length=64)
# Estimator adapter training scaled to the tiny model ("tuned"), and the estimator's own defaults ("paper": the paper's
# full fine-tuning rates scaled for LoRA, meant for 0.5B-7B models).
ESTIMATOR_PRESETS = {
    "tuned": {
        "sft": dict(learning_rate=3e-3, num_train_epochs=3),
        "dpo": dict(learning_rate=3e-3, num_train_epochs=2),
    },
    "paper": {"sft": {}, "dpo": {}},
}


@dataclass
class Method:
    """One trained variant. `kind`: "dpo", "tdpo" or "tisdpo"; `weights`: the TIS-DPO token source."""

    name: str
    kind: str
    label: str
    variant: str = "tdpo2"
    alpha: float = 0.0
    weights: str | None = None  # oracle | random | uniform | est:<preset>:<method>
    betas: list[float] | None = None  # None: every beta of the run
    extra: dict = field(default_factory=dict)


def all_methods(presets: list[str], estimator_methods: list[str]) -> list[Method]:
    methods = [
        Method("dpo", "dpo", "DPO"),
        Method("tdpo1", "tdpo", "TDPO1", variant="tdpo1", alpha=0.5),
        Method("tdpo2_a0.1", "tdpo", "TDPO2 α=0.1", alpha=0.1),
        Method("tdpo2_a0.5", "tdpo", "TDPO2 α=0.5", alpha=0.5),
        Method("tdpo2_a1.0", "tdpo", "TDPO2 α=1.0", alpha=1.0),
        Method("tdpo2_a0", "tdpo", "TDPO2 α=0 (=DPO)", alpha=0.0, betas=[]),  # main beta only, see main()
    ]
    for preset in presets:
        suffix = "" if preset == "tuned" else f"_{preset}"
        tag = "" if preset == "tuned" else f", {preset} est."
        for m in estimator_methods:
            if preset != "tuned" and m == "prompt":  # nothing is trained: identical to the tuned preset
                continue
            label = f"TIS-DPO({m[0].upper()}{tag})"
            methods.append(Method(f"tisdpo_{m}{suffix}", "tisdpo", label, weights=f"est:{preset}:{m}"))
    methods += [
        Method("tisdpo_oracle", "tisdpo", "TIS-DPO(oracle)", weights="oracle"),
        Method("tisdpo_random", "tisdpo", "TIS-DPO(random)", weights="random"),
        Method("tisdpo_uniform", "tisdpo", "TIS-DPO(uniform w=1)", weights="uniform", betas=[]),  # main beta only
    ]
    return methods


QUICK_METHODS = ["dpo", "tdpo2_a0.5", "tisdpo_prompt", "tisdpo_oracle", "tisdpo_random", "tisdpo_uniform"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="Smoke test: 6 methods, 2 betas, 1 seed, 8 steps (< 5 min).")
    p.add_argument("--output_dir", default="outputs/benchmark_quality")
    p.add_argument("--images_dir", default="docs/images", help="Where the two PNGs go.")
    p.add_argument("--task_cache_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "trl_tokenpo"))
    p.add_argument("--task_seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="Training seeds (default 0 1 2).")
    p.add_argument("--betas", type=float, nargs="+", default=None, help="Default 0.1 0.3 1.0.")
    p.add_argument(
        "--main_beta", type=float, default=0.1, help="Beta of the per-method tables and KL-over-steps plot."
    )
    p.add_argument("--methods", nargs="+", default=None, help="Subset of method names (default: all).")
    p.add_argument("--estimator_methods", nargs="+", default=["prompt", "sft", "dpo"])
    p.add_argument(
        "--estimator_presets", nargs="+", default=None, choices=list(ESTIMATOR_PRESETS),
        help="'tuned' (adapter lr 3e-3, for this tiny model) and/or 'paper' (the estimator's defaults). Default: both.",
    )  # fmt: skip
    p.add_argument("--max_steps", type=int, default=-1, help="Cap on training steps (-1: one epoch = 32 steps).")
    p.add_argument(
        "--checkpoints", type=int, nargs="+", default=None,
        help="Intermediate steps also evaluated (training-length points of the frontier). Default 8 16 (quick: 4).",
    )  # fmt: skip
    p.add_argument(
        "--train_paper_preset", action="store_true",
        help="Also train TIS-DPO with the 'paper' estimator preset (by default it is only scored: AUROC, scale).",
    )  # fmt: skip
    p.add_argument("--num_samples_per_prompt", type=int, default=None, help="Default 8 (quick: 2).")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--kl_every", type=int, default=4, help="Steps between fixed-batch sequence-KL measurements.")
    p.add_argument("--kl_batch_pairs", type=int, default=64, help="Held-out pairs in the fixed KL batch.")
    p.add_argument("--kl_budgets", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--workers", type=int, default=2, help="Parallel processes (1 torch thread each).")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds or [0]
        args.betas = args.betas or [0.1, 0.3]
        args.methods = args.methods or QUICK_METHODS
        args.estimator_methods = ["prompt"]
        args.estimator_presets = args.estimator_presets or ["tuned"]
        args.max_steps = 8 if args.max_steps < 0 else args.max_steps
        args.num_samples_per_prompt = args.num_samples_per_prompt or 2
        args.kl_batch_pairs = min(args.kl_batch_pairs, 16)
        args.kl_every = 2
        args.checkpoints = args.checkpoints or [4]
    args.seeds = args.seeds or [0, 1, 2]
    args.betas = args.betas or [0.1, 0.3, 1.0]
    args.checkpoints = args.checkpoints or [8, 16]
    args.estimator_presets = args.estimator_presets or ["tuned", "paper"]
    args.num_samples_per_prompt = args.num_samples_per_prompt or 8
    if args.main_beta not in args.betas:
        args.main_beta = args.betas[0] if len(args.betas) == 1 else sorted(args.betas)[len(args.betas) // 2 - 1]
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Worker side (one torch thread per process; the task is loaded once per process)
# ---------------------------------------------------------------------------------------------------------------------

_TASK = None


def _setup_worker():
    import logging

    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass
    import warnings

    warnings.filterwarnings("ignore")


def _task(args):
    global _TASK
    if _TASK is None:
        from trl_tokenpo.synthetic import SyntheticTaskConfig, build_task

        _TASK = build_task(SyntheticTaskConfig(seed=args["task_seed"]), cache_dir=args["task_cache_dir"])
    return _TASK


def _kl_batch(task, num_pairs):
    """Fixed held-out batch for the sequence forward KL: TRL's tokenization of the first eval pairs."""
    from trl_tokenpo.data import tokenize_preference_dataset

    tok = tokenize_preference_dataset(
        task.eval_dataset.select(range(min(num_pairs, len(task.eval_dataset)))), task.tokenizer
    )
    return tok["prompt_ids"], tok["chosen_ids"], tok["rejected_ids"]


def sequence_forward_kl(policy, reference, prompt_ids, completion_ids, pad_id):
    """Per-sequence sum over completion positions (EOS included) of KL(pi_ref || pi_theta) over the full vocabulary:
    the `FKL` of docs/tdpo.md, which TDPOTrainer logs as `kl/chosen` / `kl/rejected`."""
    import torch
    import torch.nn.functional as F

    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    comp = torch.zeros((len(seqs), length - 1), dtype=torch.float32)
    for i, (s, p) in enumerate(zip(seqs, prompt_ids)):
        input_ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        comp[i, len(p) - 1 : len(s) - 1] = 1.0  # position t predicts token t + 1
    out = []
    with torch.no_grad():
        for model in (policy, reference):
            was_training = model.training
            model.eval()
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
            out.append(F.log_softmax(logits, dim=-1))
            model.train(was_training)
    lp_pol, lp_ref = out
    fkl = (lp_ref.exp() * (lp_ref - lp_pol)).sum(-1)
    return (fkl * comp).sum(-1)


def _make_kl_callback(task, kl_pairs, every):
    from transformers import TrainerCallback

    prompt_ids, chosen_ids, rejected_ids = _kl_batch(task, kl_pairs)
    pad_id = task.tokenizer.pad_token_id
    reference = task.model

    class FixedBatchKL(TrainerCallback):
        """Sequence forward KL of chosen and rejected held-out responses, measured every `every` steps."""

        def __init__(self):
            self.history = []

        def _measure(self, step, model):
            chosen = sequence_forward_kl(model, reference, prompt_ids, chosen_ids, pad_id)
            rejected = sequence_forward_kl(model, reference, prompt_ids, rejected_ids, pad_id)
            self.history.append({"step": step, "chosen": float(chosen.mean()), "rejected": float(rejected.mean())})

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._measure(0, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0 or state.global_step == state.max_steps:
                if not self.history or self.history[-1]["step"] != state.global_step:
                    self._measure(state.global_step, model)

    return FixedBatchKL()


def _make_snapshot_callback(steps):
    from transformers import TrainerCallback

    class Snapshots(TrainerCallback):
        """Copies of the policy's weights at the given steps (evaluated after training: training-length frontier)."""

        def __init__(self):
            self.states = {}

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in steps and state.global_step != state.max_steps:
                self.states[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    return Snapshots()


def _token_columns(task, spec, tokenized, rewards, seed):
    """The per-token columns a TIS-DPO run gets, as {column: list of lists}."""
    import numpy as np

    if spec == "uniform":
        return {f"{s}_weights": [[1.0] * len(ids) for ids in tokenized[f"{s}_ids"]] for s in ("chosen", "rejected")}
    if spec == "oracle":
        return {
            f"{s}_token_rewards": [
                task.oracle.token_reward_of_ids(ids, task.tokenizer) for ids in tokenized[f"{s}_ids"]
            ]
            for s in ("chosen", "rejected")
        }
    if spec == "random":
        # The paper's random-weights ablation: rewards uniform in the exp transform's clamp range [L, U] = [-0.5, 1.5],
        # so the weights cover the transform's whole range but carry no information.
        rng = np.random.default_rng(1000 + seed)
        return {
            f"{s}_token_rewards": [rng.uniform(-0.5, 1.5, len(ids)).tolist() for ids in tokenized[f"{s}_ids"]]
            for s in ("chosen", "rejected")
        }
    return rewards[spec]


def train_one(job):
    """Train one (method, beta, seed) and evaluate it. Runs in a worker process."""
    _setup_worker()
    import torch
    from trl import DPOConfig, DPOTrainer

    from trl_tokenpo import TDPOConfig, TDPOTrainer, TISDPOConfig, TISDPOTrainer
    from trl_tokenpo.data import tokenize_preference_dataset
    from trl_tokenpo.evaluation import evaluate_policy, preference_accuracy

    a, m = job["args"], Method(**job["method"])
    task = _task(a)
    beta, seed = job["beta"], job["seed"]
    common = dict(
        output_dir=os.path.join(a["output_dir"], "runs", f"{m.name}_b{beta}_s{seed}"),
        beta=beta, seed=seed, logging_steps=a["kl_every"], save_strategy="no", report_to="none", bf16=False,
        disable_tqdm=True, max_steps=a["max_steps"], log_level="error", **TRAINING,
    )  # fmt: skip
    dataset = task.train_dataset
    if m.kind == "dpo":
        config, trainer_class = DPOConfig(**common), DPOTrainer
    elif m.kind == "tdpo":
        config, trainer_class = TDPOConfig(tdpo_variant=m.variant, alpha=m.alpha, **common), TDPOTrainer
    else:
        config, trainer_class = TISDPOConfig(**common, **m.extra), TISDPOTrainer
        tokenized = tokenize_preference_dataset(dataset, task.tokenizer)
        for name, values in _token_columns(task, m.weights, tokenized, job.get("rewards"), seed).items():
            dataset = dataset.add_column(name, values)
    kl_callback = _make_kl_callback(task, a["kl_batch_pairs"], a["kl_every"])
    snapshots = _make_snapshot_callback(set(a["checkpoints"]))
    start = time.perf_counter()
    trainer = trainer_class(
        model=task.model.name_or_path, args=config, train_dataset=dataset, processing_class=task.tokenizer,
        callbacks=[kl_callback, snapshots],
    )  # fmt: skip
    trainer.train()
    train_seconds = time.perf_counter() - start
    policy = trainer.model
    policy.eval()

    def evaluate():
        with torch.no_grad():
            stats = evaluate_policy(
                policy, task.model, task.tokenizer, task.eval_prompts, task.oracle,
                num_samples_per_prompt=a["num_samples_per_prompt"], max_new_tokens=a["max_new_tokens"], seed=1234,
            )  # fmt: skip
            stats["preference_accuracy"] = preference_accuracy(
                policy, task.model, task.tokenizer, task.eval_dataset, beta
            )
        return stats

    stats = evaluate()
    checkpoints = [{"step": trainer.state.global_step, **stats}]
    for step, state in sorted(snapshots.states.items()):
        policy.load_state_dict(state)
        checkpoints.append({"step": step, **evaluate()})
    logs = [h for h in trainer.state.log_history if "loss" in h]
    logged_kl = [
        {"step": h["step"], "chosen": h["kl/chosen"], "rejected": h["kl/rejected"]} for h in logs if "kl/chosen" in h
    ]
    return {
        "method": m.name, "label": m.label, "kind": m.kind, "beta": beta, "seed": seed,
        **stats, "train_seconds": train_seconds, "steps": trainer.state.global_step, "checkpoints": checkpoints,
        "final_loss": logs[-1]["loss"] if logs else float("nan"),
        "final_reward_accuracy": logs[-1].get("rewards/accuracies", float("nan")) if logs else float("nan"),
        "kl_steps": kl_callback.history, "logged_kl": logged_kl,
        "weights_chosen_mean": logs[-1].get("weights/chosen_mean") if logs else None,
        "weights_rejected_mean": logs[-1].get("weights/rejected_mean") if logs else None,
    }  # fmt: skip


def reference_eval(job):
    """The SFT model itself (KL 0): the starting point of every frontier."""
    _setup_worker()
    from trl_tokenpo.evaluation import evaluate_policy, preference_accuracy

    a = job["args"]
    task = _task(a)
    stats = evaluate_policy(
        task.model, task.model, task.tokenizer, task.eval_prompts, task.oracle,
        num_samples_per_prompt=a["num_samples_per_prompt"], max_new_tokens=a["max_new_tokens"], seed=1234,
    )  # fmt: skip
    stats["preference_accuracy"] = preference_accuracy(task.model, task.model, task.tokenizer, task.eval_dataset)
    return {
        "method": "sft_reference",
        "label": "SFT (reference)",
        "kind": "reference",
        "beta": None,
        "seed": None,
        **stats,
    }


def estimate_one(job):
    """Run the contrastive estimator (one preset, one method) on the training set; return its token rewards."""
    _setup_worker()
    from trl_tokenpo.estimator import ContrastiveWeightEstimator, WeightEstimatorConfig

    a = job["args"]
    task = _task(a)
    preset, method = job["preset"], job["estimator_method"]
    extra = dict(ESTIMATOR_PRESETS[preset].get(method, {}))
    if a["max_steps"] > 0:
        extra["max_steps"] = a["max_steps"]
    config = WeightEstimatorConfig(
        output_dir=os.path.join(a["output_dir"], "estimator", f"{preset}_{method}"), method=method,
        per_device_train_batch_size=16, report_to="none", disable_tqdm=True, log_level="error", logging_steps=1000,
        **extra,
    )  # fmt: skip
    start = time.perf_counter()
    estimator = ContrastiveWeightEstimator(task.model.name_or_path, task.tokenizer, args=config)
    out = estimator.estimate(task.train_dataset)
    return {
        "key": f"est:{preset}:{method}",
        "seconds": time.perf_counter() - start,
        "columns": {
            c: [list(map(float, r)) for r in out[c]] for c in ("chosen_token_rewards", "rejected_token_rewards")
        },
    }


# ---------------------------------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------------------------------


def auroc(scores, labels) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); labels 1 = positive."""
    import numpy as np

    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def reward_quality(task, tokenized, columns) -> dict:
    """AUROC of estimated token rewards against the true ones (good words positive, bad negative; neutral tokens and
    EOS left out), on the chosen and rejected tokens of the training set, and the scale of the rewards."""
    import numpy as np

    scores, labels, neutral = [], [], []
    for side in ("chosen", "rejected"):
        for ids, est in zip(tokenized[f"{side}_ids"], columns[f"{side}_token_rewards"]):
            true = task.oracle.token_reward_of_ids(ids, task.tokenizer)
            for t, r in zip(true, est):
                if t != 0:
                    scores.append(r)
                    labels.append(t > 0)
                else:
                    neutral.append(r)
    scores, labels, neutral = np.asarray(scores), np.asarray(labels), np.asarray(neutral)
    return {
        "auroc": auroc(scores, labels),
        "mean_r_good": float(scores[labels].mean()),
        "mean_r_bad": float(scores[~labels].mean()),
        "std_r_neutral": float(neutral.std()),
        "num_scored_tokens": int(len(scores)),
    }


def _mean_std(values):
    import numpy as np

    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def frontier_at(points, budget):
    """Best reward among (KL, reward) points with KL <= `budget` (the SFT model, KL 0, is always one of them)."""
    return max(r for k, r in points if k <= budget)


def pareto(points):
    """The upper-left envelope of (KL, reward) points: those no other point beats on both axes, sorted by KL."""
    out = []
    for k, r in sorted(points, key=lambda p: (p[0], -p[1])):
        if not out or r > out[-1][1]:
            out.append((k, r))
    return out


def summarize(rows, reference, args, aurocs, method_order):
    runs = [r for r in rows if r["kind"] != "reference"]
    by_method = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    summary = {"reference": reference, "methods": {}, "auroc": aurocs, "config": vars(args)}
    for name in method_order:
        if name not in by_method:
            continue
        rs = by_method[name]
        entry = {"label": rs[0]["label"], "per_beta": {}, "frontier": {}}
        for beta in sorted({r["beta"] for r in rs}):
            sel = [r for r in rs if r["beta"] == beta]
            entry["per_beta"][str(beta)] = {
                key: _mean_std([r[key] for r in sel])
                for key in ("reward_mean", "kl_mean", "entropy_mean", "preference_accuracy", "length_mean",
                            "final_kl_chosen", "final_kl_rejected", "train_seconds")
            } | {"n": len(sel)}  # fmt: skip
        # Frontier per seed: every (beta, checkpoint) point plus the SFT model at KL 0; best reward within each budget.
        for budget in args.kl_budgets:
            vals = []
            for seed in sorted({r["seed"] for r in rs}):
                pts = [(c["kl_mean"], c["reward_mean"]) for r in rs if r["seed"] == seed for c in r["checkpoints"]]
                pts.append((0.0, reference["reward_mean"]))
                vals.append(frontier_at(pts, budget))
            entry["frontier"][str(budget)] = _mean_std(vals)
        # Points averaged over seeds, for the plot.
        entry["points"] = []
        for beta in sorted({r["beta"] for r in rs}):
            for step in sorted({c["step"] for r in rs if r["beta"] == beta for c in r["checkpoints"]}):
                cs = [c for r in rs if r["beta"] == beta for c in r["checkpoints"] if c["step"] == step]
                entry["points"].append(
                    {"beta": beta, "step": step, "kl": _mean_std([c["kl_mean"] for c in cs]),
                     "reward": _mean_std([c["reward_mean"] for c in cs])}
                )  # fmt: skip
        summary["methods"][name] = entry
    # Equivalence checks: uniform weights vs DPO, TDPO2 alpha=0 vs DPO (same beta and seed).
    checks = {}
    for other in ("tisdpo_uniform", "tdpo2_a0"):
        diffs = []
        for r in by_method.get(other, []):
            ref = [d for d in by_method.get("dpo", []) if d["beta"] == r["beta"] and d["seed"] == r["seed"]]
            if ref:
                diffs.append(
                    {k: abs(r[k] - ref[0][k]) for k in ("reward_mean", "kl_mean", "preference_accuracy", "final_loss")}
                )
        if diffs:
            checks[other] = {k: max(d[k] for d in diffs) for k in diffs[0]} | {"pairs": len(diffs)}
    summary["equivalence"] = checks
    return summary


def _fmt(ms, digits=3, plus=False):
    mean, std = ms
    if isinstance(mean, float) and math.isnan(mean):
        return "–"
    sign = "+" if plus else ""
    return f"{mean:{sign}.{digits}f} ± {std:.{digits}f}"


def markdown_tables(summary, args) -> str:
    lines = []
    ref = summary["reference"]
    n_seeds = len(args.seeds)
    lines.append(
        f"SFT reference: oracle reward {ref['reward_mean']:+.3f} ± {ref['reward_sem']:.3f} (sem), entropy "
        f"{ref['entropy_mean']:.3f}, length {ref['length_mean']:.1f}."
    )
    lines.append("")
    lines.append(f"**Per method at beta = {args.main_beta}** (mean ± std over {n_seeds} training seeds)")
    lines.append("")
    lines.append(
        "| method | oracle reward | KL(π‖π_ref) sampled | seq. FKL chosen | seq. FKL rejected | entropy | pref. acc. (held-out) |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for entry in summary["methods"].values():
        pb = entry["per_beta"].get(str(args.main_beta))
        if pb is None:
            continue
        lines.append(
            f"| {entry['label']} | {_fmt(pb['reward_mean'], plus=True)} | {_fmt(pb['kl_mean'])} | "
            f"{_fmt(pb['final_kl_chosen'])} | {_fmt(pb['final_kl_rejected'])} | {_fmt(pb['entropy_mean'])} | "
            f"{_fmt(pb['preference_accuracy'])} |"
        )
    lines.append("")
    budgets = args.kl_budgets
    lines.append(
        "**Frontier: best oracle reward within a sampled-KL budget** (per seed, over every beta and checkpoint "
        f"(steps {args.checkpoints} and the end) and the SFT model; mean ± std over seeds)"
    )
    lines.append("")
    lines.append("| method | " + " | ".join(f"reward @ KL≤{b}" for b in budgets) + " |")
    lines.append("|---|" + "---|" * len(budgets))
    for entry in summary["methods"].values():
        lines.append(
            f"| {entry['label']} | " + " | ".join(_fmt(entry["frontier"][str(b)], plus=True) for b in budgets) + " |"
        )
    lines.append("")
    lines.append("**All beta values** (reward / sampled KL, mean ± std over seeds)")
    lines.append("")
    betas = sorted(args.betas)
    lines.append("| method | " + " | ".join(f"β={b}" for b in betas) + " |")
    lines.append("|---|" + "---|" * len(betas))
    for entry in summary["methods"].values():
        cells = []
        for b in betas:
            pb = entry["per_beta"].get(str(b))
            cells.append("–" if pb is None else f"{pb['reward_mean'][0]:+.2f}±{pb['reward_mean'][1]:.2f} / "
                         f"{pb['kl_mean'][0]:.2f}±{pb['kl_mean'][1]:.2f}")  # fmt: skip
        lines.append(f"| {entry['label']} | " + " | ".join(cells) + " |")
    lines.append("")
    if summary["auroc"]:
        lines.append("**Token-reward estimators** (training set, chosen + rejected tokens with a nonzero true reward)")
        lines.append("")
        lines.append("| estimator | AUROC (good vs bad) | mean r_t good | mean r_t bad | std r_t neutral | seconds |")
        lines.append("|---|---|---|---|---|---|")
        for key, q in summary["auroc"].items():
            lines.append(
                f"| {key} | {q['auroc']:.3f} | {q['mean_r_good']:+.3f} | {q['mean_r_bad']:+.3f} | "
                f"{q['std_r_neutral']:.3f} | {q.get('seconds', 0.0):.0f} |"
            )
        lines.append("")
    if summary["equivalence"]:
        lines.append("**Equivalence checks** (max absolute difference to DPO over matching beta and seed)")
        lines.append("")
        lines.append("| variant | reward | sampled KL | pref. acc. | final train loss | pairs |")
        lines.append("|---|---|---|---|---|---|")
        for name, c in summary["equivalence"].items():
            lines.append(
                f"| {name} | {c['reward_mean']:.2e} | {c['kl_mean']:.2e} | {c['preference_accuracy']:.2e} | "
                f"{c['final_loss']:.2e} | {c['pairs']} |"
            )
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------------

COLORS = {
    "dpo": "black", "tdpo1": "tab:purple", "tdpo2_a0.1": "#9ecae1", "tdpo2_a0.5": "#4292c6", "tdpo2_a1.0": "#08519c",
    "tdpo2_a0": "grey", "tisdpo_prompt": "tab:olive", "tisdpo_sft": "tab:orange", "tisdpo_dpo": "tab:red",
    "tisdpo_oracle": "tab:green", "tisdpo_random": "tab:brown", "tisdpo_uniform": "tab:pink",
    "tisdpo_prompt_paper": "#d9d98c", "tisdpo_sft_paper": "#fdd0a2", "tisdpo_dpo_paper": "#fcbba1",
}  # fmt: skip


def plot_frontier(summary, path, *, colors=None, reference_label="SFT reference",
                  ylabel="oracle reward of sampled responses", title=None, hide=lambda name: name == "tdpo2_a0",
                  dashed=lambda name, entry: name.endswith("_paper"), point_size=12, point_alpha=0.45, legend_fontsize=8):
    """Reward vs sampled KL, DPO vs TDPO (left) and DPO vs TIS-DPO (right): each method's points and their upper
    envelope. `summary`: {"reference": {"reward_mean"}, "methods": {name: {"label", "points": [{"kl", "reward"}]}}}
    (mean, std pairs). The defaults draw the built-in task's plot; scripts/benchmark_real.py passes its own labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = COLORS if colors is None else colors
    title = title or ("Reward vs KL on the built-in task. Dots: (beta, checkpoint) points, mean over seeds; "
                      "lines: their upper envelope (best reward within a KL budget)")  # fmt: skip
    ref = summary["reference"]
    groups = [
        ("DPO vs TDPO", lambda n: n == "dpo" or n.startswith("tdpo")),
        ("DPO vs TIS-DPO", lambda n: n == "dpo" or n.startswith("tisdpo")),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, (group_title, keep) in zip(axes, groups):
        ax.scatter([0.0], [ref["reward_mean"]], marker="*", s=150, color="k", zorder=5, label=reference_label)
        for name, entry in summary["methods"].items():
            if not keep(name) or hide(name):
                continue
            kl = [p["kl"][0] for p in entry["points"]]
            rw = [p["reward"][0] for p in entry["points"]]
            color = colors.get(name)
            ax.scatter(kl, rw, s=point_size, color=color, alpha=point_alpha)
            front = pareto([(0.0, ref["reward_mean"]), *zip(kl, rw)])
            ax.plot([p[0] for p in front], [p[1] for p in front], ls="--" if dashed(name, entry) else "-", lw=1.6,
                    color=color, label=entry["label"], drawstyle="steps-post")  # fmt: skip
        ax.set_title(group_title)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("KL(policy ‖ reference), sampled, nats per response (symlog)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_fontsize)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kl_steps(rows, main_beta, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = ["dpo", "tdpo2_a0", "tdpo1", "tdpo2_a0.1", "tdpo2_a0.5", "tdpo2_a1.0", "tisdpo_dpo", "tisdpo_oracle"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for ax, side in zip(axes, ("chosen", "rejected")):
        for name in names:
            sel = [r for r in rows if r["method"] == name and r["beta"] == main_beta]
            if not sel:
                continue
            steps = [h["step"] for h in sel[0]["kl_steps"]]
            vals = np.array([[h[side] for h in r["kl_steps"]] for r in sel if len(r["kl_steps"]) == len(steps)])
            if name != "tdpo2_a0":
                ax.plot(steps, vals.mean(0), marker="o", ms=3, color=COLORS.get(name), label=f"{sel[0]['label']}")
                if len(vals) > 1:
                    ax.fill_between(steps, vals.min(0), vals.max(0), color=COLORS.get(name), alpha=0.12)
            logged = [r["logged_kl"] for r in sel if r["logged_kl"]]
            if logged and len({len(x) for x in logged}) == 1:
                lsteps = [h["step"] for h in logged[0]]
                lvals = np.array([[h[side] for h in x] for x in logged]).mean(0)
                ax.plot(lsteps, lvals, ls=":", color=COLORS.get(name), lw=1.2,
                        label=f"{sel[0]['label']} (trainer log)" if name in ("tdpo2_a0", "tdpo2_a0.5") else None)  # fmt: skip
        ax.set_title(f"sequence forward KL, {side} responses (beta={main_beta})")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Σ_t KL(π_ref ‖ π_θ)  per sequence")
    axes[0].legend(fontsize=8)
    fig.suptitle("Solid: 64 fixed held-out pairs, measured by a callback (mean over seeds, band = min-max). "
                 "Dotted: kl/* logged by the trainer on its training batches.", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    os.makedirs(args.output_dir, exist_ok=True)
    os.makedirs(args.images_dir, exist_ok=True)
    _setup_worker()
    from trl_tokenpo.data import tokenize_preference_dataset
    from trl_tokenpo.synthetic import SyntheticTaskConfig, build_task

    task = build_task(SyntheticTaskConfig(seed=args.task_seed), cache_dir=args.task_cache_dir)
    tokenized = tokenize_preference_dataset(task.train_dataset, task.tokenizer)
    methods = all_methods(args.estimator_presets, args.estimator_methods)
    if args.methods:
        unknown = set(args.methods) - {m.name for m in methods}
        if unknown:
            raise SystemExit(f"Unknown methods {sorted(unknown)}; known: {[m.name for m in methods]}")
        methods = [m for m in methods if m.name in args.methods]
    needed_estimates = sorted({m.weights for m in methods if m.weights and m.weights.startswith("est:")})
    if not args.train_paper_preset:
        methods = [m for m in methods if not (m.weights or "").startswith("est:paper:")]
    shared = {k: getattr(args, k) for k in ("task_seed", "task_cache_dir", "output_dir", "max_steps", "kl_every",
                                            "kl_batch_pairs", "num_samples_per_prompt", "max_new_tokens", "checkpoints")}  # fmt: skip

    def jobs_for(method_list, rewards=None):
        jobs = []
        for m in method_list:
            betas = args.betas if m.betas is None else (m.betas or [args.main_beta])
            for beta in betas:
                for seed in args.seeds:
                    job = {"args": shared, "method": vars(m), "beta": beta, "seed": seed}
                    if rewards is not None:
                        job["rewards"] = {m.weights: rewards[m.weights]}
                    jobs.append(job)
        return jobs

    independent = [m for m in methods if not (m.weights or "").startswith("est:")]
    dependent = [m for m in methods if (m.weights or "").startswith("est:")]
    rows, estimates = [], {}
    print(
        f"[quality] {len(methods)} methods, betas {args.betas}, seeds {args.seeds}, {args.workers} workers", flush=True
    )
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
        est_futures = [
            pool.submit(
                estimate_one, {"args": shared, "preset": key.split(":")[1], "estimator_method": key.split(":")[2]}
            )
            for key in needed_estimates
        ]
        ref_future = pool.submit(reference_eval, {"args": shared})
        futures = [pool.submit(train_one, job) for job in jobs_for(independent)]
        for f in est_futures:
            result = f.result()
            estimates[result["key"]] = result
            print(f"[quality] estimator {result['key']} done in {result['seconds']:.0f}s", flush=True)
        rewards = {k: v["columns"] for k, v in estimates.items()}
        futures += [pool.submit(train_one, job) for job in jobs_for(dependent, rewards)]
        reference = ref_future.result()
        for i, f in enumerate(futures):
            row = f.result()
            row["final_kl_chosen"] = row["kl_steps"][-1]["chosen"] if row["kl_steps"] else float("nan")
            row["final_kl_rejected"] = row["kl_steps"][-1]["rejected"] if row["kl_steps"] else float("nan")
            rows.append(row)
            print(
                f"[quality] {i + 1}/{len(futures)} {row['method']:22s} beta={row['beta']:<5} seed={row['seed']} "
                f"reward={row['reward_mean']:+.3f} kl={row['kl_mean']:.3f} acc={row['preference_accuracy']:.3f} "
                f"({row['train_seconds']:.0f}s, {time.perf_counter() - start:.0f}s total)",
                flush=True,
            )

    aurocs = {}
    for key, est in estimates.items():
        aurocs[key] = reward_quality(task, tokenized, est["columns"]) | {"seconds": est["seconds"]}
    if any(m.weights == "oracle" for m in methods):
        oracle_cols = _token_columns(task, "oracle", tokenized, None, 0)
        aurocs["oracle (sanity)"] = reward_quality(task, tokenized, oracle_cols) | {"seconds": 0.0}
    if any(m.weights == "random" for m in methods):
        random_cols = _token_columns(task, "random", tokenized, None, args.seeds[0])
        aurocs["random (sanity)"] = reward_quality(task, tokenized, random_cols) | {"seconds": 0.0}

    summary = summarize(rows, reference, args, aurocs, [m.name for m in methods])
    summary["wall_seconds"] = time.perf_counter() - start
    with open(os.path.join(args.output_dir, "results.jsonl"), "w") as f:
        for row in [reference, *rows]:
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(args.output_dir, "auroc.json"), "w") as f:
        json.dump(aurocs, f, indent=1)
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    tables = markdown_tables(summary, args)
    with open(os.path.join(args.output_dir, "summary.md"), "w") as f:
        f.write(tables + f"\nWall time: {summary['wall_seconds']:.0f} s.\n")
    plot_frontier(summary, os.path.join(args.images_dir, "quality_frontier.png"))
    plot_kl_steps(rows, args.main_beta, os.path.join(args.images_dir, "quality_kl_steps.png"))
    print(tables)
    print(f"[quality] wall time {summary['wall_seconds']:.0f}s; outputs in {args.output_dir}", flush=True)
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
