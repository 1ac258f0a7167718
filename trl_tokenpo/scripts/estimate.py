# Copyright 2026 The trl-tokenpo developers. Licensed under the Apache License, Version 2.0.
"""
Estimate TIS-DPO token rewards for a preference dataset with a contrastive pair of LoRA adapters (or system prompts):
`trl-tokenpo estimate`.

Writes the dataset with `chosen_token_rewards` / `rejected_token_rewards` (`save_to_disk`) and an HTML heat map of a
few examples. The weighted dataset trains with `trl-tokenpo tisdpo --weights_method given` / `TISDPOTrainer` on the
same tokenizer.

# DPO-trained pair (the paper's best method), LoRA
```bash
trl-tokenpo estimate \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
    --dataset_name trl-lib/ultrafeedback_binarized \
    --method dpo \
    --per_device_train_batch_size 8 \
    --gradient_accumulation_steps 2 \
    --lora_r 16 \
    --output_dir Qwen2.5-0.5B-weights
```

# Prompt-based pair (no training), a saved local dataset, CPU
```bash
trl-tokenpo estimate \
    --model_name_or_path path/to/model \
    --dataset_name path/to/saved_dataset \
    --method prompt --system_prompt_pair helpful \
    --use_cpu \
    --output_dir weights
```

LoRA settings come from the estimator's `--lora_r`, `--lora_alpha`, `--lora_dropout`, `--lora_target_modules`; the
model arguments are TRL's `ModelConfig` without its PEFT fields (the estimator always trains LoRA adapters). The same
with `accelerate launch -m trl_tokenpo.scripts.estimate ...` (or `python -m trl_tokenpo estimate ...`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field


COMMAND = "estimate"
DESCRIPTION = (
    "Estimate TIS-DPO's token rewards r_t = log pi_plus(t) - log pi_minus(t) for every completion token of a "
    "preference dataset, with a contrastive pair of LoRA adapters trained on your model (--method sft or dpo) or two "
    "system prompts (--method prompt), and save the dataset with `chosen_token_rewards` / `rejected_token_rewards` "
    "columns (tokenized exactly as the trainer will) and a heat map of a few examples. Train on it with "
    "`trl-tokenpo tisdpo --weights_method given`. Scores are cached on disk: a second run with the same inputs returns "
    "at once."
)
# Own options shown first by --help: (title, module file, dataclass) whose fields are this command's own
OWN_OPTIONS = (
    ("Estimator (WeightEstimatorConfig)", "estimator/config.py", "WeightEstimatorConfig"),
    ("Output", "scripts/estimate.py", "EstimateOutputArguments"),
)
ALIASES = {"--weights_method": "--method", "--estimator_method": "--method"}


@dataclass
class EstimateOutputArguments:
    """Where the script writes its results.

    Parameters:
        weighted_dataset_path (`str`, *optional*):
            Where the weighted dataset is saved (`save_to_disk`). Defaults to `<output_dir>/weighted_dataset`.
        heatmap_path (`str`, *optional*):
            Where the token heat map is written (`.html`, or `.png`/`.svg`/`.pdf` with matplotlib). Defaults to
            `<output_dir>/token_rewards.html`.
        num_heatmap_examples (`int`, *optional*, defaults to `4`):
            Number of examples (from the start of the dataset) shown in the heat map; `0` writes none.
    """

    weighted_dataset_path: str | None = field(
        default=None,
        metadata={"help": "Where the weighted dataset is saved. Defaults to <output_dir>/weighted_dataset."},
    )
    heatmap_path: str | None = field(
        default=None, metadata={"help": "Token heat map file. Defaults to <output_dir>/token_rewards.html."}
    )
    num_heatmap_examples: int = field(default=4, metadata={"help": "Examples shown in the heat map (0: none)."})


# ModelConfig fields configuring PEFT: the estimator has its own LoRA fields, and argparse refuses duplicate flags.
_PEFT_FIELDS = ("use_peft", "use_rslora", "use_dora")


def _model_arguments_class():
    """TRL's ModelConfig without its PEFT fields, as a dataclass the parser accepts next to WeightEstimatorConfig."""
    from trl import ModelConfig

    hints = typing.get_type_hints(ModelConfig)
    fields = []
    for f in dataclasses.fields(ModelConfig):
        if f.name in _PEFT_FIELDS or f.name.startswith("lora_"):
            continue
        default = {"default": f.default} if f.default is not dataclasses.MISSING else {}
        if f.default_factory is not dataclasses.MISSING:
            default = {"default_factory": f.default_factory}
        fields.append((f.name, hints[f.name], field(metadata=f.metadata, **default)))
    return dataclasses.make_dataclass("ModelArguments", fields)


