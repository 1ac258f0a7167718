"""What the commands share: argument parsing with suggestions, checks of the model and the data before anything is
loaded, data and model loading like TRL's scripts, the built-in task, the report, and how errors end a run.

The commands (`trl_tokenpo/scripts/tdpo.py`, `tisdpo.py`, `estimate.py`) only parse arguments and call these
functions, so everything they do can also be written in a few lines of Python.
"""

from __future__ import annotations

import difflib
import os
import sys
import traceback
from dataclasses import dataclass, field

from ..errors import InputError


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
    """True when the command line asks for `--help` (or `--help_all`)."""
    argv = sys.argv[1:] if argv is None else argv
    return any(arg in ("-h", "--help", "--help_all") for arg in argv)


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


def _read_json_lines(path: str) -> tuple[list[dict] | None, str | None]:
    """The rows of a JSON Lines file read with the `json` module, or `(None, "line N: <why>")` for its first line that
    is not a JSON object (`(None, None)` for one JSON document, or a compression this does not read)."""
    import bz2
    import gzip
    import json
    import lzma

    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(os.path.splitext(path)[1].lower(), open)
    if path.lower().endswith(".zst"):
        return None, None
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                if not rows and line.lstrip().startswith("["):
                    return None, None  # one JSON document: the parser's message is all there is
                try:
                    value = json.loads(line.rstrip())
                except json.JSONDecodeError as error:
                    return None, f"line {number}: not valid JSON ({error.msg} at column {error.colno})"
                if not isinstance(value, dict):
                    return None, f"line {number}: a JSON {type(value).__name__}, not an object"
                rows.append(value)
    except (OSError, UnicodeDecodeError) as error:
        return None, f"{type(error).__name__}: {error}"
    return rows, None


def _data_file_error(path: str, flag: str, error: BaseException) -> InputError:
    """The message of a data file that `datasets` could not read: the first bad line of a JSON Lines file or its first
    bad row (`check_preference_rows`, as if `datasets` had read it), else the deepest cause of the parser's error."""
    builder = data_file_builder(path)
    where = None
    if builder == "json":
        rows, where = _read_json_lines(path)
        if rows:  # every line is an object: older `datasets` refuse rows without a field some rows have; name it
            from datasets import Dataset

            names = list(dict.fromkeys(name for row in rows for name in row))
            try:
                dataset = Dataset.from_dict({name: [row.get(name) for row in rows] for name in names})
            except Exception:  # values Arrow cannot hold in one column: the parser's message below
                dataset = None
            if dataset is not None:
                _checked(dataset, path)
    if where is None:
        cause = error
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        where = f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}"
    expected = {
        "json": "A .jsonl file holds one JSON object per line; a .json file, a list of objects (or JSON lines)",
        "parquet": "A Parquet file holds one row per pair",
        "csv": "A CSV file holds a header row (prompt,chosen,rejected), then one row per pair",
    }[builder]
    return InputError(f"{flag} {path}: cannot be read ({where}). {expected}.")


def _load_data_file(path: str, flag: str, streaming: bool):
    """One split from one data file: a clear error when it is missing, unreadable or empty."""
    from datasets import load_dataset

    if not os.path.isfile(path):
        raise InputError(
            f"{flag} {path}: no such file. A data file must exist locally ({', '.join(DATA_FILE_BUILDERS)}, optionally "
            "compressed); otherwise pass a hub dataset id or a dataset directory."
        )
    if not os.access(path, os.R_OK):
        raise InputError(f"{flag} {path}: the file is not readable (permission denied).")
    try:
        dataset = load_dataset(data_file_builder(path), data_files=path, split="train", streaming=streaming)
    except Exception as error:  # datasets wraps the parser's error (pyarrow, json) in a DatasetGenerationError
        raise _data_file_error(path, flag, error) from error
    if not streaming and len(dataset) == 0:
        raise InputError(f"{flag} {path}: the file holds no rows.")
    return dataset


