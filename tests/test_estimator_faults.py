"""Regression tests of the estimator's fault probes (issue 13): stale rewards after a weight change, unverified saved
adapters, concurrent estimators on one cache directory, `max_length` shorter than the prompts, a read-only cache,
leftover staging directories. Each test failed on the estimator before the redesign.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from conftest import build_model, build_tokenizer, cpu_args, preference_rows
from datasets import Dataset


REWARDS = ("chosen_token_rewards", "rejected_token_rewards")

pytestmark = pytest.mark.usefixtures("one_thread")


def estimator_args(output_dir, **kwargs):
    from trl_tokenpo.estimator import WeightEstimatorConfig

    defaults = dict(
        method="prompt", max_steps=-1, num_train_epochs=1, per_device_train_batch_size=4, logging_steps=1000,
        lora_r=4, lora_alpha=8, lora_dropout=0.0, cache_shard_size=3, scoring_batch_size=2, learning_rate=5e-2,
    )  # fmt: skip
    defaults.update(kwargs)
    return cpu_args(WeightEstimatorConfig, output_dir, **defaults)


def rewards(dataset):
    return dataset.select_columns(list(REWARDS)).to_dict()


def estimator(model, tokenizer, output_dir, **kwargs):
    from trl_tokenpo.estimator import ContrastiveWeightEstimator

    return ContrastiveWeightEstimator(model, tokenizer, estimator_args(output_dir, **kwargs))


# -------------------------------------------------------------------------------------------------------------------
# 1. A weight change on the same estimator is seen (it was a cache hit with the old weights' rewards)


@pytest.mark.parametrize("change", ["load_state_dict_assign", "new_parameter", "to_float16"])
def test_a_weight_change_on_the_same_estimator_is_not_a_cache_hit(change, tmp_path):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=3)
    dataset = Dataset.from_list(preference_rows(4))
    same = estimator(model, tokenizer, tmp_path / "same")
    before = rewards(same.estimate(dataset))
    if change == "load_state_dict_assign":
        model.load_state_dict(build_model(tokenizer, seed=4).state_dict(), assign=True)
    elif change == "new_parameter":
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 3.0)
    else:
        model.to(torch.float16)
    after = rewards(same.estimate(dataset))
    assert not same.stats["cache_hit"]
    fresh = rewards(estimator(model, tokenizer, tmp_path / "fresh").estimate(dataset))
    assert after == fresh and after != before


# -------------------------------------------------------------------------------------------------------------------
# 2. Saved adapters are verified: a damaged file is trained again (it was reused silently, or gave a raw error)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    out = tmp_path_factory.mktemp("fitted-adapters")
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=3)
    dataset = Dataset.from_list(preference_rows(4))
    result = estimator(model, tokenizer, out, method="dpo", max_steps=1).estimate(dataset)
    return out, tokenizer, model, dataset, rewards(result)


def _plus_dir(output_dir: Path) -> Path:
    (plus,) = output_dir.glob("adapters/*/plus")
    return plus


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete_weights", "garbage_config"])
def test_a_damaged_saved_adapter_is_trained_again(damage, fitted, tmp_path, caplog):
    out, tokenizer, model, dataset, expected = fitted
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    plus = _plus_dir(copy)
    weights = plus / "adapter_model.safetensors"
    if damage == "flip_byte":
        data = bytearray(weights.read_bytes())
        data[-7] ^= 0x01
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "delete_weights":
        weights.unlink()
    else:
        (plus / "adapter_config.json").write_text("{ not json")
    again = estimator(model, tokenizer, copy, method="dpo", max_steps=1)
    with caplog.at_level(logging.WARNING):
        result = again.estimate(dataset)
    assert again.stats["trained_adapters"] == ["plus"]
    assert "cannot be reused" in caplog.text and "plus" in caplog.text
    torch.testing.assert_close(rewards(result), expected, rtol=0, atol=1e-6)  # training is deterministic


def test_leftover_staging_directories_of_killed_runs_are_removed(fitted, tmp_path):
    out, tokenizer, model, dataset, _ = fitted
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = _plus_dir(copy).parent / f".plus.{dead.pid}.tmp"
    leftover.mkdir()
    (leftover / "adapter_model.safetensors").write_bytes(b"partial")
    again = estimator(model, tokenizer, copy, method="dpo", max_steps=1)
    again.fit(dataset)
    assert again.stats["trained_adapters"] == [] and not leftover.exists()


# -------------------------------------------------------------------------------------------------------------------
# 3. Concurrent estimators on one cache directory all succeed with identical results (one crashed)


def _worker(model, tokenizer, spec: dict, index: int) -> None:
    """One estimator process (forked: the model and the libraries are already loaded)."""
    try:
        torch.set_num_threads(1)
        est = estimator(
            model, tokenizer, spec["root"] / f"out{index}", cache_dir=str(spec["root"] / "shared-cache"),
            cache_shard_size=spec["shard_size"], scoring_batch_size=16, disable_tqdm=True,
        )  # fmt: skip
        dataset = Dataset.from_list(preference_rows(spec["rows"]))
        spec["ready"].wait(timeout=600)  # start together, so that the processes fill the store at the same time
        result = rewards(est.estimate(dataset))
        (spec["root"] / f"result{index}.json").write_text(json.dumps(result))
    except BaseException:
        (spec["root"] / f"error{index}.txt").write_text(traceback.format_exc())
        raise


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="forks the test process to start the estimators quickly")
@pytest.mark.parametrize("processes, num_rows, shard_size", [(2, 256, 64), (4, 64, 1)])
def test_concurrent_estimators_on_one_cache_dir_all_succeed(processes, num_rows, shard_size, tmp_path):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=3)
    context = multiprocessing.get_context("fork")
    spec = {"root": tmp_path, "rows": num_rows, "shard_size": shard_size, "ready": context.Barrier(processes)}
    workers = [context.Process(target=_worker, args=(model, tokenizer, spec, i)) for i in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=900)
    errors = [p.read_text()[-2000:] for p in sorted(tmp_path.glob("error*.txt"))]
    assert [w.exitcode for w in workers] == [0] * processes, errors
    results = [json.loads((tmp_path / f"result{i}.json").read_text()) for i in range(processes)]
    assert all(r == results[0] for r in results[1:])
    assert len(results[0]["chosen_token_rewards"]) == num_rows


# -------------------------------------------------------------------------------------------------------------------
# 4. max_length shorter than the prompts: adapter training cuts the context on the left, as scoring does


LONG_PROMPT = "what is the sky and why is the cat rude and how are you and where is the dog ?"


@pytest.mark.parametrize("method, long_prompts", [("sft", "all"), ("dpo", "all"), ("dpo", "some")])
def test_adapter_training_cuts_long_prompts_on_the_left_and_logs_it(method, long_prompts, tmp_path, caplog, monkeypatch):
    from trl import DPOTrainer, SFTTrainer

    trained_rows = []
    for trainer_class in (DPOTrainer, SFTTrainer):
        original = trainer_class.train

        def spy(self, *args, _original=original, **kwargs):
            trained_rows.append(len(self.train_dataset))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(trainer_class, "train", spy)
    rows = preference_rows(6)
    for i, row in enumerate(rows):
        if long_prompts == "all" or i % 2 == 0:
            row["prompt"] = LONG_PROMPT
    dataset = Dataset.from_list(rows)
    tokenizer = build_tokenizer()
    est = estimator(build_model(tokenizer, seed=3), tokenizer, tmp_path, method=method, max_steps=1, max_length=16)
    with caplog.at_level(logging.WARNING):
        result = est.estimate(dataset)
    assert trained_rows == [6, 6]  # both adapters trained on every row
    long_rows = sum(r["prompt"] == LONG_PROMPT for r in rows)
    message = next(m for m in caplog.messages if m.startswith("Adapter training (max_length=16)"))
    assert f"{2 * long_rows} sequences had their context cut on the left" in message
    ids = est.tokenize(dataset)
    for side in ("chosen", "rejected"):
        assert [len(r) for r in result[f"{side}_token_rewards"]] == [len(x) for x in ids[f"{side}_ids"]]


# -------------------------------------------------------------------------------------------------------------------
# 5. A complete cache in a read-only directory is a cache hit (every call rewrote request.json)

_READ_ONLY_ROOTS: list[str] = []
_WRITE_EVENTS = ("os.rename", "os.replace", "os.remove", "os.unlink", "os.rmdir", "os.mkdir", "shutil.rmtree",
                 "os.truncate", "os.chmod", "os.utime", "os.symlink", "os.link")  # fmt: skip


def _refuse_writes(event: str, args: tuple) -> None:
    """An audit hook simulating a read-only file system under the paths of `_READ_ONLY_ROOTS` (the tests run as root,
    for whom permission bits do not stop writes)."""
    if not _READ_ONLY_ROOTS:
        return
    if event == "open":
        writes = args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) if args[2] else 0
        paths = [args[0]] if writes else []
    elif event in _WRITE_EVENTS:
        paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
    else:
        return
    for path in paths:
        if isinstance(path, (str, os.PathLike)) and any(
            os.path.abspath(os.fspath(path)).startswith(root) for root in _READ_ONLY_ROOTS
        ):
            raise OSError(30, "Read-only file system (simulated)", os.fspath(path))


def test_a_complete_cache_in_a_read_only_directory_is_a_cache_hit(tmp_path):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=3)
    dataset = Dataset.from_list(preference_rows(5))
    first = rewards(estimator(model, tokenizer, tmp_path / "a", cache_dir=str(tmp_path / "cache")).estimate(dataset))
    sys.addaudithook(_refuse_writes)
    _READ_ONLY_ROOTS.append(os.path.abspath(tmp_path / "cache"))
    try:
        with pytest.raises(OSError, match="Read-only"):  # the simulation works
            (tmp_path / "cache" / "probe").write_text("x")
        again = estimator(model, tokenizer, tmp_path / "b", cache_dir=str(tmp_path / "cache"))
        second = rewards(again.estimate(dataset))
    finally:
        _READ_ONLY_ROOTS.clear()
    assert again.stats["cache_hit"] and second == first


# -------------------------------------------------------------------------------------------------------------------
# Issue 16: say why saved adapters are not reused; report how well the rewards separate chosen from rejected


def test_before_training_the_log_says_what_differs_from_the_closest_saved_fit(fitted, tmp_path, caplog):
    out, tokenizer, model, dataset, _ = fitted
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    other = estimator(model, tokenizer, copy, method="dpo", max_steps=1, seed=7, learning_rate=1e-2)
    with caplog.at_level(logging.WARNING):
        other.fit(dataset)
    message = next(m for m in caplog.messages if "closest saved fit" in m)
    assert "differs in 2 field(s): training.learning_rate: 0.05 -> 0.01; training.seed: 0 -> 7" in message


def test_the_separation_of_chosen_and_rejected_is_reported_and_warned_about(fitted, tmp_path, caplog):
    from trl_tokenpo.estimator import Separation
    from trl_tokenpo.estimator.scoring import separation

    result = separation([[1.0, 0.5], [0.0], [2.0]], [[-1.0], [0.0], [1.0, 0.5]])
    assert result == Separation(3, 3.5 / 4, 0.5 / 4, (1 + 0.5 + 1) / 3, False)  # 0.83 < 0.5 + 1/sqrt(3)
    assert separation([[1.0]] * 16, [[0.0]] * 16).separated
    out, tokenizer, model, dataset, _ = fitted
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    prompt = estimator(model, tokenizer, tmp_path / "prompt")  # the tiny model never learned the system prompts
    with caplog.at_level(logging.WARNING):
        scored = prompt.estimate(dataset)
    stats = prompt.stats.separation
    assert stats.num_pairs == 4 and not stats.separated
    assert "do not separate chosen from rejected" in caplog.text
    chosen = [x for row in scored["chosen_token_rewards"] for x in row]
    assert abs(stats.mean_reward_chosen - sum(chosen) / len(chosen)) < 1e-6
    again = estimator(model, tokenizer, copy, method="dpo", max_steps=1)
    again.estimate(dataset)  # a cache hit reports it too
    assert again.stats.cache_hit and again.stats.separation.num_pairs == 4
