"""ContrastiveWeightEstimator: the pair (prompt / sft / dpo), token scores aligned with the trainer, the cache."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_model, build_tokenizer, cpu_args, preference_rows
from datasets import Dataset, load_from_disk

from trl_tokenpo.data import tokenize_preference_dataset
from trl_tokenpo.errors import InputError
from trl_tokenpo.estimator import (
    REF_COLUMNS,
    REWARD_COLUMNS,
    ContrastiveWeightEstimator,
    ShardedScoreCache,
    WeightEstimatorConfig,
    model_state,
    pair,
)
from trl_tokenpo.estimator import estimator as estimator_module


REPO = Path(__file__).resolve().parents[1]
SIDES = ("chosen", "rejected")


pytestmark = pytest.mark.usefixtures("one_thread")


def estimator_args(output_dir, **kwargs):
    defaults = dict(
        method="prompt",
        max_steps=-1,
        num_train_epochs=1,
        per_device_train_batch_size=4,
        logging_steps=1000,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        cache_shard_size=3,
        scoring_batch_size=2,
    )
    defaults.update(kwargs)
    return cpu_args(WeightEstimatorConfig, output_dir, **defaults)


def dense_logps(model, context, completion):
    """log p(completion | context) per token, from the full logits (independent of the fused head)."""
    ids = torch.tensor([list(context) + list(completion)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    logps = torch.log_softmax(logits[0, :-1], dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
    return logps[len(context) - 1 :]


def forbid(monkeypatch, *steps):
    """Make the named steps fail: "train" (adapter training), "score" (scoring a shard), "tokenize"."""

    def boom(*args, **kwargs):
        raise AssertionError("must not run (cache hit expected)")

    targets = {"train": (pair, "_train_adapter"), "score": (ContrastiveWeightEstimator, "_score_shard"),
               "tokenize": (ContrastiveWeightEstimator, "tokenize")}  # fmt: skip
    for step in steps:
        monkeypatch.setattr(*targets[step], boom)


def count_scored_shards(monkeypatch, fail_after: int | None = None):
    """The shards written to the score store, in order; with `fail_after`, a crash before writing the next one."""
    calls = []
    original = ShardedScoreCache.write_shard

    def wrapper(self, shard, columns):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt("simulated crash")
        calls.append(shard)
        return original(self, shard, columns)

    monkeypatch.setattr(ShardedScoreCache, "write_shard", wrapper)
    return calls


def rows(dataset, columns=REWARD_COLUMNS):
    return dataset.select_columns(list(columns)).to_dict()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tokenizer = build_tokenizer()
    path = tmp_path_factory.mktemp("tiny-estimator-model")
    build_model(tokenizer, seed=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def fitted_dpo(tiny, tmp_path_factory):
    """A DPO pair fitted on the small standard dataset (high learning rate so that the adapters differ visibly)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("fitted-dpo")
    model = AutoModelForCausalLM.from_pretrained(tiny)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    args = estimator_args(out, method="dpo", learning_rate=5e-2, include_ref_logps=True, num_train_epochs=2)
    estimator = ContrastiveWeightEstimator(model, tokenizer, args)
    dataset = Dataset.from_list(preference_rows(8))
    result = estimator.estimate(dataset)
    return estimator, dataset, result, before


# -------------------------------------------------------------------------------------------------------------------
# The estimated rewards separate good tokens from bad tokens (synthetic task with a known token reward)


def _auroc(positive, negative) -> float:
    p, n = np.asarray(positive)[:, None], np.asarray(negative)[None, :]
    return float((p > n).mean() + 0.5 * (p == n).mean())


# Measured on seeds 0 / 1 / 2 (128 pairs, 1 epoch): dpo 0.78 / 0.72 / 0.87, sft 0.86 / 0.81 / 0.92, prompt
# 0.50 / 0.58 / 0.46 (the tiny model never learned to condition on system prompts). The bar is below the worst seed.
AUROC_BAR = 0.65
METHOD_SETTINGS = {"dpo": {"learning_rate": 1e-3}, "sft": {"learning_rate": 3e-3}}


