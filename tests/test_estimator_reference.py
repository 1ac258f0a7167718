"""TIS-DPO's reference from the estimator's per-token reference log-probs: no reference forward, checked source."""

import math

import pytest
import torch
from conftest import cpu_args
from test_tdpo import perturbed
from transformers import AutoModelForCausalLM

from trl_tokenpo import (
    ContrastiveWeightEstimator,
    TISDPOConfig,
    TISDPOTrainer,
    TokenColumnError,
    WeightEstimatorConfig,
)


@pytest.fixture
def scored(tmp_path, tiny_model_dir, standard_dataset):
    args = WeightEstimatorConfig(
        output_dir=str(tmp_path / "estimator"), method="prompt", include_ref_logps=True, use_cpu=True, report_to="none"
    )
    estimator = ContrastiveWeightEstimator(tiny_model_dir, args=args)
    return estimator.estimate(standard_dataset)


def test_reference_from_estimator_columns_equals_forward_precompute(tmp_path, tiny_model_dir, scored, monkeypatch):
    assert {"chosen_ref_logps", "rejected_ref_logps", "ref_logps_fingerprint"} <= set(scored.column_names)
    forward = TISDPOTrainer(
        model=tiny_model_dir, args=cpu_args(TISDPOConfig, tmp_path / "forward", precompute_ref_log_probs=True),
        train_dataset=scored.remove_columns(["chosen_ref_logps", "rejected_ref_logps", "ref_logps_fingerprint"]),
    )

    def no_forward(*args, **kwargs):
        raise AssertionError("the reference model ran although the dataset carries its log-probs")

    monkeypatch.setattr(TISDPOTrainer, "_reference_token_logps", no_forward)
    from_columns = TISDPOTrainer(
        model=tiny_model_dir, args=cpu_args(TISDPOConfig, tmp_path / "columns", precompute_ref_log_probs=True),
        train_dataset=scored, eval_dataset=scored,
    )
    assert from_columns.ref_model is None
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(
            torch.tensor(from_columns.train_dataset[column]), torch.tensor(forward.train_dataset[column]), rtol=1e-5, atol=1e-5
        )
    from_columns.train()
    assert all(math.isfinite(e["loss"]) for e in from_columns.state.log_history if "loss" in e)
    assert math.isfinite(from_columns.evaluate()["eval_loss"])


def test_reference_log_probs_of_another_model_are_refused(tmp_path, tiny_model_dir, scored):
    other = perturbed(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    other.save_pretrained(tmp_path / "other")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="another model or tokenizer"):
        TISDPOTrainer(
            model=str(tmp_path / "other"), args=cpu_args(TISDPOConfig, tmp_path / "o", precompute_ref_log_probs=True),
            train_dataset=scored,
        )
    with pytest.raises(TokenColumnError, match="ref_logps_fingerprint"):
        TISDPOTrainer(
            model=tiny_model_dir, args=cpu_args(TISDPOConfig, tmp_path / "n", precompute_ref_log_probs=True),
            train_dataset=scored.remove_columns("ref_logps_fingerprint"),
        )


def test_unused_reference_columns_are_reported(tmp_path, tiny_model_dir, scored, caplog):
    with caplog.at_level("WARNING"):
        TISDPOTrainer(model=tiny_model_dir, args=cpu_args(TISDPOConfig, tmp_path), train_dataset=scored)
    assert "does not use" in caplog.text
