"""Reference runs whose logged metrics are kept in tests/data/metric_logs.json.

Each case trains a tiny model for a few steps with logging at every step (and an evaluation), and returns the
trainer's `log_history` without the timing entries. `tests/test_sync_free.py` reruns the cases and compares every
logged value with the file, so that a change to how metrics are computed or read (e.g. keeping them on the device
until they are logged) cannot change what a user sees.

The model's weights are set from a seeded generator after construction, so the runs do not depend on how a
transformers release initializes a fresh model.

Regenerate (only when a logged value is meant to change; say why in the commit):

    .venv/bin/python tests/metric_logs.py --write tests/data/metric_logs.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from conftest import build_model, build_tokenizer, cpu_args, preference_rows  # noqa: E402
from datasets import Dataset  # noqa: E402


# Entries of `log_history` that measure time, not the model
TIMING_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
               "eval_samples_per_second", "eval_steps_per_second")  # fmt: skip

CASES = {
    # name: (trainer, token columns, lora, config options)
    "tdpo2_lora": ("tdpo", None, True, {}),
    "tdpo1_full_ref_model": ("tdpo", None, False, {"tdpo_variant": "tdpo1", "alpha": 0.7}),
    "tdpo2_ld_wpo_accumulation": (
        "tdpo", None, True, {"ld_alpha": 0.5, "use_weighting": True, "gradient_accumulation_steps": 2},
    ),
    "tisdpo_none_rewards": ("tisdpo", "rewards", True, {}),
    "tisdpo_reverse_rewards": ("tisdpo", "rewards", True, {"tis_kl_term": "reverse", "weight_transform": "rank"}),
    "tisdpo_tdpo_weights": ("tisdpo", "weights", True, {"tis_kl_term": "tdpo", "ld_alpha": 0.3}),
    "tisdpo_none_precomputed": ("tisdpo", "rewards", True, {"precompute_ref_log_probs": True}),
}


def seeded_weights(model, seed: int = 0):
    """Overwrite every parameter from one seeded generator (norm weights around 1), independent of transformers'
    own initialization."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.08 * noise)
    return model


def token_columns(dataset, tokenizer, kind: str, seed: int = 0):
    from trl_tokenpo.data import tokenize_preference_dataset

    ids = tokenize_preference_dataset(dataset, tokenizer)
    gen = torch.Generator().manual_seed(seed)
    name = "weights" if kind == "weights" else "token_rewards"
    low, high = (0.2, 2.2) if kind == "weights" else (-1.0, 2.0)
    columns = {}
    for side in ("chosen", "rejected"):
        columns[f"{side}_{name}"] = [
            (low + (high - low) * torch.rand(len(x), generator=gen)).tolist() for x in ids[f"{side}_ids"]
        ]
    for column, values in columns.items():
        dataset = dataset.add_column(column, values)
    return dataset


def run_case(name: str, folder: str) -> list[dict]:
    from peft import LoraConfig

    from trl_tokenpo import TDPOConfig, TDPOTrainer, TISDPOConfig, TISDPOTrainer

    kind, columns, lora, options = CASES[name]
    tokenizer = build_tokenizer()
    model_dir = os.path.join(folder, "model")
    seeded_weights(build_model(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = preference_rows(24)
    train, evaluation = Dataset.from_list(rows[:16]), Dataset.from_list(rows[16:])
    if columns:
        train, evaluation = token_columns(train, tokenizer, columns), token_columns(evaluation, tokenizer, columns, 1)
    trainer_class, config_class = (TDPOTrainer, TDPOConfig) if kind == "tdpo" else (TISDPOTrainer, TISDPOConfig)
    options = {"max_steps": 4, "eval_strategy": "steps", "eval_steps": 2, **options}
    if options.get("gradient_accumulation_steps", 1) > 1:
        options["per_device_train_batch_size"] = 2
    args = cpu_args(config_class, os.path.join(folder, "out"), **options)
    torch.manual_seed(0)
    extra = {}
    if lora:
        extra["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    else:
        extra["ref_model"] = seeded_weights(build_model(tokenizer))
    trainer = trainer_class(
        model=model_dir, args=args, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer, **extra
    )
    trainer.train()
    return [{k: v for k, v in entry.items() if k not in TIMING_KEYS} for entry in trainer.state.log_history]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", required=True, help="JSON file to write")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    logs = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.cases:
            logs[name] = run_case(name, os.path.join(folder, name))
            print(f"{name}: {len(logs[name])} log entries")
    with open(args.write, "w") as f:
        json.dump(logs, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
