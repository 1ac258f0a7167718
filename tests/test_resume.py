"""Resume: a run stopped after k steps (same schedule, as a preempted job) and resumed from its checkpoint ends with the
same parameters and logs the same metrics, step by step, as the uninterrupted run; for TDPO and TIS-DPO.

The stop is mid-epoch (8 rows, 2 per step: 4 steps per epoch, stopped after step 3), so the resumed run must also skip
the batches of the current epoch that were already seen, and the learning-rate schedule (linear decay) and the
optimizer (Adam) states must be restored.
"""

import math

import pytest
import torch
from conftest import cpu_args, preference_rows
from datasets import Dataset
from test_tdpo import StopAt

from trl_tokenpo import TDPOConfig, TDPOTrainer, TISDPOConfig, TISDPOTrainer
from trl_tokenpo.data import tokenize_preference_dataset


MAX_STEPS, STOP = 6, 3
# Entries of the log history that measure wall-clock time, not training
TIMING_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss"}


def make(method, model_dir, tokenizer, out, **overrides):
    dataset = Dataset.from_list(preference_rows(8))
    options = dict(
        max_steps=MAX_STEPS, per_device_train_batch_size=2, save_strategy="steps", save_steps=STOP, learning_rate=1e-2,
        lr_scheduler_type="linear", beta=0.5, **overrides,
    )  # fmt: skip
    if method == "tdpo":
        return TDPOTrainer(model=model_dir, args=cpu_args(TDPOConfig, out, **options), train_dataset=dataset)
    ids = tokenize_preference_dataset(dataset, tokenizer)
    gen = torch.Generator().manual_seed(0)
    for side in ("chosen", "rejected"):
        values = [(0.2 + 2 * torch.rand(len(x), generator=gen)).tolist() for x in ids[f"{side}_ids"]]
        dataset = dataset.add_column(f"{side}_weights", values)
    args = cpu_args(TISDPOConfig, out, tis_kl_term=method.split("_")[1], **options)
    return TISDPOTrainer(model=model_dir, args=args, train_dataset=dataset)


def step_logs(trainer):
    return [{k: v for k, v in e.items() if k not in TIMING_KEYS} for e in trainer.state.log_history if "loss" in e]


@pytest.mark.parametrize("method", ["tdpo", "tisdpo_none", "tisdpo_tdpo"])
def test_resume_gives_the_same_parameters_and_metrics(tmp_path, tiny_model_dir, tokenizer, method):
    straight = make(method, tiny_model_dir, tokenizer, tmp_path / "straight")
    straight.train()

    interrupted = make(method, tiny_model_dir, tokenizer, tmp_path / "resumed")
    interrupted.add_callback(StopAt(STOP))
    interrupted.train()
    assert interrupted.state.global_step == STOP
    resumed = make(method, tiny_model_dir, tokenizer, tmp_path / "resumed")
    # `True` (the last checkpoint of output_dir) and an explicit path both restore everything
    checkpoint = True if method == "tisdpo_none" else str(tmp_path / "resumed" / f"checkpoint-{STOP}")
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.state.global_step == MAX_STEPS

    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")

    want = step_logs(straight)
    # the resumed trainer's history: steps 1..STOP come from the checkpoint, the rest were logged after resuming
    got = step_logs(resumed)
    assert [e["step"] for e in got] == [e["step"] for e in want] == list(range(1, MAX_STEPS + 1))
    expected = {"loss", "learning_rate", "grad_norm", "rewards/margins", "logps/chosen", "num_tokens", "entropy"}
    expected |= {"kl/chosen"} if method != "tisdpo_none" else {"weights/chosen_mean"}
    for w, g in zip(want, got):
        assert expected <= set(w) and set(g) == set(w), (set(w) ^ set(g), expected - set(w))
        for key, value in w.items():
            assert math.isfinite(value), key
            assert math.isclose(g[key], value, rel_tol=1e-5, abs_tol=1e-6), f"step {w['step']} {key}: {g[key]} != {value}"
