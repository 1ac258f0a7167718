"""The commands' `--help`, in a fraction of a second: it imports neither torch, transformers nor trl.

The complete list of options comes from TRL's parser, which needs those imports (several seconds); `--help_all` prints
it. `--help` prints the description and the data formats, then this package's own options with their defaults and
help, read from the dataclass definitions in this package's source (`own_options`, without importing them; a test
checks that they equal the parser's), then the TRL options most runs set.
"""

from __future__ import annotations

import ast
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

from ..compat import checkpointing_name
from .utils import DEBUG_ENV


PACKAGE = Path(__file__).resolve().parents[1]

DATASET_NAME_HELP = (
    "The preference data: a hub dataset id, a local dataset directory (data files, or a `save_to_disk` folder), or one "
    "local data file: .json, .jsonl, .parquet or .csv (optionally .gz/.bz2/.xz/.zst compressed), which is the training "
    "split."
)
DATA_FORMATS = (
    "Data: each row is a preference pair with `prompt` (optional: without it, the prompt is the common beginning of "
    "the two completions), `chosen` and `rejected`. Standard rows hold text, e.g. one line of a .jsonl file: "
    '{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}. Conversational rows hold lists of messages, '
    'e.g. {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}], '
    '"rejected": [{"role": "assistant", "content": "Go away."}]} (the tokenizer\'s chat template renders them). '
    "--dataset_name takes a hub dataset id, a dataset directory, or one .json / .jsonl / .parquet / .csv file. Every "
    "row is checked before a model loads: a missing, mistyped or empty field ends the run with one line naming the "
    "file, the row (counted from 0), the field and the fix."
)
# TRL options (ScriptArguments, ModelConfig, DPOConfig, TrainingArguments) that most runs set, by section
COMMON_TRL_OPTIONS = {
    "Model and data": [
        "--model_name_or_path", "--dataset_name", "--dataset_config", "--dataset_train_split", "--dataset_test_split",
        "--config",
    ],
    "Training": [
        "--output_dir", "--beta", "--learning_rate", "--num_train_epochs", "--max_steps",
        "--per_device_train_batch_size", "--gradient_accumulation_steps", "--max_length", "--bf16", "--use_cpu",
        "--gradient_checkpointing", "--eval_strategy", "--logging_steps", "--save_strategy", "--report_to", "--seed",
    ],
    "LoRA and quantization": ["--use_peft", "--lora_r", "--lora_alpha", "--lora_target_modules", "--load_in_4bit"],
}  # fmt: skip


@dataclass
class Option:
    """One option as `--help` shows it."""

    flag: str
    default: object
    help: str | None
    choices: list | None = None
    has_default: bool = True


def _literal(node):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        return None


def own_options(path: str, class_name: str, prefix: str = "") -> list[Option]:
    """The fields a dataclass declares in its own body (not the inherited ones), as options `--<prefix><name>`, read
    from `trl_tokenpo/<path>` without importing it. A default or help that is not a literal reads as `None`."""
    tree = ast.parse((PACKAGE / path).read_text(encoding="utf-8"))
    cls = next(node for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and node.name == class_name)
    options = []
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        call = node.value
        keywords = {k.arg: k.value for k in call.keywords} if isinstance(call, ast.Call) else {}
        if _literal(keywords.get("init")) is False:
            continue
        metadata = keywords.get("metadata")
        metadata = (
            {_literal(k): v for k, v in zip(metadata.keys, metadata.values)} if isinstance(metadata, ast.Dict) else {}
        )
        if "default" in keywords:
            default, has_default = _literal(keywords["default"]), True
        elif isinstance(keywords.get("default_factory"), ast.Lambda):
            default, has_default = _literal(keywords["default_factory"].body), True
        elif not isinstance(call, ast.Call) and call is not None:
            default, has_default = _literal(call), True
        else:
            default, has_default = None, False
        options.append(
            Option(
                f"--{prefix}{node.target.id}", default, _literal(metadata.get("help")), _literal(metadata.get("choices")),
                has_default,
            )
        )
    return options


