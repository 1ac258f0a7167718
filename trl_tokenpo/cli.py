"""What the training scripts share: data and model loading like TRL's scripts, the built-in task, and the report.

The scripts under `scripts/` only parse arguments and call these functions, so everything they do can also be written
in a few lines of Python.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field


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


def help_requested(argv: list[str] | None = None) -> bool:
    """True when the command line asks for `--help`."""
    argv = sys.argv[1:] if argv is None else argv
    return any(arg in ("-h", "--help") for arg in argv)


def _format_default(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def describe_builtin_defaults(parser, builtin_defaults: dict) -> None:
    """Say in the parser's `--help` which defaults the built-in task changes: each such flag's help gets
    `[built-in task: VALUE]` next to the default of a run on your model and data, and the epilog lists them all."""
    for action in parser._actions:
        if action.dest in builtin_defaults and any(o.startswith(f"--{action.dest}") for o in action.option_strings):
            note = f"[built-in task: {_format_default(builtin_defaults[action.dest])}]"
            action.help = f"{action.help} {note}" if action.help else note
    changed = ", ".join(f"{name}={_format_default(value)}" for name, value in builtin_defaults.items())
    parser.epilog = (
        "The defaults shown are those of a run on your model and data. Without --model_name_or_path and "
        f"--dataset_name (and without --config) the script runs the built-in task, which changes these defaults: {changed}. "
        "A flag given on the command line or in --config always wins."
    )


def apply_parser_defaults(
    parser, argv: list[str] | None = None, builtin_defaults: dict | None = None, builtin_notes: dict | None = None
) -> bool:
    """Prepare a training script's parser and return whether the built-in task is used.

    The built-in task's defaults (`BUILTIN_TRAINING_DEFAULTS`, updated with the script's own `builtin_defaults`) are
    set only when the command line names no model and no dataset and does not ask for `--help`: `--help` always shows
    the defaults of a run on your model and data, with the built-in task's value noted on each flag it changes.
    `builtin_notes` are built-in task values the script applies itself after parsing: they are only shown in `--help`.
    """
    argv = sys.argv[1:] if argv is None else argv
    defaults = {**BUILTIN_TRAINING_DEFAULTS, **(builtin_defaults or {})}
    describe_builtin_defaults(parser, {**defaults, **(builtin_notes or {})})
    builtin = uses_builtin_task(argv)
    if builtin and not help_requested(argv):
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


# Data files `--dataset_name` (and `--dataset_test_split`) may name directly, by extension, and the `datasets` builder
# that reads each; a compressed file (`train.jsonl.gz`) is read by the same builder.
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


def data_file_builder(path: str | None) -> str | None:
    """The `datasets` builder ("json", "parquet", "csv") of a data file path, or `None` when `path` does not name one
    of the `DATA_FILE_BUILDERS` extensions (it is then a hub id, a dataset directory or a split name)."""
    if not path:
        return None
    name = path.lower()
    for compression in _COMPRESSIONS:
        name = name.removesuffix(compression)
    return DATA_FILE_BUILDERS.get(os.path.splitext(name)[1])


def _load_data_file(path: str, flag: str, streaming: bool):
    """One split from one data file; a clear error when it is missing."""
    from datasets import load_dataset

    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{flag} {path}: no such file. A data file must exist locally ({', '.join(DATA_FILE_BUILDERS)}, optionally "
            "compressed); otherwise pass a hub dataset id or a dataset directory."
        )
    return load_dataset(data_file_builder(path), data_files=path, split="train", streaming=streaming)


def load_user_datasets(script_args, dataset_args, with_eval: bool):
    """The training split and, when `with_eval`, the evaluation split of `--dataset_name` (or `--datasets`).

    `--dataset_name` is a hub id, a local dataset directory (data files in it, or a `save_to_disk` folder), or a single
    data file (`.json`, `.jsonl`, `.parquet`, `.csv`, optionally `.gz`/`.bz2`/`.xz`/`.zst` compressed), which is the
    training data whatever `--dataset_train_split` says. `--dataset_test_split` names the evaluation split of the
    dataset, or an evaluation data file. A split that is asked for and missing is an error naming the splits there
    are, never a silent run without evaluation.
    """
    from datasets import DatasetDict, load_dataset, load_from_disk
    from trl import get_dataset

    name, streaming = script_args.dataset_name, script_args.dataset_streaming
    train_split, test_split = script_args.dataset_train_split, script_args.dataset_test_split
    eval_file = with_eval and data_file_builder(test_split) is not None
    if dataset_args is not None and dataset_args.datasets:
        dataset = get_dataset(dataset_args)
    elif name is None:
        raise ValueError("`--dataset_name` is required with `--model_name_or_path` (or omit both for the built-in task).")
    elif data_file_builder(name) is not None and not os.path.isdir(name):
        train = _load_data_file(name, "--dataset_name", streaming)
        if with_eval and not eval_file:
            raise ValueError(
                f"--dataset_name {name} is a single file: it has no {test_split!r} split to evaluate on, and evaluation "
                "is on (--eval_strategy). Pass the evaluation data with --dataset_test_split path/to/eval.jsonl, or "
                "a directory holding train and test files as --dataset_name, or set --eval_strategy no."
            )
        return train, _load_data_file(test_split, "--dataset_test_split", streaming) if eval_file else None
    elif os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_dict.json")):
        dataset = load_from_disk(name)
    elif os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_info.json")):
        dataset = DatasetDict({train_split: load_from_disk(name)})
    else:
        dataset = load_dataset(name, name=script_args.dataset_config, streaming=streaming)
    source = f"--dataset_name {name}" if name is not None else "--datasets"
    if train_split not in dataset:
        raise ValueError(
            f"{source} has no {train_split!r} split (it has {sorted(dataset)}): choose one with --dataset_train_split."
        )
    evaluation = None
    if eval_file:
        evaluation = _load_data_file(test_split, "--dataset_test_split", streaming)
    elif with_eval:
        if test_split not in dataset:
            raise ValueError(
                f"{source} has no {test_split!r} split to evaluate on (it has {sorted(dataset)}), and evaluation is on "
                "(--eval_strategy). Choose a split with --dataset_test_split (or give an evaluation data file there), "
                "or set --eval_strategy no."
            )
        evaluation = dataset[test_split]
    return dataset[train_split], evaluation


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
        if model is None:
            raise ValueError(
                "`--model_name_or_path` is required with `--dataset_name` (or omit both for the built-in task)."
            )
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
