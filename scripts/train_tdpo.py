# Copyright 2026 The trl-tokenpo developers. Licensed under the Apache License, Version 2.0.
"""
Train with TDPO: TRL's `dpo.py` script with `TDPOTrainer` / `TDPOConfig`.

Without `--model_name_or_path` / `--dataset_name` it runs on the built-in synthetic task (no network) and prints the
oracle reward and KL to the reference of sampled responses before and after training:

```bash
accelerate launch scripts/train_tdpo.py
```

On your model and data (any TRL preference dataset), with LoRA:

```bash
accelerate launch scripts/train_tdpo.py \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
    --dataset_name trl-lib/ultrafeedback_binarized \
    --tdpo_variant tdpo2 --alpha 0.5 --beta 0.1 \
    --learning_rate 5.0e-6 --per_device_train_batch_size 2 --gradient_accumulation_steps 8 \
    --use_peft --lora_r 32 --lora_alpha 16 \
    --output_dir Qwen2.5-0.5B-TDPO
```
"""



def main(script_args, training_args, model_args, dataset_args, task_args, builtin):
    from trl import get_peft_config, get_quantization_config

    from trl_tokenpo import TDPOTrainer
    from trl_tokenpo.cli import load_model_and_data, train_and_report

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
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from trl_tokenpo import TDPOConfig
    from trl_tokenpo.cli import BuiltinTaskArguments

    return TrlParser((ScriptArguments, TDPOConfig, ModelConfig, DatasetMixtureConfig, BuiltinTaskArguments), prog=prog)


if __name__ == "__main__":
    from trl_tokenpo.cli import apply_parser_defaults

    parser = make_parser()
    builtin = apply_parser_defaults(parser)
    args = parser.parse_args_and_config(fail_with_unknown_args=False)
    main(*args[:5], builtin=builtin)