def check_data_path(name: str, flag: str = "--dataset_name") -> None:
    """Refuse a `--dataset_name` that names nothing usable, before anything loads: an existing file of an unknown
    format, a path that does not exist (and cannot be a hub id), or a hub id that cannot be fetched (offline, or the
    Hub unreachable: at once, instead of after the network's timeouts)."""
    if os.path.isdir(name) or data_file_builder(name) is not None:
        return  # a directory, or a data file (_load_data_file says if it is missing)
    if os.path.isfile(name):
        raise InputError(
            f"{flag} {name}: unknown data file format {os.path.splitext(name)[1] or '(no extension)'!r}. Use a .json, "
            f".jsonl, .parquet or .csv file (optionally .gz/.bz2/.xz/.zst compressed), a dataset directory, or a hub "
            "dataset id."
        )
    check_hub_repo(name, "dataset", flag)


def check_model_path(name: str, revision: str | None = None, flag: str = "--model_name_or_path") -> None:
    """Refuse a model that cannot load, before anything loads: a path that does not exist, a directory without a
    saved model, a hub id that is not cached while offline, or one the Hub does not have or cannot be reached for."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "adapter_config.json")):
            raise InputError(
                f"{flag} {name}: the directory holds no saved model (no config.json). Pass the directory that "
                "`model.save_pretrained(...)` wrote, or a Hugging Face Hub model id."
            )
        return
    if os.path.exists(path):
        raise InputError(f"{flag} {name}: a file, not a model directory. Pass the directory that holds config.json.")
    from huggingface_hub import try_to_load_from_cache

    if _is_hub_id(name) and isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return  # cached: loads offline
    check_hub_repo(name, "model", flag, revision)


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not name.startswith((".", "~"))


def check_hub_repo(name: str, repo_type: str, flag: str, revision: str | None = None) -> None:
    """A name that is not a local path: it must be a hub id, fetchable now (a short request, not the 30 s or more of
    the loaders' retries when the network is down)."""
    from huggingface_hub import constants, dataset_info, model_info
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    kind = "dataset directory or data file" if repo_type == "dataset" else "model directory"
    if not _is_hub_id(name):
        raise InputError(
            f"{flag} {name}: no such file or directory. Pass an existing {kind}, or a Hugging Face Hub {repo_type} id "
            "(namespace/name)."
        )
    if constants.HF_HUB_OFFLINE:
        if repo_type == "dataset":
            return  # load_dataset finds a cached dataset itself offline (its error is wrapped by load_user_datasets)
        raise InputError(
            f"{flag} {name}: not a local {kind}, and not in the Hugging Face cache ({constants.HF_HUB_CACHE}), which "
            "is all HF_HUB_OFFLINE=1 allows. Download it once with network access (`hf download "
            f"{name}`), or pass a local {kind}."
        )
    info = dataset_info if repo_type == "dataset" else model_info
    fix = (
        f"Pass a local {kind}, or set HF_HUB_OFFLINE=1 if the dataset is in the datasets cache."
        if repo_type == "dataset"
        else f"It is not in the Hugging Face cache either: pass a local {kind}, or run where the Hub is reachable."
    )
    try:
        info(name, revision=revision, timeout=10)
    except GatedRepoError:
        return  # the loader says how to get access
    except RepositoryNotFoundError:
        raise InputError(
            f"{flag} {name}: no such local path, and no such {repo_type} on the Hugging Face Hub (if it is private, "
            "log in first: `hf auth login`)."
        ) from None
    except RevisionNotFoundError:
        raise InputError(f"{flag} {name}: the Hub has no revision {revision!r} of it.") from None
    except HfHubHTTPError:
        return  # reachable; the loader reports anything else
    except Exception as error:  # no network: DNS, connection refused, timeout
        reason = " ".join(str(error).split())[:200]
        raise InputError(
            f"{flag} {name}: not a local {kind}, and the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached "
            f"({type(error).__name__}: {reason}). {fix}"
        ) from None


def load_user_datasets(script_args, dataset_args, with_eval: bool):
    """The training split and, when `with_eval`, the evaluation split of `--dataset_name` (or `--datasets`).

    `--dataset_name` is a hub id, a local dataset directory (data files in it, or a `save_to_disk` folder), or a single
    data file (`.json`, `.jsonl`, `.parquet`, `.csv`, optionally `.gz`/`.bz2`/`.xz`/`.zst` compressed), which is the
    training data whatever `--dataset_train_split` says. `--dataset_test_split` names the evaluation split of the
    dataset, or an evaluation data file. A split that is asked for and missing is an error naming the splits there
    are, never a silent run without evaluation. Every row is checked (`check_preference_rows`) before a model loads:
    the messages name the file (or dataset and split), the row (0-based) and the column.
    """
    from datasets import DatasetDict, load_dataset, load_from_disk
    from trl import get_dataset

    name, streaming = script_args.dataset_name, script_args.dataset_streaming
    train_split, test_split = script_args.dataset_train_split, script_args.dataset_test_split
    eval_file = with_eval and data_file_builder(test_split) is not None
    if dataset_args is not None and dataset_args.datasets:
        dataset = get_dataset(dataset_args)
    elif name is None:
        raise InputError("`--dataset_name` is required with `--model_name_or_path` (or omit both for the built-in task).")
    elif data_file_builder(name) is not None and not os.path.isdir(name):
        train = _load_data_file(name, "--dataset_name", streaming)
        if with_eval and not eval_file:
            raise InputError(
                f"--dataset_name {name} is a single file: it has no {test_split!r} split to evaluate on, and evaluation "
                "is on (--eval_strategy). Pass the evaluation data with --dataset_test_split path/to/eval.jsonl, or "
                "a directory holding train and test files as --dataset_name, or set --eval_strategy no."
            )
        evaluation = _load_data_file(test_split, "--dataset_test_split", streaming) if eval_file else None
        return _checked(train, name), _checked(evaluation, test_split)
    elif os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_dict.json")):
        dataset = load_from_disk(name)
    elif os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_info.json")):
        dataset = DatasetDict({train_split: load_from_disk(name)})
    else:
        check_data_path(name)
        try:
            dataset = load_dataset(name, name=script_args.dataset_config, streaming=streaming)
        except (ConnectionError, FileNotFoundError) as error:  # offline and not cached, or no such dataset
            reason = " ".join(str(error).split())[:300]
            raise InputError(f"--dataset_name {name}: cannot be loaded ({type(error).__name__}: {reason})") from error
    source = f"--dataset_name {name}" if name is not None else "--datasets"
    if train_split not in dataset:
        raise InputError(
            f"{source} has no {train_split!r} split (it has {sorted(dataset)}): choose one with --dataset_train_split."
        )
    evaluation = None
    if eval_file:
        evaluation = _checked(_load_data_file(test_split, "--dataset_test_split", streaming), test_split)
    elif with_eval:
        if test_split not in dataset:
            raise InputError(
                f"{source} has no {test_split!r} split to evaluate on (it has {sorted(dataset)}), and evaluation is on "
                "(--eval_strategy). Choose a split with --dataset_test_split (or give an evaluation data file there), "
                "or set --eval_strategy no."
            )
        evaluation = _checked(dataset[test_split], f"{name or '--datasets'} (split {test_split!r})")
    return _checked(dataset[train_split], f"{name or '--datasets'} (split {train_split!r})"), evaluation


def _checked(dataset, source: str | None):
    """`dataset` after `check_preference_rows`, whose messages name `source` (a data file: its path, and its columns
    are the "fields" of its JSON objects)."""
    if dataset is not None:
        from ..data import check_preference_rows

        noun = "field" if data_file_builder(source) == "json" else "column"
        check_preference_rows(dataset, source, noun=noun)
    return dataset


def builtin_task(task_args):
    """Build (or load from cache) the built-in task; its directory is the model path."""
    from ..synthetic import SyntheticTaskConfig, build_task

    cache = task_args.task_cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "trl_tokenpo")
    config = SyntheticTaskConfig(seed=task_args.task_seed, num_train_pairs=task_args.task_num_train_pairs)
    return build_task(config, cache_dir=cache)


