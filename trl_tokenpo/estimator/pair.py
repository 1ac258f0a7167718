"""The contrastive pair's adapters: fit them with TRL (or reuse saved ones whose checksums verify), or check given ones.

Saved layout, under `output_dir/adapters/<first 16 hex digits of the fit key>/`:

    fit.json                  what the fit key was computed from (compared field by field when nothing matches)
    plus/, minus/             PEFT adapter directories (`save_pretrained`), each with a `trained.json` holding the fit
                              key and the SHA-256 of every file of the adapter

Saved adapters are reused only when their fit key matches and every recorded checksum verifies; a damaged, truncated
or missing file is reported and that adapter is trained again.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainingArguments

from ..compat import quiet_checkpointing_rename
from ..data import EXTRA_INPUT_COLUMNS, tokenize_preference_dataset
from ..files import atomic_write_json, is_stale_temp, read_json, temp_path
from ..fingerprint import fingerprint, jsonable
from .model_state import ModelSnapshot, is_peft_model, strip_adapter_layers
from .scoring import ScoringStats, fit_to_max_length


logger = logging.getLogger(__name__)

__all__ = ["ADAPTERS", "adapter_digest", "check_adapter_dir", "fit_pair", "fit_request"]

ADAPTERS = ("plus", "minus")
# Bump when what a fit produces changes meaning (training data, truncation rule).
FIT_FORMAT = "trl_tokenpo.estimator.adapters/2"
# TrainingArguments fields that change what an adapter training run produces (part of the fit key).
TRAINING_FIELDS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "weight_decay", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "optim", "optim_args", "adam_beta1",
    "adam_beta2", "adam_epsilon", "max_grad_norm", "seed", "data_seed", "bf16", "fp16", "tf32",
    "label_smoothing_factor", "neftune_noise_alpha", "dataloader_drop_last", "train_sampling_strategy",
    "average_tokens_across_devices", "full_determinism",
)  # fmt: skip
# TrainingArguments fields never copied into the adapters' trainer configs.
_NOT_COPIED = {"output_dir", "resume_from_checkpoint", "push_to_hub", "hub_model_id", "hub_token", "do_eval",
               "eval_strategy", "load_best_model_at_end", "metric_for_best_model", "eval_on_start"}  # fmt: skip
# PEFT config fields that do not change what an adapter computes.
_PEFT_CONFIG_IGNORED = ("base_model_name_or_path", "revision", "inference_mode")


# ----------------------------------------------------------------------------------------------------------------------
# Keys and their differences
# ----------------------------------------------------------------------------------------------------------------------


def lora_settings(args) -> dict:
    return {
        "r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        "target_modules": list(args.lora_target_modules) if args.lora_target_modules else "all-linear",
    }


def fit_request(args, dataset: Dataset, digests: dict, num_processes: int) -> dict:
    """What a fit depends on: `digests` holds the `dataset`, `base_model` and `tokenizer` fingerprints."""
    return {
        "format": FIT_FORMAT,
        **digests,
        "num_rows": len(dataset),
        "method": args.method,
        "beta": args.beta if args.method == "dpo" else None,
        "lora": lora_settings(args),
        "training": {name: jsonable(getattr(args, name, None)) for name in TRAINING_FIELDS},
        "max_length": args.max_length,
        "num_processes": num_processes,
    }


def _flatten(request: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in request.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def describe_changes(old: dict, new: dict) -> list[str]:
    """`field: old -> new` for every field of two fit requests that differs (nested fields dotted)."""
    old, new = _flatten(old), _flatten(new)
    return [f"{name}: {old.get(name, '(absent)')!r} -> {new.get(name, '(absent)')!r}"
            for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]  # fmt: skip


def explain_refit(root: Path, request: dict) -> str:
    """Why nothing saved under `root` is reused: the saved fit closest to `request` and what differs from it."""
    saved = []
    for path in root.glob("*/fit.json"):
        old = read_json(path)
        if old is not None:
            saved.append((len(describe_changes(old, request)), -path.stat().st_mtime, path, old))
    if not saved:
        return f"no adapters are saved under {root} yet"
    _, _, path, old = min(saved, key=lambda item: item[:2])
    changes = describe_changes(old, request)
    return f"the closest saved fit ({path.parent}) differs in {len(changes)} field(s): " + "; ".join(changes)


# ----------------------------------------------------------------------------------------------------------------------
# Adapter directories: save with checksums, verify, digest
# ----------------------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_saved_adapter(path: str | os.PathLike, fit_key: str | None) -> str | None:
    """None when `path` holds an adapter saved by the estimator (for `fit_key`, unless None) with every file as
    recorded, else what is wrong."""
    path = Path(path)
    marker = read_json(path / "trained.json")
    if marker is None:
        return "no readable trained.json (never finished, or damaged)"
    if fit_key is not None and marker.get("fit_key") != fit_key:
        return "it was trained for another fit key"
    files = marker.get("files")
    if not isinstance(files, dict) or "adapter_config.json" not in files:
        return "trained.json records no checksums"
    for name, expected in files.items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if _sha256(path / name) != expected:
            return f"{name} differs from the file that was saved (sha256 mismatch)"
    return None


def check_adapter_dir(path: str | os.PathLike) -> None:
    """Raise a clear error unless `path` looks like a loadable PEFT adapter directory."""
    directory = Path(path)
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory} is not a PEFT adapter directory (no adapter_config.json).") from None
    except ValueError as exc:
        raise ValueError(f"{directory}/adapter_config.json is not valid JSON ({exc}).") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ValueError(f"{directory}/adapter_config.json is not a PEFT adapter config (no peft_type).")
    if not any(p.name.startswith("adapter_model.") for p in directory.iterdir()):
        raise FileNotFoundError(f"{directory} has no adapter_model.* weight file.")


def adapter_digest(path: str | os.PathLike) -> str:
    """Digest of a PEFT adapter directory: its config (without where it was loaded from) and its weight files."""
    check_adapter_dir(path)
    directory = Path(path)
    config = json.loads((directory / "adapter_config.json").read_text())
    for name in _PEFT_CONFIG_IGNORED:
        config.pop(name, None)
    weights = sorted(p for p in directory.iterdir() if p.name.startswith("adapter_model."))
    return fingerprint("peft_adapter/2", jsonable(config), {p.name: _sha256(p) for p in weights})


def _save_adapter(peft_model, target: Path, fit_key: str, name: str) -> None:
    """`save_pretrained` into a staging directory, record every file's checksum, then rename into place."""
    staging = temp_path(target)
    peft_model.save_pretrained(staging)
    files = {p.name: _sha256(p) for p in sorted(staging.iterdir()) if p.is_file() and p.name != "README.md"}
    atomic_write_json(staging / "trained.json", {"fit_key": fit_key, "adapter": name, "files": files})
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