@pytest.fixture(scope="module")
def synthetic_task(tmp_path_factory):
    from trl_tokenpo.synthetic import SyntheticTaskConfig, build_task

    config = SyntheticTaskConfig(seed=0, num_train_pairs=128, num_eval_pairs=8, num_eval_prompts=4, warmup_steps=100)
    return build_task(config, cache_dir=tmp_path_factory.mktemp("synthetic"))


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_rewards_separate_good_from_bad_tokens(method, synthetic_task, tmp_path):
    task = synthetic_task
    args = estimator_args(
        tmp_path, method=method, per_device_train_batch_size=8, lora_r=16, lora_alpha=32, scoring_batch_size=32,
        cache_shard_size=256, **METHOD_SETTINGS[method],
    )  # fmt: skip
    result = ContrastiveWeightEstimator(task.model, task.tokenizer, args).estimate(task.train_dataset)
    ids = tokenize_preference_dataset(task.train_dataset, task.tokenizer)
    good, bad = [], []
    for side in SIDES:
        for token_ids, rewards in zip(ids[f"{side}_ids"], result[f"{side}_token_rewards"]):
            for token, reward in zip(task.tokenizer.convert_ids_to_tokens(token_ids), rewards):
                if token in task.oracle.good_words:
                    good.append(reward)
                elif token in task.oracle.bad_words:
                    bad.append(reward)
    assert len(good) > 100 and len(bad) > 100
    auroc = _auroc(good, bad)
    print(f"\n{method}: token AUROC good vs bad = {auroc:.3f}")
    assert auroc > AUROC_BAR


# -------------------------------------------------------------------------------------------------------------------
# Scores: exact values and alignment with the trainer


def test_dpo_scores_equal_a_dense_computation_and_leave_the_model_unchanged(fitted_dpo):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    estimator, dataset, result, before = fitted_dpo
    assert estimator.stats["trained_adapters"] == ["plus", "minus"]
    model = estimator.model
    # The base model is as it was: same parameter names, values and requires_grad, no patched forward.
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n].detach(), v) and after[n].requires_grad == g for n, (v, g) in before.items())
    assert "forward" not in model.__dict__

    tokenized = tokenize_preference_dataset(dataset, estimator.tokenizer)
    base = AutoModelForCausalLM.from_pretrained(model.config._name_or_path).eval()
    plus = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model.config._name_or_path), estimator.adapter_paths["plus"]
    ).eval()
    minus = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model.config._name_or_path), estimator.adapter_paths["minus"]
    ).eval()
    largest = 0.0
    for i, row in enumerate(tokenized):
        for side in SIDES:
            context, completion = row["prompt_ids"], row[f"{side}_ids"]
            expected = dense_logps(plus, context, completion) - dense_logps(minus, context, completion)
            got = torch.tensor(result[i][f"{side}_token_rewards"])
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
            ref = torch.tensor(result[i][f"{side}_ref_logps"])
            torch.testing.assert_close(ref, dense_logps(base, context, completion), atol=1e-5, rtol=1e-4)
            largest = max(largest, got.abs().max().item())
    assert largest > 1e-2  # the two adapters really differ


def test_swapping_the_adapters_negates_the_rewards(fitted_dpo, tmp_path):
    estimator, dataset, result, _ = fitted_dpo
    plus, minus = estimator.adapter_paths["plus"], estimator.adapter_paths["minus"]
    try:
        swapped = estimator.load_adapters(minus, plus).score(dataset)  # other adapter weights: a cache miss
        assert not estimator.stats["cache_hit"]
    finally:
        estimator.load_adapters(plus, minus)
    for column in REWARD_COLUMNS:
        for a, b in zip(result[column], swapped[column]):
            np.testing.assert_allclose(a, -np.asarray(b), atol=1e-6)


