# Copyright 2026 The trl-tokenpo developers. Licensed under the Apache License, Version 2.0.
"""
The whole TIS-DPO pipeline (`trl-tokenpo tisdpo`): estimate token weights with a contrastive pair of LoRA adapters,
then train with `TISDPOTrainer`. It is TRL's `dpo.py` script with `TISDPOTrainer` / `TISDPOConfig` and an estimation
step.

Without `--model_name_or_path` / `--dataset_name` it runs on the built-in synthetic task (no network), prints the
oracle reward and KL to the reference of sampled responses before and after training, and writes a heat map of the
estimated token rewards:

```bash
trl-tokenpo tisdpo
```

On your model and data (any TRL preference dataset, or a .jsonl / .json / .parquet / .csv file), with LoRA:

```bash
trl-tokenpo tisdpo \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
    --dataset_name trl-lib/ultrafeedback_binarized \
    --weights_method dpo --estimator_learning_rate 5e-5 \
    --tis_kl_term none --beta 0.1 \
    --learning_rate 5.0e-6 --per_device_train_batch_size 2 --gradient_accumulation_steps 8 \
    --use_peft --lora_r 32 --lora_alpha 16 \
    --output_dir Qwen2.5-0.5B-TISDPO
```

The same with `accelerate launch -m trl_tokenpo.scripts.tisdpo ...` (or `python -m trl_tokenpo tisdpo ...`).

`--weights_method given` skips the estimation when the dataset already carries `chosen_token_rewards` /
`rejected_token_rewards` (e.g. from `trl-tokenpo estimate`) or `chosen_weights` / `rejected_weights`.

The estimator inherits from the trainer its batch size, gradient accumulation, `max_length`, seed, precision
(`bf16`, `fp16`, `use_cpu`), gradient checkpointing and `dataset_num_proc` (`INHERITED_TRAINER_SETTINGS`); it writes to
`<output_dir>/estimator`. `--estimator_<field>` flags (every field of `WeightEstimatorConfig`'s own and its main
training fields, e.g. `--estimator_max_length 512`) and `--estimator_config estimator.yaml` (any of its fields) set
the rest or override; a flag wins over the file. Adapters already in the estimator's output directory (for example
fitted in Python) are reused only when every fit setting matches.
"""

import argparse
import dataclasses
import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field

from trl_tokenpo.compat import checkpointing_name


COMMAND = "tisdpo"
DESCRIPTION = (
    "Train a causal language model on preference pairs with TIS-DPO (Liu et al., ICLR 2025): DPO's loss with an "
    "importance weight on every completion token. The weights come from token rewards that a contrastive pair of LoRA "
    "adapters on your model estimates first (--weights_method dpo, sft or prompt; cached on disk), or from the "
    "dataset (--weights_method given). It is TRL's `trl dpo` with `TISDPOTrainer` and that estimation step: every "
    "option of `trl dpo` works the same. Without --model_name_or_path and --dataset_name it runs the whole pipeline on "
    "the built-in synthetic task (offline, a few minutes on a CPU) and prints the oracle reward and KL of sampled "
    "responses before and after training."
)
# Own options shown first by --help: (title, module file, dataclass) whose fields are this command's own
OWN_OPTIONS = (
    ("Token weights", "scripts/tisdpo.py", "EstimatorScriptArguments"),
    ("TIS-DPO (TISDPOConfig)", "trainer/tisdpo.py", "TISDPOConfig"),
)
# Flags users reach for that mean another one
ALIASES = {"--estimator_method": "--weights_method", "--method": "--weights_method", "--weights": "--weights_method"}


@dataclass
class EstimatorScriptArguments:
    """How the token weights are obtained; the `--estimator_*` flags (generated from `WeightEstimatorConfig`, see
    `estimator_arguments_class`) and `--estimator_config` set the estimator itself.

    Parameters:
        weights_method (`str`, defaults to `"dpo"`): `"dpo"`, `"sft"` or `"prompt"` (estimator methods), or `"given"`
            (the dataset already has per-token columns).
        estimator_config (`str`, *optional*): YAML file of `WeightEstimatorConfig` fields (any of them, by their own
            names, e.g. `max_length: 512`); `--estimator_*` flags given on the command line win over it.
        heatmap_examples (`int`, defaults to `3`): training examples drawn in the token-reward heat map.
    """

    weights_method: str = field(
        default="dpo",
        metadata={"help": "Token weights: 'dpo', 'sft', 'prompt' (estimated) or 'given' (dataset columns).",
                  "choices": ["dpo", "sft", "prompt", "given"]},
    )  # fmt: skip
    estimator_config: str | None = field(
        default=None,
        metadata={"help": "YAML file of WeightEstimatorConfig fields (their own names, e.g. 'max_length: 512'); "
                  "--estimator_* flags win over it."},
    )  # fmt: skip
    heatmap_examples: int = field(default=3, metadata={"help": "Training examples drawn in the heat map."})