def adapter_training_data(tokenized: Dataset, method: str, max_length: int | None) -> tuple[dict, ScoringStats]:
    """Each adapter's training rows, cut by the scorer's `fit_to_max_length` rule (nothing is dropped), and the cuts.
    SFT: `input_ids` + `completion_mask` of (prompt, chosen) for "plus", (prompt, rejected) for "minus". DPO:
    the text columns (TRL tokenizes them to the same ids), chosen and rejected swapped for "minus"."""
    columns = tokenized.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_dict()
    cuts = ScoringStats()
    sides: dict[str, list] = {"chosen": [], "rejected": []}
    for prompt, chosen, rejected in zip(columns["prompt_ids"], columns["chosen_ids"], columns["rejected_ids"]):
        for side, completion in (("chosen", chosen), ("rejected", rejected)):
            kept_context, kept = fit_to_max_length(len(prompt), len(completion), max_length)
            cuts.context_truncated += kept_context < len(prompt) and kept == len(completion)
            cuts.completion_truncated += kept < len(completion)
            cuts.unscored_tokens += len(completion) - kept
            sides[side].append((prompt[len(prompt) - kept_context :], completion[:kept]))
    if method == "sft":
        return {
            adapter: Dataset.from_dict({
                "input_ids": [context + completion for context, completion in sides[side]],
                "completion_mask": [[0] * len(context) + [1] * len(completion) for context, completion in sides[side]],
            })
            for adapter, side in (("plus", "chosen"), ("minus", "rejected"))
        }, cuts  # fmt: skip
    # DPO: TRL tokenizes the text again (the same ids, EOS already appended); the collator applies the cut
    text = tokenized.select_columns(["prompt", "chosen", "rejected"] + [c for c in EXTRA_INPUT_COLUMNS if c in tokenized.column_names])
    swapped = text.rename_columns({"chosen": "rejected", "rejected": "chosen"})
    return {"plus": text, "minus": swapped}, cuts


def _dpo_collator_class():
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import pad

    @dataclasses.dataclass
    class TruncatingPreferenceCollator(DataCollatorForPreference):
        """TRL's preference batch, each sequence cut by `fit_to_max_length` (context on the left) instead of TRL's
        `keep_start` / `keep_end` slice. `cut_length` is the estimator's `max_length`."""

        cut_length: int | None = None

        def torch_call(self, examples):
            ids, masks = [], []
            for side in ("chosen", "rejected"):
                for example in examples:
                    prompt, completion = example["prompt_ids"], example[f"{side}_ids"]
                    kept_context, kept = fit_to_max_length(len(prompt), len(completion), self.cut_length)
                    ids.append(torch.tensor(prompt[len(prompt) - kept_context :] + completion[:kept]))
                    masks.append(torch.tensor([0] * kept_context + [1] * kept))
            return {
                "input_ids": pad(ids, padding_value=self.pad_token_id, padding_side="right"),
                "attention_mask": pad([torch.ones_like(m) for m in masks], padding_value=0, padding_side="right"),
                "completion_mask": pad(masks, padding_value=0, padding_side="right"),
            }

    return TruncatingPreferenceCollator