def _kbit_device_map(state):
    """A quantized model is placed whole on this process's device (it cannot be moved after loading)."""
    import torch

    return {"": state.local_process_index} if torch.cuda.is_available() else {"": "cpu"}


def check_inputs(script_args, model_args, estimator_args, output_args):
    """What can be checked before any process starts and any model loads: the model path and every row of the data,
    which is returned."""
    from trl_tokenpo.scripts.utils import check_model_path, load_user_datasets

    check_model_path(model_args.model_name_or_path, model_args.model_revision)
    dataset, _ = load_user_datasets(script_args, None, with_eval=False)
    return dataset


def main(script_args, model_args, estimator_args, output_args):
    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import ModelConfig, get_quantization_config

    from trl_tokenpo.estimator import ContrastiveWeightEstimator
    from trl_tokenpo.viz import examples_from_dataset, save_token_heatmap

    dataset = check_inputs(script_args, model_args, estimator_args, output_args)
    model_config = ModelConfig(**dataclasses.asdict(model_args))
    quantization_config = get_quantization_config(model_config)
    dtype = model_config.dtype
    if dtype not in ("auto", None):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_config.model_name_or_path,
        revision=model_config.model_revision,
        attn_implementation=model_config.attn_implementation,
        dtype=dtype,
        quantization_config=quantization_config,
        device_map=_kbit_device_map(PartialState()) if quantization_config is not None else None,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_config.model_name_or_path, revision=model_config.model_revision)

    estimator = ContrastiveWeightEstimator(model, tokenizer, args=estimator_args)
    weighted = estimator.estimate(dataset)

    state = estimator.state
    dataset_path = output_args.weighted_dataset_path or os.path.join(estimator_args.output_dir, "weighted_dataset")
    heatmap_path = output_args.heatmap_path or os.path.join(estimator_args.output_dir, "token_rewards.html")
    if state.is_main_process:
        weighted.save_to_disk(dataset_path)
        print(f"Weighted dataset ({len(weighted)} rows, columns {weighted.column_names}) saved to {dataset_path}")
        count = min(output_args.num_heatmap_examples, len(weighted))
        if count > 0:
            shown = estimator.tokenize(weighted.select(range(count)))  # adds the trainer's token ids: exact alignment
            examples = examples_from_dataset(shown, tokenizer, "token_rewards", num_examples=count)
            title = f"Token rewards r_t = log pi_plus - log pi_minus ({estimator_args.method} method)"
            save_token_heatmap(examples, heatmap_path, title=title)
            print(f"Token reward heat map of {count} examples written to {heatmap_path}")
        stats = estimator.stats
        print(
            f"Adapters: {estimator.adapter_paths or 'none (prompt method)'}; score cache: {stats.cache_dir} "
            f"({'hit' if stats.cache_hit else 'computed'})"
        )
    state.wait_for_everyone()


def make_parser(prog=None):
    from trl import ScriptArguments

    from trl_tokenpo.estimator import WeightEstimatorConfig
    from trl_tokenpo.scripts.utils import command_parser

    return command_parser(
        (ScriptArguments, _model_arguments_class(), WeightEstimatorConfig, EstimateOutputArguments), prog, OWN_OPTIONS
    )


def build_parser(argv, prog=None):
    """The parser (no built-in task here)."""
    return make_parser(prog), False


def parse(argv, prog=None, launcher_options=()):
    """The parsed arguments (the four dataclasses), and what is left for `accelerate launch`."""
    from trl_tokenpo.errors import InputError
    from trl_tokenpo.scripts.utils import parse_command_line

    args, launch_args = parse_command_line(make_parser(prog), argv, prog, ALIASES, launcher_options)
    if args[1].model_name_or_path is None or args[0].dataset_name is None:
        raise InputError("--model_name_or_path and --dataset_name are required: the model to fit and the pairs to score.")
    return tuple(args[:4]), launch_args


def run(argv=None, prog=None) -> int:
    from trl_tokenpo.scripts.utils import run_command

    return run_command(sys.modules[__name__], argv, prog)


if __name__ == "__main__":
    raise SystemExit(run())