# Trainer settings the estimator inherits, so that its adapters train and score like the policy (same batch, sequence
# length cap, seed, precision and memory settings). The --estimator_config file and --estimator_* flags override them.
# (`gradient_checkpointing` is TRL's name; transformers >= 5.24 calls it `activation_checkpointing`, see
# `trl_tokenpo.compat.checkpointing_name`.)
INHERITED_TRAINER_SETTINGS = (
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "seed", "bf16", "fp16", "use_cpu",
    "gradient_checkpointing", "dataset_num_proc", "disable_tqdm",
)  # fmt: skip
# TrainingArguments fields of WeightEstimatorConfig that get an --estimator_* flag, besides its own fields (every
# other one can go in the --estimator_config file).
ESTIMATOR_TRAINING_FLAGS = (
    "output_dir", "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "weight_decay", "lr_scheduler_type", "warmup_steps", "seed",
    "gradient_checkpointing", "logging_steps",
)  # fmt: skip
FLAG_PREFIX = "estimator_"

# Estimator settings of the built-in task. Its model is tiny, so the adapters need a larger learning rate than the
# estimator's defaults (which target 0.5B+ models and leave the rewards near 0 here). SFT-based weights rather than
# the paper's DPO-based ones: on this task the DPO-trained pair is noisy on neutral words and TIS-DPO with its weights
# drifts further from the reference than DPO (docs/benchmarks.md, Quality), while SFT-based weights separate the good
# and bad words best (token AUROC 0.99). The estimator file and flags still override these.
BUILTIN_ESTIMATOR_SETTINGS = dict(learning_rate=3e-3, num_train_epochs=3)
BUILTIN_SCRIPT_DEFAULTS = dict(weights_method="sft")


def estimator_arguments_class():
    """`EstimatorScriptArguments` plus one optional `--estimator_<name>` flag per field `WeightEstimatorConfig` declares
    itself (LoRA, scoring, cache, prompts, and the training settings it gives its own default or help) and per field
    of `ESTIMATOR_TRAINING_FLAGS` (`trl_tokenpo.scripts.help.estimator_flag_names` lists the same flags without
    importing anything). Every flag defaults to unset:
    the estimator then takes the value from the trainer (`INHERITED_TRAINER_SETTINGS`), the estimator config file, or
    `WeightEstimatorConfig`'s own default, in that order of precedence (lowest first: file beats trainer)."""
    import typing

    from trl_tokenpo import WeightEstimatorConfig

    hints = typing.get_type_hints(WeightEstimatorConfig)
    by_name = {f.name: f for f in dataclasses.fields(WeightEstimatorConfig) if f.init}
    own = [n for n in WeightEstimatorConfig.__annotations__ if n in by_name and n != "method"]  # declared in its body
    names = [checkpointing_name() if n == "gradient_checkpointing" else n for n in own + list(ESTIMATOR_TRAINING_FLAGS)]
    names = list(dict.fromkeys(names))
    fields = []
    for name in names:
        f = by_name[name]  # a KeyError here means WeightEstimatorConfig lost a field this script exposes
        metadata = dict(f.metadata)
        text = re.sub(r"(?<!%)%(?!%)", "%%", metadata.get("help", ""))  # argparse formats help strings with %
        if name == checkpointing_name():
            text = "Gradient (activation) checkpointing of the adapter training. Unset: the trainer's setting."
        elif name in INHERITED_TRAINER_SETTINGS:
            text += f" Unset: the trainer's --{name}."
        elif name == "output_dir":
            text = "Adapters and score cache directory. Unset: <output_dir>/estimator."
        elif f.default not in (None, dataclasses.MISSING):
            text += f" Unset: {f.default}."
        metadata["help"] = text
        annotation = hints[name]
        if type(None) not in typing.get_args(annotation):
            annotation = annotation | None
        fields.append((FLAG_PREFIX + name, annotation, field(default=None, metadata=metadata)))
    cls = dataclasses.make_dataclass("EstimatorArguments", fields, bases=(EstimatorScriptArguments,))
    cls.__doc__ = estimator_arguments_class.__doc__
    return cls


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """TRL's help format, without "(default: None)" after the `--estimator_*` flags: their help says what unset means."""

    def _get_help_string(self, action):
        if action.dest.startswith(FLAG_PREFIX) and action.default is None:
            return action.help
        return super()._get_help_string(action)


