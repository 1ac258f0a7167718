# Copyright 2026 The trl-tokenpo developers. Licensed under the Apache License, Version 2.0.
"""
Count the host-device synchronizations of one training step, per trainer, side by side with trl.DPOTrainer.

On CUDA, every read of a tensor value by the host (`.item()`, `bool(t)`, `nonzero`, a boolean-mask index,
`torch.equal`, ...) waits for the GPU to finish what is queued. This script counts, on CPU, the aten ops that would
synchronize on CUDA and the Python-level reads (`Tensor.item/tolist/cpu/numpy`), with the counter of
`tests/host_sync.py`, during one LoRA training step (the 2nd of 3) of a tiny model: inside `compute_loss` (forward,
loss, metrics: before the backward is queued), in the whole optimizer step, and in the whole 3-step run (logging
included; the collator, which builds batches from CPU tensors on the host, is not counted). `tests/test_sync_free.py` asserts the same numbers.

```bash
.venv/bin/python scripts/count_syncs.py            # a markdown table
.venv/bin/python scripts/count_syncs.py --sites    # and where each sync comes from
```
"""

import argparse
import contextlib
import os
import sys
import tempfile


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", action="store_true", help="list the origin of every counted sync per trainer")
    args = parser.parse_args()

    import conftest  # noqa: F401  (offline settings, torch threads)
    import torch
    from conftest import build_model, build_tokenizer, cpu_args, preference_rows
    from datasets import Dataset
    from host_sync import count_step_syncs
    from peft import LoraConfig
    from test_sync_free import LORA, VARIANTS, lora_trainer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = build_tokenizer()
        model_dir = os.path.join(folder, "model")
        build_model(tokenizer).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        dpo = DPOTrainer(
            model=model_dir, args=cpu_args(DPOConfig, os.path.join(folder, "dpo"), max_steps=3, logging_steps=3),
            train_dataset=Dataset.from_list(preference_rows(16)), processing_class=tokenizer,
            peft_config=LoraConfig(**LORA),
        )  # fmt: skip
        trainers = {"trl.DPOTrainer": dpo}
        for name in VARIANTS:
            trainers[name] = lora_trainer(model_dir, os.path.join(folder, name), name)
        for name, trainer in trainers.items():
            with contextlib.redirect_stdout(sys.stderr):  # the trainers print their logs
                counter = count_step_syncs(trainer, steps=(2,))
            rows.append((name, counter))
            print(f"counted {name}", file=sys.stderr)

    print("| trainer | in compute_loss | per optimizer step | whole run (3 steps, one log; collation not counted) |")
    print("|---|---:|---:|---:|")
    for name, counter in rows:
        c = counter.counts
        print(f"| {name} | {c['compute_loss']} | {c['step']} | {c['train']} |")
    if args.sites:
        for name, counter in rows:
            print(f"\n{name}, one optimizer step:\n{counter.report('step') or '  (none)'}")


if __name__ == "__main__":
    main()
