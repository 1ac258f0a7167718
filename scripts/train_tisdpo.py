# Copyright 2026 The trl-tokenpo developers. Licensed under the Apache License, Version 2.0.
"""
The whole TIS-DPO pipeline: estimate token weights with a contrastive pair of LoRA adapters, then train with
`TISDPOTrainer`. It is TRL's `dpo.py` script with `TISDPOTrainer` / `TISDPOConfig` and an estimation step.

Without `--model_name_or_path` / `--dataset_name` it runs on the built-in synthetic task (no network), prints the
oracle reward and KL to the reference of sampled responses before and after training, and writes a heat map of the
estimated token rewards:

```bash
accelerate launch scripts/train_tisdpo.py
```

On your model and data (any TRL preference dataset), with LoRA:

```bash
accelerate launch scripts/train_tisdpo.py \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
    --dataset_name trl-lib/ultrafeedback_binarized \
    --weights_method dpo --estimator_learning_rate 5e-5 \
    --tis_kl_term none --beta 0.1 \
    --learning_rate 5.0e-6 --per_device_train_batch_size 2 --gradient_accumulation_steps 8 \
    --use_peft --lora_r 32 --lora_alpha 16 \
    --output_dir Qwen2.5-0.5B-TISDPO
```

`--weights_method given` skips the estimation when the dataset already carries `chosen_token_rewards` /
`rejected_token_rewards` (e.g. from `scripts/estimate_weights.py`) or `chosen_weights` / `rejected_weights`.
"""

import os
from dataclasses import dataclass, field


@dataclass
class EstimatorArguments:
    """How the token weights are obtained (the most used `WeightEstimatorConfig` fields; `--estimator_config` takes a
    YAML file with any of its fields for full control).

    Parameters:
        weights_method (`str`, defaults to `"dpo"`): `"dpo"`, `"sft"` or `"prompt"` (estimator methods), or `"given"`
            (the dataset already has per-token columns).
        estimator_learning_rate (`float`, *optional*): learning rate of the adapters (estimator default if unset).
        estimator_num_train_epochs (`float`, *optional*): epochs per adapter (estimator default if unset).
        estimator_beta (`float`, defaults to `0.1`): DPO temperature of the `"dpo"` method's adapters.
        estimator_lora_r (`int`, defaults to `16`): LoRA rank of the adapters.
        estimator_output_dir (`str`, *optional*): where adapters and the score cache go (default
            `<output_dir>/estimator`).
        estimator_config (`str`, *optional*): YAML file of `WeightEstimatorConfig` fields, applied over the above.
        heatmap_examples (`int`, defaults to `3`): training examples drawn in the token-reward heat map.
    """

    weights_method: str = field(
        default="dpo",
        metadata={"help": "Token weights: 'dpo', 'sft', 'prompt' (estimated) or 'given' (dataset columns).",
                  "choices": ["dpo", "sft", "prompt", "given"]},
    )  # fmt: skip
    estimator_learning_rate: float | None = field(default=None, metadata={"help": "Learning rate of the adapters."})
    estimator_num_train_epochs: float | None = field(default=None, metadata={"help": "Epochs per adapter."})
    estimator_beta: float = field(default=0.1, metadata={"help": "DPO temperature of the 'dpo' method's adapters."})
    estimator_lora_r: int = field(default=16, metadata={"help": "LoRA rank of the adapters."})
    estimator_output_dir: str | None = field(
        default=None, metadata={"help": "Adapters and score cache directory (default <output_dir>/estimator)."}
    )
    estimator_config: str | None = field(
        default=None, metadata={"help": "YAML file of WeightEstimatorConfig fields applied over these flags."}
    )
    heatmap_examples: int = field(default=3, metadata={"help": "Training examples drawn in the heat map."})