def estimator_flags(est_args) -> dict:
    """The `--estimator_*` flags that were set, by their `WeightEstimatorConfig` names."""
    return {
        f.name.removeprefix(FLAG_PREFIX): getattr(est_args, f.name)
        for f in dataclasses.fields(est_args)
        if f.name.startswith(FLAG_PREFIX) and f.name != "estimator_config" and getattr(est_args, f.name) is not None
    }


def estimator_config(est_args, training_args, builtin: bool = False):
    """The `WeightEstimatorConfig` of the estimation step. Each field comes from, lowest precedence first: the trainer
    (`INHERITED_TRAINER_SETTINGS`; `output_dir` becomes `<output_dir>/estimator`, reporting is off), the built-in task's
    settings (built-in task only), the `--estimator_config` file, the `--estimator_*` flags. Anything else keeps
    `WeightEstimatorConfig`'s default."""
    import difflib

    import yaml

    from trl_tokenpo import WeightEstimatorConfig
    from trl_tokenpo.errors import InputError

    kwargs = {name: getattr(training_args, name) for name in INHERITED_TRAINER_SETTINGS}
    kwargs[checkpointing_name()] = kwargs.pop("gradient_checkpointing")
    kwargs.update(output_dir=os.path.join(training_args.output_dir, "estimator"), report_to="none")
    if builtin:
        kwargs.update(BUILTIN_ESTIMATOR_SETTINGS)
    if est_args.estimator_config:
        if not os.path.isfile(est_args.estimator_config):
            raise InputError(f"--estimator_config {est_args.estimator_config}: no such file.")
        with open(est_args.estimator_config) as f:
            from_file = yaml.safe_load(f) or {}
        if not isinstance(from_file, dict):
            raise InputError(f"--estimator_config {est_args.estimator_config}: expected a mapping of field: value.")
        method = from_file.pop("method", est_args.weights_method)
        if method != est_args.weights_method:
            raise InputError(
                f"--estimator_config {est_args.estimator_config} sets method: {method}, but --weights_method is "
                f"{est_args.weights_method!r}: choose the method with --weights_method only."
            )
        if "gradient_checkpointing" in from_file:  # TRL's name; the new one wins in transformers >= 5.24
            from_file.setdefault(checkpointing_name(), from_file.pop("gradient_checkpointing"))
        known = {f.name for f in dataclasses.fields(WeightEstimatorConfig) if f.init}
        unknown = sorted(set(from_file) - known)
        if unknown:
            hints = [f"{name} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(name, known, 1)) else name
                     for name in unknown]  # fmt: skip
            raise InputError(
                f"--estimator_config {est_args.estimator_config}: {unknown} are not WeightEstimatorConfig fields: "
                f"{', '.join(hints)}."
            )
        kwargs.update(from_file)
    kwargs.update(estimator_flags(est_args))
    return WeightEstimatorConfig(method=est_args.weights_method, **kwargs)


def _check_estimator_settings(est_args, training_args, builtin):
    """The estimator's config (`None` with --weights_method given), or an `InputError` for estimator settings that
    cannot apply (a bad --estimator_config file, estimator flags with given weights)."""
    from trl_tokenpo.errors import InputError

    if est_args.weights_method != "given":
        return estimator_config(est_args, training_args, builtin)
    if est_args.estimator_config or estimator_flags(est_args):
        unused = ["--estimator_config"] * bool(est_args.estimator_config)
        unused += [f"--{FLAG_PREFIX}{name}" for name in estimator_flags(est_args)]
        raise InputError(
            f"{', '.join(unused)} configure the estimator, which --weights_method given does not run: drop them, or "
            "choose an estimation method (dpo, sft, prompt)."
        )
    return None


def check_inputs(script_args, training_args, model_args, dataset_args, task_args, est_args, builtin):
    """What can be checked before any process starts and any model loads: the estimator settings, the model path and
    every row of the data (the built-in task needs no check)."""
    from trl_tokenpo.scripts.utils import load_model_and_data

    _check_estimator_settings(est_args, training_args, builtin)
    if not builtin:
        load_model_and_data(script_args, training_args, model_args, dataset_args, task_args, builtin)