def test_the_three_adapter_paths_agree_and_restore_the_weights_exactly(fitted_dpo, tmp_path, monkeypatch):
    """Plain LoRA adapters are added to the float32 base weights for each pass without PEFT layers (the default); PEFT
    merged and PEFT unmerged adapters are the fallbacks. All three give the same scores, the weights come back bit
    for bit and the base fingerprint (hence the cache key) is kept."""
    from trl_tokenpo.fingerprint import fingerprint_base_model

    estimator, dataset, result, _ = fitted_dpo
    model = estimator.model
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    digest = estimator.base_model_fingerprint()
    used = []
    original = model_state.direct_lora_pair

    def spy(*args):
        pair = original(*args)
        used.append(pair is not None)
        return pair

    scores = {}
    for path in ("direct", "peft-merged", "peft-unmerged"):
        if path == "direct":
            monkeypatch.setattr(model_state, "direct_lora_pair", spy)
        else:
            monkeypatch.setattr(model_state, "direct_lora_pair", lambda *args: None)
        if path == "peft-unmerged":
            monkeypatch.setattr(model_state, "merge_backup", lambda peft_model: None)
        monkeypatch.setattr(estimator.args, "cache_dir", str(tmp_path / path))
        scores[path] = estimator.score(dataset)
        assert not estimator.stats["cache_hit"]
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[n], t) for n, t in before.items()), path
        assert estimator.base_model_fingerprint() == digest == fingerprint_base_model(model)
    assert used == [True]
    largest = 0.0
    for column in REWARD_COLUMNS + REF_COLUMNS:
        for a, b, c, d in zip(*(scores[p][column] for p in scores), result[column]):
            np.testing.assert_array_equal(a, b)  # the same merge arithmetic as PEFT's: bit-identical
            np.testing.assert_allclose(a, c, atol=1e-5, rtol=0)
            np.testing.assert_array_equal(a, d)
            largest = max(largest, float(np.abs(np.asarray(a)).max(initial=0.0)))
    assert largest > 1e-2


def test_merging_is_only_used_for_plain_float32_or_float16_lora_layers(tiny):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for dtype, expected in ((torch.float32, True), (torch.float16, True), (torch.bfloat16, False)):
        model = AutoModelForCausalLM.from_pretrained(tiny, dtype=dtype)
        peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=2, target_modules="all-linear"))
        backup = model_state.merge_backup(peft_model)
        assert (backup is not None) == expected
        if backup:
            assert all(saved.device.type == "cpu" and torch.equal(saved, p.cpu()) for p, saved in backup)


@pytest.mark.parametrize(
    "dtype, lora, direct",
    [(torch.float32, {}, True), (torch.float16, {"use_rslora": True}, True), (torch.bfloat16, {}, False),
     (torch.float32, {"use_dora": True}, False), (torch.float32, {"modules_to_save": ["lm_head"]}, False),
     (torch.float32, {"rank_pattern": {"q_proj": 4}}, False)],
)  # fmt: skip
def test_the_direct_path_takes_plain_lora_on_float32_or_float16_linear_layers_only(dtype, lora, direct, tiny, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = {}
    for name in ("plus", "minus"):
        model = AutoModelForCausalLM.from_pretrained(tiny, dtype=dtype)
        config = LoraConfig(task_type="CAUSAL_LM", r=2, target_modules="all-linear", init_lora_weights=False, **lora)
        get_peft_model(model, config).save_pretrained(tmp_path / name)
        paths[name] = str(tmp_path / name)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=dtype)
    pair = model_state.direct_lora_pair(model, paths)
    assert (pair is not None) == direct
    if pair is not None:  # the weights a pass sees are PEFT's merged weights, and come back afterwards
        from peft import PeftModel

        before = {n: t.clone() for n, t in model.state_dict().items()}
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny, dtype=dtype), paths["minus"])
        merged = reference.merge_and_unload().state_dict()
        with pair.use("minus") as used:
            assert all(torch.equal(used.state_dict()[n], merged[n]) for n in before)
        assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())


@pytest.mark.parametrize("kind", ["standard", "conversational", "implicit"])
def test_output_lengths_equal_the_trainer_tokenization(kind, tiny, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    data = preference_rows(5)
    if kind == "conversational":
        data = [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
                "rejected": [{"role": "assistant", "content": r["rejected"].strip()}],
            }
            for r in data
        ]
    elif kind == "implicit":
        data = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in data]
    dataset = Dataset.from_list([{**r, "extra": i} for i, r in enumerate(data)])
    result = ContrastiveWeightEstimator(tiny, tokenizer, estimator_args(tmp_path)).estimate(dataset)
    assert result.column_names == dataset.column_names + list(REWARD_COLUMNS)
    assert result.select_columns(dataset.column_names).to_list() == dataset.to_list()  # untouched, same order
    ids = tokenize_preference_dataset(dataset, tokenizer)
    for side in SIDES:
        assert [len(r) for r in result[f"{side}_token_rewards"]] == [len(x) for x in ids[f"{side}_ids"]]
    assert result.features["chosen_token_rewards"].feature.dtype == "float32"