def _trainer_config(config_class, args, name: str, **extra):
    """A TRL trainer config carrying the estimator config's TrainingArguments fields, writing under output_dir/train/."""
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init and f.name not in _NOT_COPIED}
    kwargs.update(
        output_dir=os.path.join(args.output_dir, "train", name), eval_strategy="no", push_to_hub=False,
        load_best_model_at_end=False, run_name=f"{args.run_name}-{name}" if args.run_name else None,
        max_length=None, dataset_num_proc=args.dataset_num_proc, **extra,
    )  # fmt: skip
    return config_class(**kwargs)


def _train_adapter(model, processing_class, args, name: str, train_dataset: Dataset, target: Path, fit_key, state):
    """Train one adapter on the base model with TRL, save it to `target` (main process), take it out again."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from ..trainer import TDPOConfig, TDPOTrainer

    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if args.method == "sft":
        config = _trainer_config(SFTConfig, args, name, completion_only_loss=True, packing=False)
        trainer_class, extra = SFTTrainer, {}
    else:
        # TDPO2 with alpha=0 is exactly DPO's sigmoid loss (a tested reduction), computed with the package's tiled
        # kernel: no (tokens x vocabulary) tensor kept, unlike TRL's CPU fallback
        config = _trainer_config(TDPOConfig, args, name, beta=args.beta, tdpo_variant="tdpo2", alpha=0.0)
        collator = _dpo_collator_class()(pad_token_id=tokenizer.pad_token_id, cut_length=args.max_length)
        trainer_class, extra = TDPOTrainer, {"data_collator": collator}
    snapshot = ModelSnapshot(model)
    trainer = None
    try:
        with quiet_checkpointing_rename():  # peft's get_peft_model, called by TRL, reads the old name
            trainer = trainer_class(
                model=model, args=config, train_dataset=train_dataset, processing_class=processing_class,
                peft_config=LoraConfig(task_type="CAUSAL_LM", bias="none", **lora_settings(args)), **extra,
            )  # fmt: skip
        trainer.train()
        if state.is_main_process:
            _save_adapter(trainer.accelerator.unwrap_model(trainer.model), target, fit_key, name)
        state.wait_for_everyone()
    finally:
        peft_model = getattr(trainer, "model", None)
        if peft_model is not None and is_peft_model(peft_model):
            peft_model.unload()
        else:  # the trainer failed after wrapping the model: take the LoRA layers out by hand
            strip_adapter_layers(model)
        del trainer, peft_model
        snapshot.restore()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def fit_pair(model, processing_class, args, dataset: Dataset, request: dict, state) -> tuple[dict[str, str], list[str]]:
    """Train the "plus" and "minus" adapters for the fit `request`, or reuse saved ones that verify. Returns the
    adapter directories and the names of the adapters trained now."""
    key = fingerprint(request)
    root = Path(args.output_dir) / "adapters"
    directory = root / key[:16]
    paths = {name: directory / name for name in ADAPTERS}
    for leftover in directory.glob(".*.tmp"):  # staging directories of killed runs
        if is_stale_temp(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
    problems = {name: verify_saved_adapter(paths[name], key) for name in ADAPTERS}
    todo = [name for name in ADAPTERS if problems[name] is not None]
    if not todo:
        logger.info(f"Reusing the adapters saved in {directory} (same fit key, checksums verified).")
        return {name: str(path) for name, path in paths.items()}, []
    if directory.is_dir():
        reasons = "; ".join(f"{name}: {problems[name]}" for name in todo)
        logger.warning(f"Saved adapters in {directory} cannot be reused ({reasons}): training {', '.join(todo)} again.")
    else:
        logger.warning(
            f"Training the {args.method!r} adapters ({' and '.join(todo)}): {explain_refit(root, request)}."
        )
    tokenized = tokenize_preference_dataset(dataset, processing_class, num_proc=args.dataset_num_proc)
    train_data, cuts = adapter_training_data(tokenized, args.method, args.max_length)
    if cuts.context_truncated or cuts.completion_truncated:
        logger.warning(
            f"Adapter training (max_length={args.max_length}): {cuts.context_truncated} sequences had their context "
            f"cut on the left, {cuts.completion_truncated} completions were cut ({cuts.unscored_tokens} completion "
            "tokens not trained on); no row was dropped."
        )
    for name in todo:
        _train_adapter(model, processing_class, args, name, train_data[name], paths[name], key, state)
    if state.is_main_process:
        atomic_write_json(directory / "fit.json", request)
    state.wait_for_everyone()
    return {name: str(path) for name, path in paths.items()}, todo