# Estimator settings of the built-in task. Its model is tiny, so the adapters need a larger learning rate than the
# estimator's defaults (which target 0.5B+ models and leave the rewards near 0 here). SFT-based weights rather than
# the paper's DPO-based ones: on this task the DPO-trained pair is noisy on neutral words and TIS-DPO with its weights
# drifts further from the reference than DPO (docs/benchmarks.md, Quality), while SFT-based weights separate the good
# and bad words best (token AUROC 0.99). Any flag still overrides these.
BUILTIN_ESTIMATOR_DEFAULTS = dict(weights_method="sft", estimator_learning_rate=3e-3, estimator_num_train_epochs=3)


def estimator_config(est_args, training_args):
    """The `WeightEstimatorConfig` of the estimation step, sharing precision and seed with the trainer."""
    import yaml

    from trl_tokenpo import WeightEstimatorConfig

    kwargs = dict(
        output_dir=est_args.estimator_output_dir or os.path.join(training_args.output_dir, "estimator"),
        method=est_args.weights_method,
        beta=est_args.estimator_beta,
        lora_r=est_args.estimator_lora_r,
        lora_alpha=2 * est_args.estimator_lora_r,
        learning_rate=est_args.estimator_learning_rate,
        num_train_epochs=est_args.estimator_num_train_epochs,
        per_device_train_batch_size=training_args.per_device_train_batch_size,
        use_cpu=training_args.use_cpu,
        bf16=training_args.bf16,
        seed=training_args.seed,
        report_to="none",
        disable_tqdm=training_args.disable_tqdm,
    )
    if est_args.estimator_config:
        with open(est_args.estimator_config) as f:
            kwargs.update(yaml.safe_load(f) or {})
    return WeightEstimatorConfig(**kwargs)


def main(script_args, training_args, model_args, dataset_args, task_args, est_args, builtin):
    from trl import get_peft_config, get_quantization_config
    from trl.trainer.utils import create_model_from_path

    from trl_tokenpo import ContrastiveWeightEstimator, TISDPOTrainer
    from trl_tokenpo.cli import load_model_and_data, train_and_report
    from trl_tokenpo.viz import examples_from_dataset, save_token_heatmap

    task, model, train_dataset, eval_dataset = load_model_and_data(
        script_args, training_args, model_args, dataset_args, task_args, builtin
    )

    # 1. Token rewards from the contrastive pair (cached: a second run with the same inputs returns at once)
    if est_args.weights_method != "given":
        init_kwargs = dict(training_args.model_init_kwargs)
        if get_quantization_config(model_args) is not None:
            init_kwargs["quantization_config"] = get_quantization_config(model_args)
        estimator = ContrastiveWeightEstimator(
            create_model_from_path(model, **init_kwargs), args=estimator_config(est_args, training_args)
        )
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
        for extension in ("html", "png"):
            path = os.path.join(training_args.output_dir, f"token_{column}.{extension}")
            title = "Estimated token rewards (green: the contrastive pair prefers the token)" if column == "token_rewards" else "Token weights"
            save_token_heatmap(
                examples, path, title=title, value_name=column.replace("_", " "), center=0.0 if column == "token_rewards" else 1.0
            )
        print(f"Heat map of the {column.replace('_', ' ')}: {os.path.join(training_args.output_dir, f'token_{column}.html')}")

    train_and_report(trainer, training_args, script_args, task, task_args)


def make_parser(prog=None):
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from trl_tokenpo import TISDPOConfig
    from trl_tokenpo.cli import BuiltinTaskArguments

    return TrlParser(
        (ScriptArguments, TISDPOConfig, ModelConfig, DatasetMixtureConfig, BuiltinTaskArguments, EstimatorArguments),
        prog=prog,
    )


if __name__ == "__main__":
    from trl_tokenpo.cli import apply_parser_defaults

    parser = make_parser()
    builtin = apply_parser_defaults(parser)
    if builtin:
        parser.set_defaults(**BUILTIN_ESTIMATOR_DEFAULTS)
    args = parser.parse_args_and_config(fail_with_unknown_args=False)
    main(*args[:6], builtin=builtin)