@pytest.mark.parametrize("conversational", [False, True])
def test_prompt_method_trains_nothing_and_scores_the_trainer_completions(conversational, tiny, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    forbid(monkeypatch, "train")
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    data = preference_rows(4)
    if conversational:
        data = [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
                "rejected": [{"role": "assistant", "content": r["rejected"].strip()}],
            }
            for r in data
        ]
    dataset = Dataset.from_list(data)
    seen = []
    original = estimator_module.plan_batches

    def record(contexts, completions, order, *args):
        seen.append(([list(contexts[k]) for k in order], [list(completions[k]) for k in order]))
        return original(contexts, completions, order, *args)

    monkeypatch.setattr(estimator_module, "plan_batches", record)
    args = estimator_args(tmp_path, scoring_batch_size=8, cache_shard_size=8, system_prompt_pair="helpful")
    estimator = ContrastiveWeightEstimator(tiny, tokenizer, args)
    result = estimator.estimate(dataset)
    assert estimator.adapter_paths is None and not (tmp_path / "adapters").exists()

    ids = tokenize_preference_dataset(dataset, tokenizer)
    expected_completions = [ids[j][f"{side}_ids"] for j in range(len(ids)) for side in SIDES]
    assert len(seen) == 2  # one batch, positive then negative context
    (positive, completions_plus), (negative, completions_minus) = seen
    # Rows are scored length-sorted: compare as multisets of (completion) and check each context pairing.
    assert sorted(completions_plus) == sorted(expected_completions) == sorted(completions_minus)
    system = tokenizer.convert_tokens_to_ids("<|system|>")
    for context_p, context_m, completion in zip(positive, negative, completions_plus):
        assert context_p != context_m
        if conversational:
            assert context_p[0] == system and context_m[0] == system
        row = expected_completions.index(completion) // 2
        prompt_ids = ids[row]["prompt_ids"]
        assert context_p[-len(prompt_ids) :] == prompt_ids and context_m[-len(prompt_ids) :] == prompt_ids

    # The values: base model with the positive context minus with the negative context.
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    for j, row in enumerate(ids):
        for side in SIDES:
            k = completions_plus.index(row[f"{side}_ids"])
            expected = dense_logps(model, positive[k], row[f"{side}_ids"]) - dense_logps(
                model, negative[k], row[f"{side}_ids"]
            )
            torch.testing.assert_close(
                torch.tensor(result[j][f"{side}_token_rewards"]), expected, atol=1e-5, rtol=1e-4
            )