def _format_default(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _width() -> int:
    return max(min(shutil.get_terminal_size((100, 24)).columns, 120) - 2, 60)


def _wrap(text: str, indent: str = "", first: str | None = None) -> str:
    return textwrap.fill(
        " ".join(text.split()), width=_width(), initial_indent=indent if first is None else first,
        subsequent_indent=indent, break_on_hyphens=False,
    )  # fmt: skip


def format_options(title: str, options: list[Option], builtin: dict | None = None, hide_none: bool = False) -> str:
    """A section like argparse's: the flag (with its choices), then the help, the default and the built-in task's."""
    builtin = builtin or {}
    lines = [f"{title}:"]
    for option in options:
        name = option.flag.removeprefix("--")
        metavar = "{" + ",".join(map(str, option.choices)) + "}" if option.choices else name.upper()
        lines.append(f"  {option.flag} {metavar}")
        text = option.help or "(described by --help_all)"
        if option.has_default and not (hide_none and option.default is None):
            text += f" (default: {_format_default(option.default)})"
        if name in builtin:
            text += f" [built-in task: {_format_default(builtin[name])}]"
        lines.append(_wrap(text, " " * 8))
    return "\n".join(lines)


def estimator_flag_names(module) -> list[str]:
    """The `--estimator_<field>` flags of `trl-tokenpo tisdpo`, as `estimator_arguments_class` makes them."""
    own = [o.flag.removeprefix("--") for o in own_options("estimator/config.py", "WeightEstimatorConfig")]
    names = [n for n in own if n != "method"] + list(module.ESTIMATOR_TRAINING_FLAGS)
    names = [checkpointing_name() if n == "gradient_checkpointing" else n for n in names]  # as tisdpo.py names them
    return [f"--estimator_{name}" for name in dict.fromkeys(names)]


def _estimator_flags_help(module) -> str:
    flags = ", ".join(estimator_flag_names(module))
    return _wrap(
        "The estimator's settings, one flag per field of WeightEstimatorConfig (`trl-tokenpo estimate --help` "
        f"describes them): {flags}. Unset, a field takes the trainer's value for the settings they share (batch size, "
        "gradient accumulation, max_length, seed, precision, gradient checkpointing, dataset_num_proc), else "
        "WeightEstimatorConfig's default; the built-in task sets --estimator_learning_rate 0.003 and "
        "--estimator_num_train_epochs 3.",
        " " * 8, first="  --estimator_<field> VALUE\n" + " " * 8,
    )


def fast_help(module, prog: str) -> str:
    """`--help` of a command module (`trl_tokenpo.scripts.tdpo`, `.tisdpo`, `.estimate`)."""
    from .utils import BUILTIN_TRAINING_DEFAULTS

    command = module.COMMAND
    training = command != "estimate"
    sections = [
        f"usage: {prog} [options]\n"
        f"       accelerate launch [accelerate options] -m trl_tokenpo.scripts.{command} [options]",
        _wrap(module.DESCRIPTION),
        _wrap(DATA_FORMATS),
    ]
    builtin = {**getattr(module, "BUILTIN_SCRIPT_DEFAULTS", {})}
    builtin.update({f"estimator_{k}": v for k, v in getattr(module, "BUILTIN_ESTIMATOR_SETTINGS", {}).items()})
    for title, path, class_name in module.OWN_OPTIONS:
        section = format_options(title, own_options(path, class_name), builtin, hide_none=path.startswith("estimator"))
        if command == "tisdpo" and class_name == "EstimatorScriptArguments":
            section += "\n" + _estimator_flags_help(module)
        sections.append(section)
    if training:
        sections.append(format_options("Built-in task", own_options("scripts/utils.py", "BuiltinTaskArguments")))
        changed = ", ".join(f"--{k} {_format_default(v)}" for k, v in BUILTIN_TRAINING_DEFAULTS.items())
        sections.append(
            _wrap(
                "Without --model_name_or_path and --dataset_name (and without --config) the command runs the built-in "
                f"task, which changes these defaults: {changed}; a flag you give always wins."
            )
        )
    common = COMMON_TRL_OPTIONS if training else {k: v for k, v in COMMON_TRL_OPTIONS.items() if k != "Training"}
    trl_lines = ["TRL options (every option of `trl dpo` is accepted; --help_all lists them with defaults):"]
    for section, flags in common.items():
        if not training:
            flags = [f for f in flags if f not in ("--dataset_test_split", "--use_peft", "--lora_r", "--lora_alpha",
                                                   "--lora_target_modules")]  # fmt: skip
        trl_lines.append(_wrap(f"{section}: " + ", ".join(flags), "  "))
    trl_lines.append(_wrap(f"--dataset_name: {DATASET_NAME_HELP}", "  "))
    sections.append("\n".join(trl_lines))
    sections.append(
        _wrap(
            f"Launching: `trl-tokenpo {command}` runs under `accelerate launch` (one process, or what `accelerate "
            "config` set up); accelerate's own options go on the same command line (e.g. --num_processes 8, "
            "--config_file zero3.yaml, "
            "or --accelerate_config with a config name TRL ships: zero3, fsdp2, multi_gpu, ...). A bad flag, file, "
            "row or model path ends the run with one line `error: ...` naming it and the fix (exit status 2); "
            f"{DEBUG_ENV}=1 shows the traceback instead."
        )
    )
    return "\n\n".join(sections) + "\n"