def main(script_args, training_args, model_args, dataset_args, task_args, est_args, builtin):
    from trl import get_peft_config, get_quantization_config
    from trl.trainer.utils import create_model_from_path

    from trl_tokenpo import ContrastiveWeightEstimator, TISDPOTrainer
    from trl_tokenpo.scripts.utils import load_model_and_data, train_and_report
    from trl_tokenpo.viz import examples_from_dataset, save_token_heatmap

    config = _check_estimator_settings(est_args, training_args, builtin)
    task, model, train_dataset, eval_dataset = load_model_and_data(
        script_args, training_args, model_args, dataset_args, task_args, builtin
    )

    # 1. Token rewards from the contrastive pair (cached: a second run with the same inputs returns at once)
    if est_args.weights_method != "given":
        init_kwargs = dict(training_args.model_init_kwargs)
        if get_quantization_config(model_args) is not None:
            init_kwargs["quantization_config"] = get_quantization_config(model_args)
        estimator = ContrastiveWeightEstimator(create_model_from_path(model, **init_kwargs), args=config)
        estimator.fit(train_dataset)
        train_dataset = estimator.score(train_dataset)
        if eval_dataset is not None:
            eval_dataset = estimator.score(eval_dataset)
        del estimator  # free the estimator's model before training

    # 2. TIS-DPO
    trainer = TISDPOTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    if trainer.accelerator.is_main_process and est_args.heatmap_examples > 0:
        column = "token_rewards" if "chosen_token_rewards" in trainer.train_dataset.column_names else "weights"
        examples = examples_from_dataset(
            trainer.train_dataset, trainer.processing_class, column_prefix=column, num_examples=est_args.heatmap_examples
        )
        os.makedirs(training_args.output_dir, exist_ok=True)
        name = "token_rewards" if column == "token_rewards" else "token_weights"
        # the PNG needs matplotlib (the viz extra); the HTML needs nothing
        extensions = ("html", "png") if importlib.util.find_spec("matplotlib") is not None else ("html",)
        for extension in extensions:
            title = "Estimated token rewards (green: the contrastive pair prefers the token)" if column == "token_rewards" else "Token weights"
            save_token_heatmap(
                examples, os.path.join(training_args.output_dir, f"{name}.{extension}"), title=title,
                value_name=column.replace("_", " "), center=0.0 if column == "token_rewards" else 1.0,
            )  # fmt: skip
        note = " (and .png)" if "png" in extensions else " (a .png too with matplotlib: pip install 'trl-tokenpo[viz]')"
        print(f"Heat map of the {column.replace('_', ' ')}: {os.path.join(training_args.output_dir, f'{name}.html')}{note}")

    train_and_report(trainer, training_args, script_args, task, task_args)


def make_parser(prog=None):
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments

    from trl_tokenpo import TISDPOConfig
    from trl_tokenpo.scripts.utils import BuiltinTaskArguments, command_parser, group_options

    estimator_arguments = estimator_arguments_class()
    parser = command_parser(
        (ScriptArguments, TISDPOConfig, ModelConfig, DatasetMixtureConfig, BuiltinTaskArguments, estimator_arguments),
        prog, OWN_OPTIONS, formatter_class=HelpFormatter,
    )  # fmt: skip
    group_options(parser, OWN_OPTIONS[0][0], {f.name for f in dataclasses.fields(estimator_arguments)})
    return parser


def build_parser(argv, prog=None):
    """The parser and whether `argv` runs the built-in task (whose defaults the parser then has)."""
    from trl_tokenpo.scripts.utils import apply_parser_defaults

    parser = make_parser(prog)
    builtin_notes = {FLAG_PREFIX + name: value for name, value in BUILTIN_ESTIMATOR_SETTINGS.items()}
    builtin = apply_parser_defaults(parser, argv, builtin_defaults=BUILTIN_SCRIPT_DEFAULTS, builtin_notes=builtin_notes)
    return parser, builtin


def parse(argv, prog=None, launcher_options=()):
    """The parsed arguments (the six dataclasses and `builtin`), and what is left for `accelerate launch`."""
    from trl_tokenpo.scripts.utils import parse_command_line

    parser, builtin = build_parser(argv, prog)
    args, launch_args = parse_command_line(parser, argv, prog, ALIASES, launcher_options)
    return (*args[:6], builtin), launch_args


def run(argv=None, prog=None) -> int:
    from trl_tokenpo.scripts.utils import run_command

    return run_command(sys.modules[__name__], argv, prog)


if __name__ == "__main__":
    raise SystemExit(run())