def test_max_length_cuts_the_context_first_then_the_completion(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    dataset = Dataset.from_list(preference_rows(5))
    ids = tokenize_preference_dataset(dataset, tokenizer)
    longest = max(len(x) for side in SIDES for x in ids[f"{side}_ids"])
    max_length = longest - 1  # every long completion is cut, every short one keeps a cut context
    args = estimator_args(tmp_path, max_length=max_length, include_ref_logps=True)
    estimator = ContrastiveWeightEstimator(tiny, tokenizer, args)
    result = estimator.estimate(dataset)
    stats = estimator.stats
    assert stats["completion_truncated"] >= 1 and stats["context_truncated"] >= 1
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    for j, row in enumerate(ids):
        for side in SIDES:
            completion, ref = row[f"{side}_ids"], result[j][f"{side}_ref_logps"]
            assert len(ref) == len(completion) == len(result[j][f"{side}_token_rewards"])
            if len(completion) < max_length:  # the whole completion is scored after the last context tokens
                context = row["prompt_ids"][-(max_length - len(completion)) :]
                torch.testing.assert_close(
                    torch.tensor(ref), dense_logps(model, context, completion), atol=1e-5, rtol=0
                )
            else:  # first max_length - 1 tokens scored after the last context token, the rest 0.0
                scored = max_length - 1
                expected = dense_logps(model, row["prompt_ids"][-1:], completion[:scored])
                torch.testing.assert_close(torch.tensor(ref[:scored]), expected, atol=1e-5, rtol=0)
                assert ref[scored:] == [0.0] * (len(completion) - scored)


def test_the_output_trains_a_tisdpo_trainer(fitted_dpo, tiny, tmp_path):
    from trl_tokenpo import TISDPOConfig, TISDPOTrainer

    estimator, _, result, _ = fitted_dpo
    args = cpu_args(TISDPOConfig, tmp_path, max_steps=2)
    trainer = TISDPOTrainer(tiny, args=args, train_dataset=result, processing_class=estimator.tokenizer)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


# -------------------------------------------------------------------------------------------------------------------
# Cache: hit, misses, resume, corruption


def test_second_estimate_trains_and_scores_nothing(fitted_dpo, monkeypatch):
    estimator, dataset, result, _ = fitted_dpo
    forbid(monkeypatch, "train", "score", "tokenize")
    again = estimator.estimate(dataset)
    assert estimator.stats["cache_hit"] and estimator.stats["trained_adapters"] == []
    assert rows(again, REWARD_COLUMNS + REF_COLUMNS) == rows(result, REWARD_COLUMNS + REF_COLUMNS)
    # A fresh estimator on the same inputs (another process, say) reuses the adapters and the scores too.
    fresh = ContrastiveWeightEstimator(estimator.model, estimator.tokenizer, estimator.args)
    assert rows(fresh.estimate(dataset)) == rows(result)


def test_each_input_change_misses_the_cache(tiny, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    dataset = Dataset.from_list(preference_rows(4))
    conversational = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": "yes ."}],
          "rejected": [{"role": "assistant", "content": "no"}]} for r in preference_rows(4)]
    )  # fmt: skip
    calls = count_scored_shards(monkeypatch)
    keys = set()

    def run(data=dataset, model=model, tokenizer=tokenizer, **changes):
        calls.clear()
        estimator = ContrastiveWeightEstimator(model, tokenizer, estimator_args(tmp_path, **changes))
        estimator.estimate(data)
        keys.add(estimator.stats["cache_key"])
        return len(calls)

    assert run() == 2
    assert run() == 0  # hit
    assert run(data=dataset.select([0, 1, 3])) > 0
    assert run(data=Dataset.from_list(preference_rows(4)[::-1])) > 0
    assert run(system_prompt_pair="helpful") > 0
    assert run(system_prompt_pair="custom", positive_system_prompt="be kind", negative_system_prompt="be rude") > 0
    assert run(max_length=8) > 0
    assert run(include_ref_logps=True) > 0
    assert run(data=conversational) > 0
    other = AutoTokenizer.from_pretrained(tiny)
    other.chat_template = "{% for m in messages %}{{ m['content'] }} <|end|> {% endfor %}"
    assert run(data=conversational, tokenizer=other) > 0
    changed = AutoModelForCausalLM.from_pretrained(tiny)
    with torch.no_grad():
        changed.lm_head.weight[0, 0] += 1.0
    assert run(model=changed) > 0
    with torch.no_grad():  # the same model object, changed in place (+1.0 would equal `changed`: a hit, rightly)
        model.lm_head.weight[0, 0] += 2.0
    assert run() > 0
    assert len(keys) == 11