def policy_for_generation(trainer):
    """The trained policy as a plain module for generation (unwrapped from DDP/DeepSpeed)."""
    return trainer.accelerator.unwrap_model(trainer.model)


def builtin_report(task, policy, task_args, seed: int = 1234) -> list[dict]:
    """Oracle reward, KL to the reference, entropy of the reference (before) and the trained policy (after) on the
    task's held-out prompts, and the policy's preference accuracy on the held-out pairs (`None` for the reference:
    its implicit reward `beta * log(pi / pi_ref)` is 0 on every response, so it ranks no pair)."""
    from ..evaluation import evaluate_policy, preference_accuracy

    reference = task.model
    rows = []
    for name, model in (("before (reference)", reference), ("after (trained)", policy)):
        stats = evaluate_policy(
            model, reference, task.tokenizer, task.eval_prompts, task.oracle,
            num_samples_per_prompt=task_args.eval_num_samples_per_prompt,
            max_new_tokens=task_args.eval_max_new_tokens, seed=seed,
        )  # fmt: skip
        stats["preference_accuracy"] = (
            None if model is reference else preference_accuracy(model, reference, task.tokenizer, task.eval_dataset)
        )
        rows.append({"model": name, **stats})
    return rows


def format_report(rows: list[dict]) -> str:
    """A short fixed-width table of `builtin_report` rows."""
    header = f"{'':20s} {'oracle reward':>18s} {'KL to reference':>18s} {'entropy':>8s} {'length':>7s} {'pref. acc.':>10s}"
    lines = [header, "-" * len(header)]
    for r in rows:
        accuracy = "-" if r["preference_accuracy"] is None else f"{r['preference_accuracy']:.3f}"
        lines.append(
            f"{r['model']:20s} {r['reward_mean']:>+9.3f} ± {r['reward_sem']:<6.3f} {r['kl_mean']:>9.3f} ± {r['kl_sem']:<6.3f}"
            f" {r['entropy_mean']:>8.3f} {r['length_mean']:>7.1f} {accuracy:>10s}"
        )
    lines.append(
        "pref. acc.: share of held-out pairs whose chosen response gets the higher implicit reward beta * log(pi / "
        "pi_ref); '-' for the reference, whose implicit reward is 0 everywhere."
    )
    return "\n".join(lines)


