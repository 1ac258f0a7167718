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
    from trl_tokenpo.cli import (
        builtin_report,
        builtin_task,
        format_metrics,
        format_report,
        load_user_datasets,
        model_init_kwargs,
        policy_for_generation,
    )

    if builtin:
        task = builtin_task(task_args)
        model, train_dataset, eval_dataset = task.model.name_or_path, task.train_dataset, task.eval_dataset
        if training_args.eval_strategy == "no":
            eval_dataset = None
    else:
        model = model_args.model_name_or_path
        train_dataset, eval_dataset = load_user_datasets(script_args, dataset_args, training_args.eval_strategy != "no")
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)

    trainer = TDPOTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("Training completed.")
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")

    if builtin:
        if trainer.accelerator.is_main_process:
            rows = builtin_report(task, policy_for_generation(trainer), task_args)
            print("\nBuilt-in task: sampled responses on held-out prompts\n" + format_report(rows))
    elif eval_dataset is not None:
        trainer.accelerator.print("\nFinal evaluation\n" + format_metrics(trainer.evaluate()))
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.end()


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
