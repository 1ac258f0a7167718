"""TISDPOTrainer: weights from the dataset to the loss, reductions to DPO / TDPO2, alignment, validation."""

import math

import pytest
import torch
from conftest import cpu_args
from dense import assert_grads_close, dense_loss
from test_tdpo import first_batch, make_pair
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from trl_tokenpo import (
    DataCollatorForTokenPreference,
    TDPOConfig,
    TDPOTrainer,
    TISDPOConfig,
    TISDPOTrainer,
    TokenColumn,
    TokenColumnError,
)
from trl_tokenpo.data import tokenize_preference_dataset
from trl_tokenpo.weights import WeightTransform


def with_token_columns(dataset, tokenizer, kind="weights", fn=None, seed=0):
    """Add per-token columns aligned with TRL's tokenization; `fn(gen, n, side)` gives the values (default random)."""
    ids = tokenize_preference_dataset(dataset, tokenizer)
    gen = torch.Generator().manual_seed(seed)
    fn = fn or (lambda g, n, side: (0.2 + 2 * torch.rand(n, generator=g)).tolist())
    chosen = [fn(gen, len(x), "chosen") for x in ids["chosen_ids"]]
    rejected = [fn(gen, len(x), "rejected") for x in ids["rejected_ids"]]
    name = "weights" if kind == "weights" else "token_rewards"
    return dataset.add_column(f"chosen_{name}", chosen).add_column(f"rejected_{name}", rejected)


def ones(g, n, side):
    return [1.0] * n


@pytest.mark.parametrize("kl_term", ["none", "reverse", "tdpo"])
def test_loss_and_gradient_match_dense_float64(tmp_path, standard_dataset, kl_term):
    tokenizer, policy, ref = make_pair()
    dataset = with_token_columns(standard_dataset, tokenizer)
    args = cpu_args(TISDPOConfig, tmp_path, tis_kl_term=kl_term, alpha=0.6, beta=0.4)
    trainer = TISDPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=dataset, processing_class=tokenizer)
    batch = first_batch(trainer)
    weights = batch["token_weights"]
    assert weights.shape == batch["input_ids"].shape
    assert weights[batch["completion_mask"] == 1].std() > 0.1  # non-uniform weights
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    want, policy64 = dense_loss(policy, ref, batch, beta=0.4, method="tisdpo", alpha=0.6, kl_term=kl_term, weights=weights)
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close(trainer.model, policy64)
    metrics = trainer.metric_values("train")
    for key in ("weights/chosen_mean", "weights/rejected_mean", "weights/chosen_max", "weights/rejected_min"):
        assert key in metrics
    assert ("kl/chosen" in metrics) == (kl_term != "none")