def format_metrics(metrics: dict) -> str:
    """Final evaluation metrics (user data) as `name: value` lines."""
    return "\n".join(f"{k:40s} {v:.4f}" if isinstance(v, float) else f"{k:40s} {v}" for k, v in sorted(metrics.items()))


def load_model_and_data(script_args, training_args, model_args, dataset_args, task_args, builtin: bool):
    """The model (path or hub id) and the train / eval datasets of a training script, and the built-in task (or
    `None`), before any model is loaded: the model path is checked (`check_model_path`) and every row of the data
    (`load_user_datasets`). Also sets `training_args.model_init_kwargs` from the model arguments, as TRL's scripts
    do."""
    task = None
    if builtin:
        task = builtin_task(task_args)
        model, train_dataset = task.model.name_or_path, task.train_dataset
        eval_dataset = task.eval_dataset if training_args.eval_strategy != "no" else None
    else:
        model = model_args.model_name_or_path
        if model is None:
            raise InputError(
                "`--model_name_or_path` is required with `--dataset_name` (or omit both for the built-in task)."
            )
        check_model_path(model, model_args.model_revision)
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


# ----------------------------------------------------------------------------------------------------------------------
# The command line: parser, unknown flags, how a run ends on bad input
# ----------------------------------------------------------------------------------------------------------------------


