"""TIS-DPO with `precompute_ref_log_probs=True` (tis_kl_term="none"): the reference's token-weighted sums are computed
once before training, and the loss equals the loss with a live reference."""

import math

import pytest
import torch
from conftest import cpu_args
from test_tdpo import make_pair
from test_tisdpo import with_token_columns

from trl_tokenpo import TISDPOConfig, TISDPOTrainer


def batches(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)


@pytest.mark.parametrize(
    "options",
    [{}, {"weight_transform": "rank"}, {"ld_alpha": 0.5}, {"weight_transform": "threshold_scale", "normalize_weights": True}],
)
@pytest.mark.parametrize("kind", ["rewards", "weights"])
def test_precomputed_reference_equals_live_reference(tmp_path, standard_dataset, options, kind):
    tokenizer, policy, ref = make_pair()
    dataset = with_token_columns(standard_dataset, tokenizer, kind=kind, fn=lambda g, n, s: (0.1 + 2 * torch.rand(n, generator=g)).tolist())
    common = dict(per_device_train_batch_size=8, max_length=12, **options)
    live = TISDPOTrainer(
        model=policy, ref_model=ref, args=cpu_args(TISDPOConfig, tmp_path / "live", **common), train_dataset=dataset,
        processing_class=tokenizer,
    )
    pre = TISDPOTrainer(
        model=policy, ref_model=ref, args=cpu_args(TISDPOConfig, tmp_path / "pre", precompute_ref_log_probs=True, **common),
        train_dataset=dataset, processing_class=tokenizer,
    )
    assert "ref_chosen_logps" in pre.train_dataset.column_names
    assert len(pre.train_dataset[0]["ref_chosen_logps"]) == 2  # [unweighted, weighted]
    batch = batches(pre)
    assert batch["ref_chosen_logps"].shape == (8, 2)
    live_batch = {k: v for k, v in batch.items() if not k.startswith("ref_")}
    torch.testing.assert_close(pre.compute_loss(pre.model, batch), live.compute_loss(live.model, live_batch), rtol=1e-5, atol=1e-6)
    for key, values in live.metric_values("train").items():
        torch.testing.assert_close(
            torch.tensor(pre.metric_values("train")[key][-1]), torch.tensor(values[-1]), rtol=1e-5, atol=1e-5,
            msg=lambda m, k=key: f"{k}: {m}",
        )


def test_precompute_releases_reference_trains_and_evaluates(tmp_path, tiny_model_dir, standard_dataset, tokenizer):
    dataset = with_token_columns(standard_dataset, tokenizer, kind="rewards", fn=lambda g, n, s: torch.randn(n, generator=g).tolist())
    args = cpu_args(TISDPOConfig, tmp_path, max_steps=3, precompute_ref_log_probs=True, eval_strategy="steps", eval_steps=3)
    trainer = TISDPOTrainer(model=tiny_model_dir, args=args, train_dataset=dataset, eval_dataset=dataset)
    assert trainer.ref_model is None  # full fine-tuning keeps no reference model in memory
    trainer.train()
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and "eval_weights/chosen_mean" in metrics


def test_different_transforms_do_not_share_the_precompute_cache(tmp_path, tiny_model_dir, standard_dataset, tokenizer):
    dataset = with_token_columns(standard_dataset, tokenizer, kind="rewards", fn=lambda g, n, s: torch.randn(n, generator=g).tolist())
    dataset = dataset.flatten_indices()  # a dataset with a fingerprint, as loaded ones have
    sums = []
    for transform in ("exp", "rank"):
        args = cpu_args(TISDPOConfig, tmp_path / transform, precompute_ref_log_probs=True, weight_transform=transform)
        trainer = TISDPOTrainer(model=tiny_model_dir, args=args, train_dataset=dataset)
        sums.append(torch.tensor(trainer.train_dataset["ref_chosen_logps"]))
    torch.testing.assert_close(sums[0][:, 0], sums[1][:, 0])  # unweighted sums agree
    assert not torch.allclose(sums[0][:, 1], sums[1][:, 1])  # weighted sums differ