def test_kl_term_none_runs_no_full_vocabulary_computation(tmp_path, standard_dataset, monkeypatch):
    import trl_tokenpo.kernels as kernels

    def forbidden(*args, **kwargs):
        raise AssertionError("full-vocabulary statistics computed with tis_kl_term='none'")

    monkeypatch.setattr(kernels.TokenStatsFunction, "apply", forbidden)
    tokenizer, policy, ref = make_pair()
    dataset = with_token_columns(standard_dataset, tokenizer)
    trainer = TISDPOTrainer(
        model=policy, ref_model=ref, args=cpu_args(TISDPOConfig, tmp_path), train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.compute_loss(trainer.model, first_batch(trainer))
    # the same check does catch the full-vocabulary path
    with_kl = TISDPOTrainer(
        model=policy, ref_model=ref, args=cpu_args(TISDPOConfig, tmp_path, tis_kl_term="tdpo"), train_dataset=dataset,
        processing_class=tokenizer,
    )
    with pytest.raises(AssertionError, match="full-vocabulary"):
        with_kl.compute_loss(with_kl.model, first_batch(with_kl))


def test_all_ones_none_equals_dpo_and_all_ones_tdpo_equals_tdpo2(tmp_path, standard_dataset):
    tokenizer, policy, ref = make_pair()
    dataset = with_token_columns(standard_dataset, tokenizer, fn=ones)

    def build(cls, config_cls, out, data, **kw):
        return cls(model=policy, ref_model=ref, args=cpu_args(config_cls, tmp_path / out, **kw), train_dataset=data,
                   processing_class=tokenizer)  # fmt: skip

    dpo = build(DPOTrainer, DPOConfig, "dpo", standard_dataset)
    tis_none = build(TISDPOTrainer, TISDPOConfig, "tn", dataset)
    tdpo = build(TDPOTrainer, TDPOConfig, "td", standard_dataset, alpha=0.3)
    tis_tdpo = build(TISDPOTrainer, TISDPOConfig, "tt", dataset, tis_kl_term="tdpo", alpha=0.3)
    batch = first_batch(tis_none)
    plain = {k: v for k, v in batch.items() if k != "token_weights"}
    torch.testing.assert_close(tis_none.compute_loss(tis_none.model, batch), dpo.compute_loss(dpo.model, plain), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(tis_tdpo.compute_loss(tis_tdpo.model, batch), tdpo.compute_loss(tdpo.model, plain), rtol=1e-6, atol=1e-7)
    for key, values in dpo._metrics["train"].items():
        torch.testing.assert_close(torch.tensor(tis_none.metric_values("train")[key][-1]), torch.tensor(values[-1]), rtol=1e-5, atol=1e-6)
    assert tis_none.metric_values("train")["weights/chosen_mean"][-1] == 1.0


def test_rewards_are_transformed_inside_the_trainer(tmp_path, standard_dataset):
    tokenizer, policy, ref = make_pair()
    unique_rows = standard_dataset.select(range(5))  # rows are matched back by their ids below
    rewards = with_token_columns(unique_rows, tokenizer, kind="rewards", fn=lambda g, n, s: torch.randn(n, generator=g).mul(2).tolist())
    transform = WeightTransform(transform="exp", mu=1.0, k=1.0, clamp=(-0.5, 1.5))
    trainer = TISDPOTrainer(
        model=policy, ref_model=ref, args=cpu_args(TISDPOConfig, tmp_path, per_device_train_batch_size=5),
        train_dataset=rewards, processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    # rebuild the expected layout from the dataset rows the sampler chose: match rows by their chosen ids
    rows = {tuple(r["prompt_ids"] + r["chosen_ids"]): r for r in trainer.train_dataset}
    b = batch["input_ids"].shape[0] // 2
    for i in range(b):
        ids = batch["input_ids"][i][batch["attention_mask"][i] == 1].tolist()
        row = rows[tuple(ids)]
        want = transform(torch.tensor(row["chosen_token_rewards"]), "chosen")
        torch.testing.assert_close(batch["token_weights"][i][batch["completion_mask"][i] == 1], want)
        rejected_want = transform(torch.tensor(row["rejected_token_rewards"]), "rejected")
        torch.testing.assert_close(batch["token_weights"][b + i][batch["completion_mask"][b + i] == 1], rejected_want)


@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
@pytest.mark.parametrize("transform", [None, WeightTransform(transform="rank")])
def test_collator_aligns_with_completion_mask_under_truncation(truncation_mode, transform):
    examples = [
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5, 6, 7], "rejected_ids": [8], "cw": [0.1, 0.2, 0.3, 0.4], "rw": [0.9]},
        {"prompt_ids": [1], "chosen_ids": [4, 5], "rejected_ids": [8, 9, 10, 11, 12], "cw": [1.1, 1.2], "rw": [2.1, 2.2, 2.3, 2.4, 2.5]},
    ]
    kwargs = dict(pad_token_id=0, max_length=5, truncation_mode=truncation_mode, pad_to_multiple_of=4)
    ours = DataCollatorForTokenPreference(**kwargs, token_columns=[TokenColumn("w", "cw", "rw", transform=transform)])(examples)
    theirs = DataCollatorForPreference(**kwargs)(examples)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["w"].shape == theirs["completion_mask"].shape
    # the weights sit exactly on the completion positions, in order, after the same truncation slice
    for row, (example, side) in enumerate([(e, "chosen") for e in examples] + [(e, "rejected") for e in examples]):
        values = torch.tensor(example["cw" if side == "chosen" else "rw"])
        if transform is not None:
            values = transform(values, side)
        full = torch.cat([torch.zeros(len(example["prompt_ids"])), values])
        full = full[:5] if truncation_mode == "keep_start" else full[-5:]
        torch.testing.assert_close(ours["w"][row][: len(full)], full)
        assert torch.all(ours["w"][row][len(full):] == 0)
        assert torch.all(ours["w"][row][ours["completion_mask"][row] == 0] == 0)


def test_conversational_weights_align(tmp_path, conversational_dataset):
    tokenizer, policy, ref = make_pair()
    dataset = with_token_columns(conversational_dataset, tokenizer, fn=lambda g, n, s: [float(i + 1) for i in range(n)])
    trainer = TISDPOTrainer(
        model=policy, ref_model=ref, args=cpu_args(TISDPOConfig, tmp_path), train_dataset=dataset,
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)
    for row in range(batch["input_ids"].shape[0]):
        w = batch["token_weights"][row][batch["completion_mask"][row] == 1]
        torch.testing.assert_close(w, torch.arange(1, w.numel() + 1, dtype=torch.float32))
        # the end-of-turn suffix of the template belongs to the completion and carries the last weights
        completion = batch["input_ids"][row][batch["completion_mask"][row] == 1]
        assert tokenizer.convert_ids_to_tokens(completion.tolist())[-1] in ("<|end|>",)
    trainer.compute_loss(trainer.model, batch)


def _modify(dataset, column, row, value):
    values = list(dataset[column])
    values[row] = value
    return dataset.remove_columns(column).add_column(column, values)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d.remove_columns(["chosen_weights", "rejected_weights"]), "ContrastiveWeightEstimator"),
        (lambda d: d.remove_columns(["rejected_weights"]), "only"),
        (lambda d: _modify(d, "chosen_weights", 3, [1.0]), "row 3 \\(0-based\\), column `chosen_weights`.*another tokenizer"),
        (lambda d: _modify(d, "rejected_weights", 5, [float("nan")] * len(d[5]["rejected_weights"])), "row 5.*not finite"),
        (lambda d: _modify(d, "chosen_weights", 2, [-1.0] * len(d[2]["chosen_weights"])), "row 2.*negative"),
    ],
)
def test_validation_errors_name_dataset_row_and_column(tmp_path, standard_dataset, change, match):
    tokenizer, policy, ref = make_pair()
    dataset = change(with_token_columns(standard_dataset, tokenizer))
    with pytest.raises(TokenColumnError, match=match):
        TISDPOTrainer(
            model=policy, ref_model=ref, args=cpu_args(TISDPOConfig, tmp_path), train_dataset=dataset,
            processing_class=tokenizer,
        )


