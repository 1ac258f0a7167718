"""The synthetic task (known token-level reward) and the sampling-based evaluation helpers."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch

from trl_tokenpo.evaluation import evaluate_policy, preference_accuracy, sample_responses
from trl_tokenpo.synthetic import (
    BAD_WORDS,
    EOS_TOKEN,
    GOOD_WORDS,
    NEUTRAL_WORDS,
    SYSTEM_PROMPTS,
    Oracle,
    SyntheticTaskConfig,
    build_task,
    build_tokenizer,
    load_task,
    render_chat,
    vocabulary,
)


# Small enough to build in a few seconds, large enough for the warm-up to learn the language.
FAST = {"num_train_pairs": 64, "num_eval_pairs": 48, "num_eval_prompts": 16, "warmup_steps": 120}
TINY = {"num_train_pairs": 32, "num_eval_pairs": 8, "num_eval_prompts": 4, "warmup_steps": 5}


@pytest.fixture(scope="module")
def task():
    start = time.perf_counter()
    built = build_task(SyntheticTaskConfig(seed=0, **FAST))
    print(f"\nsynthetic task build ({FAST['warmup_steps']} warm-up steps): {time.perf_counter() - start:.1f}s")
    return built


def _boosted(model, tokenizer, words, bias: float):
    """A copy of `model` whose logits get `+bias` on the ids of `words`."""
    boosted = copy.deepcopy(model)
    offset = torch.zeros(len(tokenizer))
    offset[tokenizer.convert_tokens_to_ids(sorted(words))] = bias
    boosted.lm_head.register_forward_hook(lambda module, args, output: output + offset.to(output))
    return boosted


def _weights_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------------------------------
# Build


def test_build_is_deterministic():
    a = build_task(SyntheticTaskConfig(seed=0, **TINY))
    b = build_task(SyntheticTaskConfig(seed=0, **TINY))
    c = build_task(SyntheticTaskConfig(seed=1, **TINY))
    assert a.train_dataset.to_dict() == b.train_dataset.to_dict()
    assert a.eval_dataset.to_dict() == b.eval_dataset.to_dict()
    assert a.eval_prompts == b.eval_prompts
    assert a.warmup_losses == b.warmup_losses
    assert _weights_equal(a.model, b.model)
    assert a.train_dataset.to_dict() != c.train_dataset.to_dict()
    assert a.eval_dataset.to_dict() != c.eval_dataset.to_dict()
    assert not _weights_equal(a.model, c.model)
    # The build leaves the global torch RNG and thread count alone.
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_task(SyntheticTaskConfig(seed=0, **TINY))
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


def test_save_load_and_cache(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = SyntheticTaskConfig(seed=3, **TINY)
    built = build_task(config, cache_dir=tmp_path)
    assert built.build_seconds > 0
    cached = build_task(config, cache_dir=tmp_path)  # loaded, not rebuilt
    assert cached.build_seconds == 0
    assert cached.config == config
    assert cached.train_dataset.to_dict() == built.train_dataset.to_dict()
    assert cached.eval_dataset.to_dict() == built.eval_dataset.to_dict()
    assert cached.eval_prompts == built.eval_prompts
    assert cached.pair_scores == built.pair_scores
    assert _weights_equal(cached.model, built.model)
    assert not cached.model.training

    # The saved directory works as a `model_name_or_path`, and the word-level tokenizer survives the reload.
    path = built.save(tmp_path / "task")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert _weights_equal(model, built.model)
    text = built.train_dataset[0]["prompt"] + built.train_dataset[0]["chosen"] + EOS_TOKEN
    assert tokenizer(text)["input_ids"] == built.tokenizer(text)["input_ids"]
    assert tokenizer.chat_template == built.tokenizer.chat_template
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == built.tokenizer.decode(
        built.tokenizer(text)["input_ids"], skip_special_tokens=True
    )
    assert load_task(path).train_dataset.to_dict() == built.train_dataset.to_dict()


# ---------------------------------------------------------------------------------------------------------------------
# Vocabulary, tokenizer, oracle


def test_vocabulary_and_oracle():
    assert 10 <= len(GOOD_WORDS) <= 15 and 10 <= len(BAD_WORDS) <= 15
    assert 60 <= len(NEUTRAL_WORDS) <= 150
    assert not (GOOD_WORDS & BAD_WORDS) and not (GOOD_WORDS & NEUTRAL_WORDS) and not (BAD_WORDS & NEUTRAL_WORDS)
    assert len(vocabulary()) == len(set(vocabulary()))

    oracle = Oracle()
    assert oracle.good_words == GOOD_WORDS and oracle.bad_words == BAD_WORDS
    assert oracle.token_rewards("the helpful river is rude .") == [0.0, 1.0, 0.0, 0.0, -1.0, 0.0]
    assert oracle.token_rewards(["kind", "wrong", "river"]) == [1.0, -1.0, 0.0]
    assert oracle.score("Kind and SAFE, but toxic.<eos>") == 1.0
    assert oracle.score(f"<|assistant|> helpful {EOS_TOKEN} <pad>") == 1.0

    tokenizer = build_tokenizer()
    ids = tokenizer("the helpful river is rude ." + EOS_TOKEN)["input_ids"]
    assert oracle.token_reward_of_ids(ids, tokenizer) == [0.0, 1.0, 0.0, 0.0, -1.0, 0.0, 0.0]
    assert oracle.token_reward_of_ids(torch.tensor(ids), tokenizer) == oracle.token_reward_of_ids(ids, tokenizer)

    graded = Oracle({"kind": 0.5, "rude": -2.0})
    assert graded.score("kind kind rude helpful") == -1.0


def test_tokenizer_round_trip_and_chat_template():
    tokenizer = build_tokenizer()
    unk = tokenizer.unk_token_id
    for word in sorted(NEUTRAL_WORDS | GOOD_WORDS | BAD_WORDS):
        ids = tokenizer(word)["input_ids"]
        assert len(ids) == 1 and ids[0] != unk, word
        assert tokenizer.decode(ids) == word
    text = "question : tell me about the river . answer : the river is kind and safe ."
    ids = tokenizer(text)["input_ids"]
    assert unk not in ids and tokenizer.decode(ids) == text
    # No special token is added by the tokenizer itself; EOS is one token and decodes away.
    assert tokenizer(text + EOS_TOKEN)["input_ids"] == ids + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == text
    for system_prompt in SYSTEM_PROMPTS.values():
        assert unk not in tokenizer(system_prompt)["input_ids"]

    conversations = [
        [{"role": "user", "content": "tell me about the river ."}],
        [{"role": "system", "content": SYSTEM_PROMPTS["helpful"]}, {"role": "user", "content": "what ?"}],
    ]
    answer = [{"role": "assistant", "content": "the river is kind ."}]
    for prompt in conversations:
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
        assert full_text.startswith(prompt_text)
        assert prompt_text == render_chat(prompt, add_generation_prompt=True)
        assert full_text == render_chat(prompt + answer)
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
        full_ids = tokenizer.apply_chat_template(prompt + answer, return_dict=True)["input_ids"]
        assert full_ids[: len(prompt_ids)] == prompt_ids
        assert full_ids[-1] == tokenizer.eos_token_id
        assert unk not in full_ids


# ---------------------------------------------------------------------------------------------------------------------
# Preference pairs


def test_pairs_agree_with_oracle_and_are_token_level_mixed(task):
    oracle = task.oracle
    for split, dataset in (("train", task.train_dataset), ("eval", task.eval_dataset)):
        assert dataset.column_names == ["prompt", "chosen", "rejected"]
        scores = task.pair_scores[split]
        assert len(scores["chosen"]) == len(dataset)
        assert all(c >= r for c, r in zip(scores["chosen"], scores["rejected"]))
        for example in dataset:
            assert example["chosen"].startswith(" ") and not example["chosen"].endswith(EOS_TOKEN)
            for key in ("chosen", "rejected"):
                n = len(oracle.words(example[key]))
                assert task.config.min_response_words <= n <= task.config.max_response_words

    chosen = [oracle.score(x) for x in task.train_dataset["chosen"]]
    rejected = [oracle.score(x) for x in task.train_dataset["rejected"]]
    agreement = sum(c > r for c, r in zip(chosen, rejected)) / len(chosen)
    assert agreement > 0.6  # noisy labels still mostly follow the true score
    # Token-level interest: chosen responses often hold bad words, rejected ones good words.
    chosen_with_bad = sum(any(v < 0 for v in oracle.token_rewards(x)) for x in task.train_dataset["chosen"])
    rejected_with_good = sum(any(v > 0 for v in oracle.token_rewards(x)) for x in task.train_dataset["rejected"])
    assert chosen_with_bad / len(chosen) > 0.25 and rejected_with_good / len(chosen) > 0.25


def test_noiseless_labels_follow_true_score():
    task = build_task(SyntheticTaskConfig(seed=5, noise_std=0.0, **TINY))
    oracle = task.oracle
    for dataset in (task.train_dataset, task.eval_dataset):
        for example in dataset:
            assert oracle.score(example["chosen"]) >= oracle.score(example["rejected"])
    assert task.pair_scores["train"]["chosen"] == [oracle.score(x) for x in task.train_dataset["chosen"]]


def test_conversational_variant():
    task = build_task(SyntheticTaskConfig(seed=0, conversational=True, **TINY))
    plain = build_task(SyntheticTaskConfig(seed=0, **TINY))
    example = task.train_dataset[0]
    assert example["prompt"][-1]["role"] == "user"
    assert example["chosen"] == [{"role": "assistant", "content": plain.train_dataset[0]["chosen"].strip()}]
    assert isinstance(task.eval_prompts[0], list) and task.eval_prompts[0][0]["role"] == "user"
    # Same pairs, same model: only the rendering differs.
    assert _weights_equal(task.model, plain.model)
    samples = sample_responses(task.model, task.tokenizer, task.eval_prompts, 2, max_new_tokens=8, seed=0)
    assert len(samples) == 2 * len(task.eval_prompts)
    assert samples.prompt_ids[0][-1] == task.tokenizer.convert_tokens_to_ids("<|assistant|>")
    accuracy = preference_accuracy(task.model, task.model, task.tokenizer, task.eval_dataset, beta=0.1)
    assert accuracy == 0.0  # policy == reference: every margin is exactly 0, and ties count as wrong


# ---------------------------------------------------------------------------------------------------------------------
# Warm-up and evaluation


def test_warmup_lowers_loss_and_samples_the_language(task):
    losses = task.warmup_losses
    assert len(losses) == task.config.warmup_steps
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 1.5

    tokenizer, oracle = task.tokenizer, task.oracle
    samples = sample_responses(task.model, tokenizer, task.eval_prompts, 4, max_new_tokens=32, seed=0)
    assert len(samples) == 4 * len(task.eval_prompts)
    assert sum(samples.finished) / len(samples) > 0.9
    vocab_words = NEUTRAL_WORDS | GOOD_WORDS | BAD_WORDS | {".", "?", ":", ","}
    specials = set(tokenizer.all_special_ids) - {tokenizer.eos_token_id}
    for ids, text in zip(samples.completion_ids, samples.completions):
        assert not specials & set(ids)  # no pad/unk/role tags inside a plain-text completion
        assert set(text.split()) <= vocab_words
    rewards = [oracle.score(text) for text in samples.completions]
    assert all(math.isfinite(r) for r in rewards)
    assert len(set(rewards)) > 2  # non-degenerate: a spread of good and bad samples
    sentiment = sum(any(v != 0 for v in oracle.token_rewards(t)) for t in samples.completions) / len(samples)
    assert sentiment > 0.5

    again = sample_responses(task.model, tokenizer, task.eval_prompts, 4, max_new_tokens=32, seed=0)
    other = sample_responses(task.model, tokenizer, task.eval_prompts, 4, max_new_tokens=32, seed=1)
    assert again.completion_ids == samples.completion_ids
    assert other.completion_ids != samples.completion_ids


def test_evaluate_policy_kl_is_zero_against_itself(task):
    model, tokenizer, oracle = task.model, task.tokenizer, task.oracle
    result = evaluate_policy(model, model, tokenizer, task.eval_prompts, oracle, num_samples_per_prompt=2, seed=0)
    assert result["kl_mean"] == 0.0 and result["kl_sem"] == 0.0
    assert math.isfinite(result["reward_mean"]) and result["reward_sem"] > 0
    assert 0 < result["entropy_mean"] < math.log(len(tokenizer))
    assert task.config.min_response_words - 1 <= result["length_mean"] <= task.config.max_response_words + 1
    assert result["num_samples"] == 2 * len(task.eval_prompts)
    # A distinct but identical copy goes through the two-model path: still exactly 0, same samples, same numbers.
    twin = evaluate_policy(
        copy.deepcopy(model), model, tokenizer, task.eval_prompts, oracle, num_samples_per_prompt=2, seed=0
    )
    assert twin == result
    assert not model.training


def test_boosting_good_words_raises_reward_and_kl(task):
    model, tokenizer, oracle = task.model, task.tokenizer, task.oracle
    kwargs = {"num_samples_per_prompt": 2, "max_new_tokens": 32, "seed": 0}
    base = evaluate_policy(model, model, tokenizer, task.eval_prompts, oracle, **kwargs)
    boosted_model = _boosted(model, tokenizer, GOOD_WORDS, 3.0)
    boosted = evaluate_policy(boosted_model, model, tokenizer, task.eval_prompts, oracle, **kwargs)
    assert boosted["reward_mean"] > base["reward_mean"] + 1.0
    assert boosted["kl_mean"] > 0.1
    worse = evaluate_policy(
        _boosted(model, tokenizer, BAD_WORDS, 3.0), model, tokenizer, task.eval_prompts, oracle, **kwargs
    )
    assert worse["reward_mean"] < base["reward_mean"] - 1.0

    # The implicit reward of the good-word policy ranks the held-out pairs mostly right, the bad-word one mostly wrong.
    good_acc = preference_accuracy(boosted_model, model, tokenizer, task.eval_dataset, beta=0.1)
    bad_acc = preference_accuracy(_boosted(model, tokenizer, BAD_WORDS, 3.0), model, tokenizer, task.eval_dataset, 0.1)
    assert good_acc > 0.6 and bad_acc < 0.4
    assert preference_accuracy(model, model, tokenizer, task.eval_dataset, beta=0.1) == 0.0


@pytest.mark.slow
def test_default_build_time_and_sft_reward(tmp_path):
    start = time.perf_counter()
    task = build_task(SyntheticTaskConfig())
    elapsed = time.perf_counter() - start
    result = evaluate_policy(task.model, task.model, task.tokenizer, task.eval_prompts, task.oracle, seed=0)
    print(f"\ndefault synthetic task build: {elapsed:.1f}s; SFT samples: {result}")
    assert elapsed < 120
    assert abs(result["reward_mean"]) < 1.5 and result["eos_rate"] > 0.9
