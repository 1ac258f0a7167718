"""What the training scripts share: data and model loading like TRL's scripts, the built-in task, and the report.

The scripts under `scripts/` only parse arguments and call these functions, so everything they do can also be written
in a few lines of Python.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch


@dataclass
class BuiltinTaskArguments:
    """Settings of the built-in synthetic task, used when neither `--model_name_or_path` nor `--dataset_name` is given.

    Parameters:
        task_seed (`int`, defaults to `0`): seed of the task (data, model initialization, warm-up).
        task_num_train_pairs (`int`, defaults to `512`): number of training preference pairs.
        task_cache_dir (`str`, *optional*): where the built task is cached (default `~/.cache/trl_tokenpo`).
        eval_num_samples_per_prompt (`int`, defaults to `4`): samples per held-out prompt in the final report.
        eval_max_new_tokens (`int`, defaults to `32`): generation length of those samples.
    """

    task_seed: int = field(default=0, metadata={"help": "Seed of the built-in task (data, model init, warm-up)."})
    task_num_train_pairs: int = field(default=512, metadata={"help": "Training pairs of the built-in task."})
    task_cache_dir: str | None = field(
        default=None, metadata={"help": "Cache directory of the built-in task (default ~/.cache/trl_tokenpo)."}
    )
    eval_num_samples_per_prompt: int = field(
        default=4, metadata={"help": "Samples per held-out prompt for the before/after report (built-in task)."}
    )
    eval_max_new_tokens: int = field(default=32, metadata={"help": "Generation length of the report's samples."})


# Training settings of the built-in task. They replace the TRL defaults (which target 0.5B+ models on GPUs) when the
# script runs without `--model_name_or_path` / `--dataset_name`; any explicit flag or `--config` value still wins.
BUILTIN_TRAINING_DEFAULTS = dict(
    output_dir="outputs/builtin",
    learning_rate=1e-3,
    num_train_epochs=1,
    per_device_train_batch_size=16,
    per_device_eval_batch_size=32,
    beta=0.1,
    max_length=64,
    logging_steps=4,
    eval_strategy="no",
    save_strategy="no",
    report_to="none",
    gradient_checkpointing=False,
    seed=0,
)


def uses_builtin_task(argv: list[str] | None = None) -> bool:
    """True when the command line names no model and no dataset (a `--config` file may still name them)."""
    argv = sys.argv[1:] if argv is None else argv
    names = ("--model_name_or_path", "--dataset_name", "--datasets", "--config")
    return not any(arg == name or arg.startswith(name + "=") for arg in argv for name in names)


def cpu_defaults() -> dict:
    """TRL's configs default to bf16, which fails on a machine without an accelerator: default to float32 there."""
    if torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return {}
    return {"bf16": False}


def apply_parser_defaults(parser, argv: list[str] | None = None) -> bool:
    """Set the CPU defaults, and the built-in task's training defaults when no model or dataset is named. Returns
    whether the built-in task is used."""
    builtin = uses_builtin_task(argv)
    defaults = cpu_defaults()
    if builtin:
        defaults = {**BUILTIN_TRAINING_DEFAULTS, **defaults}
    parser.set_defaults(**defaults)
    return builtin


def model_init_kwargs(model_args, training_args) -> dict:
    """The `model_init_kwargs` TRL's scripts derive from `ModelConfig` (dtype, attention implementation, revision)."""
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        kwargs.update(training_args.model_init_kwargs)
    return kwargs


def load_user_datasets(script_args, dataset_args, with_eval: bool):
    """Load `--dataset_name` (hub id, local dataset directory or a `save_to_disk` folder) like TRL's scripts."""
    from datasets import DatasetDict, load_dataset, load_from_disk
    from trl import get_dataset

    if dataset_args is not None and dataset_args.datasets:
        dataset = get_dataset(dataset_args)
    elif script_args.dataset_name is None:
        raise ValueError("`--dataset_name` is required with `--model_name_or_path` (or omit both for the built-in task).")
    elif os.path.isdir(script_args.dataset_name) and os.path.exists(
        os.path.join(script_args.dataset_name, "dataset_dict.json")
    ):
        dataset = load_from_disk(script_args.dataset_name)
    elif os.path.isdir(script_args.dataset_name) and os.path.exists(
        os.path.join(script_args.dataset_name, "dataset_info.json")
    ):
        dataset = DatasetDict({script_args.dataset_train_split: load_from_disk(script_args.dataset_name)})
    else:
        dataset = load_dataset(
            script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
        )
    train = dataset[script_args.dataset_train_split]
    evaluation = dataset.get(script_args.dataset_test_split) if with_eval else None
    return train, evaluation