def test_interrupted_scoring_resumes_from_the_last_complete_shard(tiny, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    dataset = Dataset.from_list(preference_rows(11))  # 4 shards of 3 rows (the last has 2)
    reference = ContrastiveWeightEstimator(tiny, tokenizer, estimator_args(tmp_path / "reference")).estimate(dataset)

    calls = count_scored_shards(monkeypatch, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        ContrastiveWeightEstimator(tiny, tokenizer, estimator_args(tmp_path / "run")).estimate(dataset)
    assert calls == [0, 1]
    monkeypatch.undo()
    calls = count_scored_shards(monkeypatch)
    estimator = ContrastiveWeightEstimator(tiny, tokenizer, estimator_args(tmp_path / "run"))
    result = estimator.estimate(dataset)
    assert calls == [2, 3] and estimator.stats["scored_shards"] == [2, 3]
    assert rows(result) == rows(reference)


def test_a_corrupt_shard_is_recomputed(tiny, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    dataset = Dataset.from_list(preference_rows(9))
    estimator = ContrastiveWeightEstimator(tiny, tokenizer, estimator_args(tmp_path))
    first = estimator.estimate(dataset)
    shard = Path(estimator.stats["cache_dir"]) / "shard-00001.npz"
    data = bytearray(shard.read_bytes())
    data[-40] ^= 0xFF  # same size, other content: only the checksum can tell
    shard.write_bytes(bytes(data))
    calls = count_scored_shards(monkeypatch)
    again = estimator.estimate(dataset)
    assert calls == [1] and not estimator.stats["cache_hit"]
    assert rows(again) == rows(first)


# -------------------------------------------------------------------------------------------------------------------
# Config and errors


def test_config_defaults_and_parsing():
    from trl import TrlParser

    config = WeightEstimatorConfig("out", use_cpu=True)
    assert config.method == "dpo" and config.beta == 0.1 and config.num_train_epochs == 1
    assert config.learning_rate == 5e-5 and config.bf16 is False  # never bf16 without CUDA
    assert config.positive_system_prompt.startswith("You are an harmless assistant.")
    assert config.cache_dir == os.path.join("out", "score_cache")
    sft = WeightEstimatorConfig("out", method="sft", use_cpu=True)
    assert (sft.learning_rate, sft.num_train_epochs, sft.weight_decay) == (2e-4, 3, 0.01)
    helpful = WeightEstimatorConfig("out", system_prompt_pair="helpful", use_cpu=True)
    assert helpful.negative_system_prompt == (
        "You are an unhelpful assistant. You should not give helpful responses for any question."
    )
    (parsed,) = TrlParser((WeightEstimatorConfig,)).parse_args_and_config(
        ["--output_dir", "o", "--method", "sft", "--lora_target_modules", "q_proj", "v_proj", "--max_length", "64",
         "--learning_rate", "1e-3", "--use_cpu", "--include_ref_logps"]
    )  # fmt: skip
    assert parsed.method == "sft" and parsed.lora_target_modules == ["q_proj", "v_proj"] and parsed.max_length == 64
    assert parsed.learning_rate == 1e-3 and parsed.include_ref_logps
    with pytest.raises(ValueError, match="method must be one of"):
        WeightEstimatorConfig("out", method="rlhf", use_cpu=True)
    with pytest.raises(ValueError, match="custom"):
        WeightEstimatorConfig("out", positive_system_prompt="be nice", use_cpu=True)
    with pytest.raises(ValueError, match="needs both"):
        WeightEstimatorConfig("out", system_prompt_pair="custom", positive_system_prompt="be nice", use_cpu=True)


def test_clear_errors(tiny, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    estimator = ContrastiveWeightEstimator(tiny, tokenizer, estimator_args(tmp_path, method="dpo"))
    with pytest.raises(
        ValueError, match=r"dataset: no `chosen` or `rejected` column \(its columns: prompt, good\)"
    ):
        estimator.estimate(Dataset.from_list([{"prompt": "a", "good": "b"}]))
    with pytest.raises(ValueError, match="empty"):
        estimator.estimate(Dataset.from_list(preference_rows(2)).select([]))
    # a row without "rejected" (a .jsonl line without the field): named before any model runs, not an AttributeError
    # from the tokenization (issue 21)
    broken = preference_rows(6)
    broken[4]["rejected"] = None
    with pytest.raises(InputError, match=r"^dataset, row 4 \(0-based\), column `rejected`: missing or null \(1 of 6 rows: 4\)"):
        estimator.estimate(Dataset.from_list(broken))
    broken[4]["rejected"] = "  "
    with pytest.raises(InputError, match=r"^dataset, row 4 \(0-based\), column `rejected`: the completion is empty"):
        estimator.fit(Dataset.from_list(broken))
    with pytest.raises(RuntimeError, match=r"call fit\(dataset\) first"):
        estimator.score(Dataset.from_list(preference_rows(2)))
    with pytest.raises(TypeError, match="pick a split"):
        estimator.estimate({"train": Dataset.from_list(preference_rows(2))})


# -------------------------------------------------------------------------------------------------------------------
# The script


@pytest.mark.slow
def test_estimate_weights_script_end_to_end(tiny, tmp_path):
    dataset_dir = tmp_path / "dataset"
    Dataset.from_list(preference_rows(6)).save_to_disk(str(dataset_dir))
    out = tmp_path / "out"
    command = [
        sys.executable, str(REPO / "scripts" / "estimate_weights.py"),
        "--model_name_or_path", tiny, "--dataset_name", str(dataset_dir), "--output_dir", str(out),
        "--method", "dpo", "--max_steps", "1", "--per_device_train_batch_size", "2", "--lora_r", "4",
        "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--num_heatmap_examples", "2",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "weighted_dataset" in completed.stdout and "token_rewards.html" in completed.stdout
    weighted = load_from_disk(str(out / "weighted_dataset"))
    assert weighted.column_names == ["prompt", "chosen", "rejected", *REWARD_COLUMNS] and len(weighted) == 6
    html = (out / "token_rewards.html").read_text()
    assert "<html" in html.lower() and "sky" in html
    adapters = list((out / "adapters").glob("*/plus/adapter_config.json"))
    assert len(adapters) == 1 and '"r": 4' in adapters[0].read_text()