def group_options(parser, title: str, dests) -> None:
    """Move the options whose `dest` is in `dests` to the argument group `title`, listed before TRL's options in
    `--help_all` (groups are listed in the order they were made)."""
    group = next((g for g in parser._action_groups if g.title == title), None)
    if group is None:
        group = parser.add_argument_group(title)
        parser._action_groups.remove(group)
        parser._action_groups.insert(parser._action_groups.index(parser._optionals), group)
    for action in parser._actions:
        if action.dest in dests and action not in group._group_actions:
            for other in parser._action_groups:
                if action in other._group_actions:
                    other._group_actions.remove(action)
            group._group_actions.append(action)


def command_parser(dataclass_types, prog, own_options, formatter_class=None):
    """TRL's parser of a command, for `--help_all` and parsing: this package's options first (`own_options`: (title,
    module file, dataclass) as in the command modules), a short usage line, and `--dataset_name`'s help saying that a
    data file works."""
    from trl import TrlParser

    from .help import DATASET_NAME_HELP
    from .help import own_options as read_own_options

    kwargs = {"formatter_class": formatter_class} if formatter_class is not None else {}
    # allow_abbrev=False: a prefix of a flag (`--learning_rat`) is an unknown flag with a suggestion, not silently
    # another flag (as in TRL's `trl` command)
    parser = TrlParser(
        dataclass_types, prog=prog, usage="%(prog)s [options]  (--help: a summary; --help_all: all)",
        allow_abbrev=False, **kwargs,
    )  # fmt: skip
    for action in parser._actions:
        if action.dest == "dataset_name":
            action.help = DATASET_NAME_HELP
    groups = list(own_options)
    if BuiltinTaskArguments in dataclass_types:
        groups.append(("Built-in task", "scripts/utils.py", "BuiltinTaskArguments"))
    for title, path, class_name in groups:
        group_options(parser, title, {o.flag.removeprefix("--") for o in read_own_options(path, class_name)})
    parser._optionals.title = "TRL and transformers options (those of `trl dpo`)"
    return parser


def _flag_names(parser) -> list[str]:
    return [option for action in parser._actions for option in action.option_strings if option.startswith("--")]


def unknown_options_message(unknown: list[str], known: list[str], aliases: dict, prog: str) -> str:
    """One line for the flags no parser took: each with the closest valid flag (or the flag it is an alias of)."""
    parts, after_option = [], False
    for token in unknown:
        if not token.startswith("-"):
            if not after_option:  # the value of an unknown option is not worth a word of its own
                parts.append(f"unexpected value {token!r} (options take the form --name value)")
            after_option = False
            continue
        name = token.split("=", 1)[0]
        hint = aliases.get(name) or next(iter(difflib.get_close_matches(name, known, n=1, cutoff=0.6)), None)
        parts.append(f"unknown option {name}" + (f" (did you mean {hint}?)" if hint else ""))
        after_option = "=" not in token
    return "; ".join(parts) + f". `{prog} --help` lists the options."


def split_launcher_args(tokens: list[str], launcher_options: dict) -> tuple[list[str], list[str]]:
    """(options of `accelerate launch` with their values, the rest) of the tokens the command's parser left.
    `launcher_options` maps each option string of the launcher to the number of values it takes (0, 1 or "?")."""
    launch, rest, i = [], [], 0
    while i < len(tokens):
        token = tokens[i]
        name = token.split("=", 1)[0]
        if name not in launcher_options:
            rest.append(token)
            i += 1
            continue
        count = 0 if "=" in token else launcher_options[name]
        if count == "?":
            count = int(i + 1 < len(tokens) and not tokens[i + 1].startswith("-"))
        launch += tokens[i : i + 1 + count]
        i += 1 + count
    return launch, rest


