# Copyright 2026 The trl-tokenpo developers. Licensed under the Apache License, Version 2.0.
"""
Train with TDPO: TRL's `dpo.py` script with `TDPOTrainer` / `TDPOConfig` (`trl-tokenpo tdpo`).

Without `--model_name_or_path` / `--dataset_name` it runs on the built-in synthetic task (no network) and prints the
oracle reward and KL to the reference of sampled responses before and after training:

```bash
trl-tokenpo tdpo
```

On your model and data (any TRL preference dataset, or a .jsonl / .json / .parquet / .csv file), with LoRA:

```bash
trl-tokenpo tdpo \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
    --dataset_name trl-lib/ultrafeedback_binarized \
    --tdpo_variant tdpo2 --alpha 0.5 --beta 0.1 \
    --learning_rate 5.0e-6 --per_device_train_batch_size 2 --gradient_accumulation_steps 8 \
    --use_peft --lora_r 32 --lora_alpha 16 \
    --output_dir Qwen2.5-0.5B-TDPO
```

The same with `accelerate launch -m trl_tokenpo.scripts.tdpo ...` (or `python -m trl_tokenpo tdpo ...`).
"""

import sys


COMMAND = "tdpo"
DESCRIPTION = (
    "Train a causal language model on preference pairs with TDPO (Zeng et al., ICML 2024): DPO's loss with a "
    "token-level forward KL to the reference model in the margin (TDPO1, or TDPO2 weighted by --alpha), computed over "
    "the full vocabulary in tiles. It is TRL's `trl dpo` with `TDPOTrainer`: every option of `trl dpo` works the "
    "same. Without --model_name_or_path and --dataset_name it trains on the built-in synthetic task (offline, a few "
    "minutes on a CPU) and prints the oracle reward and KL of sampled responses before and after training."
)
# Own options shown first by --help: (module file, dataclass) whose fields are this command's own
OWN_OPTIONS = (("TDPO (TDPOConfig)", "trainer/tdpo.py", "TDPOConfig"),)


def check_inputs(script_args, training_args, model_args, dataset_args, task_args, builtin):
    """What can be checked before any process starts and any model loads: the model path and every row of the data
    (the built-in task needs no check)."""
    from trl_tokenpo.scripts.utils import load_model_and_data

    if not builtin:
        load_model_and_data(script_args, training_args, model_args, dataset_args, task_args, builtin)


def main(script_args, training_args, model_args, dataset_args, task_args, builtin):
    from trl import get_peft_config, get_quantization_config

    from trl_tokenpo import TDPOTrainer
    from trl_tokenpo.scripts.utils import load_model_and_data, train_and_report

    task, model, train_dataset, eval_dataset = load_model_and_data(
        script_args, training_args, model_args, dataset_args, task_args, builtin
    )
    trainer = TDPOTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    train_and_report(trainer, training_args, script_args, task, task_args)


def make_parser(prog=None):
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments

    from trl_tokenpo import TDPOConfig
    from trl_tokenpo.scripts.utils import BuiltinTaskArguments, command_parser

    return command_parser(
        (ScriptArguments, TDPOConfig, ModelConfig, DatasetMixtureConfig, BuiltinTaskArguments), prog, OWN_OPTIONS
    )


def build_parser(argv, prog=None):
    """The parser and whether `argv` runs the built-in task (whose defaults the parser then has)."""
    from trl_tokenpo.scripts.utils import apply_parser_defaults

    parser = make_parser(prog)
    return parser, apply_parser_defaults(parser, argv)


def parse(argv, prog=None, launcher_options=()):
    """The parsed arguments (the first five dataclasses and `builtin`), and what is left for `accelerate launch`."""
    from trl_tokenpo.scripts.utils import parse_command_line

    parser, builtin = build_parser(argv, prog)
    args, launch_args = parse_command_line(parser, argv, prog, launcher_options=launcher_options)
    return (*args[:5], builtin), launch_args


def run(argv=None, prog=None) -> int:
    from trl_tokenpo.scripts.utils import run_command

    return run_command(sys.modules[__name__], argv, prog)


if __name__ == "__main__":
    raise SystemExit(run())