def builtin_task(task_args):
    """Build (or load from cache) the built-in task; its directory is the model path."""
    from .synthetic import SyntheticTaskConfig, build_task

    cache = task_args.task_cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "trl_tokenpo")
    config = SyntheticTaskConfig(seed=task_args.task_seed, num_train_pairs=task_args.task_num_train_pairs)
    return build_task(config, cache_dir=cache)


def policy_for_generation(trainer):
    """The trained policy as a plain module for generation (unwrapped from DDP/DeepSpeed)."""
    return trainer.accelerator.unwrap_model(trainer.model)


def builtin_report(task, policy, task_args, seed: int = 1234) -> list[dict]:
    """Oracle reward, KL to the reference, entropy and held-out preference accuracy of the reference (before) and the
    trained policy (after), on the task's held-out prompts and pairs."""
    from .evaluation import evaluate_policy, preference_accuracy

    reference = task.model
    rows = []
    for name, model in (("before (reference)", reference), ("after (trained)", policy)):
        stats = evaluate_policy(
            model, reference, task.tokenizer, task.eval_prompts, task.oracle,
            num_samples_per_prompt=task_args.eval_num_samples_per_prompt,
            max_new_tokens=task_args.eval_max_new_tokens, seed=seed,
        )  # fmt: skip
        stats["preference_accuracy"] = preference_accuracy(model, reference, task.tokenizer, task.eval_dataset)
        rows.append({"model": name, **stats})
    return rows


def format_report(rows: list[dict]) -> str:
    """A short fixed-width table of `builtin_report` rows."""
    header = f"{'':20s} {'oracle reward':>18s} {'KL to reference':>18s} {'entropy':>8s} {'length':>7s} {'pref. acc.':>10s}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['model']:20s} {r['reward_mean']:>+9.3f} ± {r['reward_sem']:<6.3f} {r['kl_mean']:>9.3f} ± {r['kl_sem']:<6.3f}"
            f" {r['entropy_mean']:>8.3f} {r['length_mean']:>7.1f} {r['preference_accuracy']:>10.3f}"
        )
    return "\n".join(lines)


def format_metrics(metrics: dict) -> str:
    """Final evaluation metrics (user data) as `name: value` lines."""
    return "\n".join(f"{k:40s} {v:.4f}" if isinstance(v, float) else f"{k:40s} {v}" for k, v in sorted(metrics.items()))


def load_model_and_data(script_args, training_args, model_args, dataset_args, task_args, builtin: bool):
    """The model (path or hub id) and the train / eval datasets of a training script, and the built-in task (or
    `None`). Also sets `training_args.model_init_kwargs` from the model arguments, as TRL's scripts do."""
    task = None
    if builtin:
        task = builtin_task(task_args)
        model, train_dataset = task.model.name_or_path, task.train_dataset
        eval_dataset = task.eval_dataset if training_args.eval_strategy != "no" else None
    else:
        model = model_args.model_name_or_path
        train_dataset, eval_dataset = load_user_datasets(script_args, dataset_args, training_args.eval_strategy != "no")
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    return task, model, train_dataset, eval_dataset


def train_and_report(trainer, training_args, script_args, task=None, task_args=None) -> None:
    """Train (resuming if asked), save, then print the before/after table (built-in task) or the final evaluation."""
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("Training completed.")
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if task is not None:
        if trainer.accelerator.is_main_process:
            rows = builtin_report(task, policy_for_generation(trainer), task_args)
            print("\nBuilt-in task: sampled responses on held-out prompts\n" + format_report(rows))
    elif trainer.eval_dataset is not None:
        trainer.accelerator.print("\nFinal evaluation\n" + format_metrics(trainer.evaluate()))
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.end()