def test_validation_of_eval_dataset_and_mixed_columns(tmp_path, standard_dataset):
    tokenizer, policy, ref = make_pair()
    weights = with_token_columns(standard_dataset, tokenizer)
    rewards = with_token_columns(standard_dataset, tokenizer, kind="rewards")
    kwargs = dict(model=policy, ref_model=ref, processing_class=tokenizer)
    with pytest.raises(TokenColumnError, match="eval dataset"):
        TISDPOTrainer(args=cpu_args(TISDPOConfig, tmp_path), train_dataset=weights, eval_dataset=rewards, **kwargs)
    both = weights.add_column("chosen_token_rewards", rewards["chosen_token_rewards"]).add_column(
        "rejected_token_rewards", rewards["rejected_token_rewards"]
    )
    with pytest.raises(TokenColumnError, match="both"):
        TISDPOTrainer(args=cpu_args(TISDPOConfig, tmp_path), train_dataset=both, **kwargs)
    bad_eval = _modify(weights, "chosen_weights", 1, [0.5])
    with pytest.raises(TokenColumnError, match="eval dataset, row 1"):
        TISDPOTrainer(args=cpu_args(TISDPOConfig, tmp_path), train_dataset=weights, eval_dataset=bad_eval, **kwargs)
    with pytest.raises(TypeError, match="DataCollatorForTokenPreference"):
        TISDPOTrainer(
            args=cpu_args(TISDPOConfig, tmp_path), train_dataset=weights, data_collator=DataCollatorForPreference(0), **kwargs
        )