def parse_command_line(parser, argv, prog, aliases=None, launcher_options=None):
    """TRL's `parse_args_and_config`, with every flag accounted for: the dataclasses, and the options left for
    `accelerate launch` (only when `launcher_options` says which they are). A flag nobody takes, a `--config` key
    nobody takes, or a value a config refuses (its `__post_init__`) is an `InputError` naming it."""
    try:
        *args, config_rest, cli_rest = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except (ValueError, TypeError) as error:  # a config's own check of the values
        raise InputError(" ".join(str(error).split())) from error
    prog = prog or parser.prog
    if config_rest:
        keys = [token.removeprefix("--") for token in config_rest[::2]]
        known = [name.removeprefix("--") for name in _flag_names(parser)]
        hints = [
            f"{key} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(key, known, 1, 0.6)) else key
            for key in keys
        ]
        raise InputError(f"--config: unknown keys: {', '.join(hints)}. `{prog} --help` lists the options.")
    launch_args, unknown = split_launcher_args(cli_rest, launcher_options or {})
    if unknown:
        known = _flag_names(parser) + [o for o in (launcher_options or {}) if o.startswith("--")]
        raise InputError(unknown_options_message(unknown, known, aliases or {}, prog))
    return args, launch_args


def is_user_error(error: BaseException) -> bool:
    """Whether `error` is bad input rather than a bug: an `InputError`, or a `ValueError` / `TypeError` / `OSError` /
    `ImportError` (an optional dependency) raised by this package itself (the innermost frame of its traceback is in
    `trl_tokenpo`)."""
    if isinstance(error, InputError):
        return True
    if not isinstance(error, (ValueError, TypeError, OSError, ImportError)) or error.__traceback__ is None:
        return False
    innermost = traceback.extract_tb(error.__traceback__)[-1].filename
    return os.path.abspath(innermost).startswith(os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep)


# Set by `trl-tokenpo` for the processes it launches: where a process that ends on bad input writes its error line
ERROR_FILE_ENV = "TRL_TOKENPO_ERROR_FILE"
# Set by the user: bad input ends with its traceback, as a bug does
DEBUG_ENV = "TRL_TOKENPO_DEBUG"


def exit_on_user_error(prog: str, error: BaseException) -> None:
    """End the run with one line `<prog>: error: <message>` and exit status 2 when `error` is bad input (and the
    debug variable is not set); a bug keeps its traceback."""
    debug = os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")
    if debug or not is_user_error(error):
        return
    sys.stdout.flush()
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and not isinstance(error, InputError) and error.filename:
        message = f"{error.filename}: {error.strerror or message}"
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    if os.environ.get(ERROR_FILE_ENV):  # launched by trl-tokenpo: it repeats the line after the launcher's own output
        with open(f"{os.environ[ERROR_FILE_ENV]}.{os.environ.get('RANK', '0')}", "w", encoding="utf-8") as f:
            f.write(f"{prog}: error: {message}\n")
    raise SystemExit(2) from None


def print_help(module, argv: list[str], prog: str) -> bool:
    """Print `--help_all` (TRL's parser, with the built-in task's defaults noted) or `--help` (fast) if asked."""
    from .help import fast_help

    if "--help_all" in argv:
        module.build_parser(argv, prog)[0].print_help()
    elif help_requested(argv):
        print(fast_help(module, prog), end="")
    else:
        return False
    return True


def run_command(module, argv=None, prog=None) -> int:
    """Run a command module (`trl_tokenpo.scripts.tdpo`, `.tisdpo`, `.estimate`) in this process: `--help` (fast),
    `--help_all` (TRL's parser), or parse, check and run, ending with one line on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or f"trl-tokenpo {module.COMMAND}"
    if print_help(module, argv, prog):
        return 0
    try:
        args, _ = module.parse(argv, prog)
        module.main(*args)
    except Exception as error:
        exit_on_user_error(prog, error)
        raise
    return 0
