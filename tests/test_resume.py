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


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints cut off while being saved, and damaged counters
# ----------------------------------------------------------------------------------------------------------------------


class Killed(Exception):
    """Stands for the process being killed at that point."""


@pytest.fixture(scope="module")
def straight_tdpo(tmp_path_factory, tiny_model_dir):
    trainer = make("tdpo", tiny_model_dir, None, tmp_path_factory.mktemp("straight"))
    trainer.train()
    return trainer


def kill_when_saving(monkeypatch, what, step):
    """Make the save of `checkpoint-<step>` stop at `what`: 'optimizer' (before the optimizer state, so the checkpoint
    has its weights but no trainer_state.json) or 'after_state' (right after trainer_state.json is written)."""
    from transformers import Trainer, TrainerState

    if what == "optimizer":
        save = Trainer._save_optimizer_and_scheduler

        def patched(self, output_dir):
            if output_dir.endswith(f"checkpoint-{step}"):
                raise Killed(output_dir)
            save(self, output_dir)

        monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", patched)
    else:
        save = TrainerState.save_to_json

        def patched(self, json_path):
            save(self, json_path)
            if f"checkpoint-{step}" in json_path:
                raise Killed(json_path)

        monkeypatch.setattr(TrainerState, "save_to_json", patched)


def warnings_of(caplog):
    return "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_resume_true_skips_a_checkpoint_cut_off_while_saving(tmp_path, tiny_model_dir, straight_tdpo, monkeypatch, caplog):
    out = tmp_path / "run"
    killed = make("tdpo", tiny_model_dir, None, out)
    with monkeypatch.context() as m:
        kill_when_saving(m, "optimizer", MAX_STEPS)
        with pytest.raises(Killed):
            killed.train()
    partial = out / f"checkpoint-{MAX_STEPS}"
    assert partial.is_dir() and not (partial / "trainer_state.json").exists()
    assert (out / f"checkpoint-{STOP}" / "trainer_state.json").is_file()

    # named explicitly, the partial checkpoint is refused with the way out
    with pytest.raises(ValueError, match=rf"checkpoint-{MAX_STEPS}: it has no trainer_state.json.*checkpoint-{STOP}"):
        make("tdpo", tiny_model_dir, None, out).train(resume_from_checkpoint=str(partial))

    resumed = make("tdpo", tiny_model_dir, None, out)
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=True)
    assert f"Skipping incomplete checkpoint {partial}: it has no trainer_state.json" in warnings_of(caplog)
    assert resumed.state.global_step == MAX_STEPS
    for (name, a), (_, b) in zip(straight_tdpo.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert [e["num_tokens"] for e in step_logs(resumed)] == [e["num_tokens"] for e in step_logs(straight_tdpo)]


@pytest.mark.parametrize("damage", ["killed_after_trainer_state", "missing", "empty"])
def test_token_counter_survives_a_cut_off_save_or_is_restored_with_a_warning(
    tmp_path, tiny_model_dir, straight_tdpo, monkeypatch, caplog, damage
):
    out = tmp_path / "run"
    interrupted = make("tdpo", tiny_model_dir, None, out)
    with monkeypatch.context() as m:
        if damage == "killed_after_trainer_state":
            # the checkpoint counts as complete as soon as trainer_state.json exists: the counters must be there by then
            kill_when_saving(m, "after_state", STOP)
            with pytest.raises(Killed):
                interrupted.train()
        else:
            interrupted.add_callback(StopAt(STOP))
            interrupted.train()
    counters = out / f"checkpoint-{STOP}" / "token_level_trainer_counters.json"
    assert counters.is_file()
    if damage == "missing":
        counters.unlink()
    elif damage == "empty":
        counters.write_text("")

    resumed = make("tdpo", tiny_model_dir, None, out)
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=True)
    want = [e["num_tokens"] for e in step_logs(straight_tdpo)]
    assert [e["num_tokens"] for e in step_logs(resumed)] == want
    warned = warnings_of(caplog)
    if damage == "killed_after_trainer_state":
        assert "token_level_trainer_counters" not in warned
    else:
        problem = "has no" if damage == "missing" else "has an unreadable"
        assert f"checkpoint-{STOP} {problem} token_level_trainer_counters.json" in warned
        # logging_steps=1: the last logged value is the counter at the checkpoint's step
        assert f"continues from its last logged value, {want[STOP - 1]:.0f} (step {STOP})" in warned