@pytest.mark.parametrize(
    "options, match",
    [
        ({"precompute_ref_log_probs": True, "tis_kl_term": "tdpo"}, "precompute_ref_log_probs"),
        ({"tis_kl_term": "forward"}, "tis_kl_term"),
        ({"weight_transform": "softmax"}, "weight transform"),
        ({"weight_clamp": [1.0]}, "weight_clamp"),
        ({"loss_type": ["hinge"]}, "loss_type"),
    ],
)
def test_refused_options(tmp_path, standard_dataset, options, match):
    tokenizer, policy, ref = make_pair()
    dataset = with_token_columns(standard_dataset, tokenizer)
    with pytest.raises(ValueError, match=match):
        TISDPOTrainer(
            model=policy, ref_model=ref, args=cpu_args(TISDPOConfig, tmp_path, **options), train_dataset=dataset,
            processing_class=tokenizer,
        )


@pytest.mark.parametrize("kl_term", ["none", "tdpo"])
def test_short_training_run_with_given_weights(tmp_path, tiny_model_dir, standard_dataset, tokenizer, kl_term):
    dataset = with_token_columns(standard_dataset, tokenizer)
    args = cpu_args(TISDPOConfig, tmp_path, max_steps=3, tis_kl_term=kl_term, eval_strategy="steps", eval_steps=3)
    trainer = TISDPOTrainer(model=tiny_model_dir, args=args, train_dataset=dataset, eval_dataset=dataset)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 3 and all(math.isfinite(e["loss"]) for e in logs)
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert evals and "eval_weights/chosen_mean" in evals[-1]


def test_unused_settings_are_reported(tmp_path, standard_dataset, caplog):
    tokenizer, policy, ref = make_pair()
    weights = with_token_columns(standard_dataset, tokenizer)
    args = cpu_args(TISDPOConfig, tmp_path, alpha=0.9, weight_transform="rank")
    with caplog.at_level("WARNING"):
        TISDPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=weights, processing_class=tokenizer)
    assert "ignores `alpha`" in caplog.text
    assert "`weight_transform` (the dataset carries ready weights" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        TISDPOTrainer(model=policy, ref_model=ref, args=cpu_args(TISDPOConfig, tmp_path), train_dataset=weights,
                      processing_class=tokenizer)  # fmt: skip
    assert "ignores" not in caplog.text


@pytest.mark.parametrize("denoise", ["center", "soft_threshold"])
def test_reward_denoise_reaches_the_weights(tmp_path, standard_dataset, denoise):
    tokenizer, policy, ref = make_pair()
    unique_rows = standard_dataset.select(range(5))
    rewards = with_token_columns(unique_rows, tokenizer, kind="rewards", fn=lambda g, n, s: torch.randn(n, generator=g).add(0.7).tolist())
    transform = WeightTransform(denoise=denoise, denoise_threshold=0.5)
    trainer = TISDPOTrainer(
        model=policy, ref_model=ref, train_dataset=rewards, processing_class=tokenizer,
        args=cpu_args(TISDPOConfig, tmp_path, per_device_train_batch_size=5, reward_denoise=denoise, reward_denoise_threshold=0.5),
    )  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    rows = {tuple(r["prompt_ids"] + r["chosen_ids"]): r for r in trainer.train_dataset}
    b = batch["input_ids"].shape[0] // 2
    for i in range(b):
        row = rows[tuple(batch["input_ids"][i][batch["attention_mask"][i] == 1].tolist())]
        for j, side in ((i, "chosen"), (b + i, "rejected")):
            want = transform(torch.tensor(row[f"{side}_token_rewards"]), side)
            torch.testing.assert_close(batch["token_weights"][j][batch["completion_mask"][j] == 1], want)
            assert not torch.equal(want, WeightTransform()(torch.tensor(row[f"{side}_token_rewards"]), side))
