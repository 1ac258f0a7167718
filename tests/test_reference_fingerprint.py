"""fingerprint_base_model / reference_fingerprint: digests of a base model that ignore PEFT adapters, and the
`ref_logps_fingerprint` column of an estimate with reference log-probs."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_model, build_tokenizer, cpu_args, preference_rows
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model

from trl_tokenpo.estimator import (
    ContrastiveWeightEstimator,
    WeightEstimatorConfig,
    fingerprint,
    fingerprint_base_model,
    fingerprint_tokenizer,
    reference_fingerprint,
)
from trl_tokenpo.estimator.estimator import REF_COLUMNS, REF_FINGERPRINT_COLUMN


pytestmark = pytest.mark.usefixtures("one_thread")


def lora(**kwargs):
    return LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear", **kwargs)


def test_plain_and_peft_wrapped_models_have_the_same_digest(tmp_path):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=1)
    expected = fingerprint_base_model(model)

    wrapped = get_peft_model(copy.deepcopy(model), lora())
    assert any("lora_A" in name for name, _ in wrapped.named_parameters())
    assert fingerprint_base_model(wrapped) == expected
    assert fingerprint_base_model(wrapped.get_base_model()) == expected  # adapter layers injected, no PeftModel

    # Non-zero adapters, a second adapter and modules_to_save copies change nothing either.
    trained = get_peft_model(copy.deepcopy(model), lora(init_lora_weights=False, modules_to_save=["lm_head"]))
    trained.add_adapter("other", LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        trained.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)
    assert fingerprint_base_model(trained) == expected

    # A PeftModel loaded from disk on a fresh copy of the base model.
    trained.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter")
    assert fingerprint_base_model(loaded) == expected
    assert fingerprint_base_model(model) == expected  # the original was never touched


def test_one_changed_base_weight_changes_the_digest():
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=1)
    before = fingerprint_base_model(model)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    assert fingerprint_base_model(changed) != before
    wrapped = get_peft_model(changed, lora())
    assert fingerprint_base_model(wrapped) == fingerprint_base_model(changed) != before
    # A merged adapter is part of the base weights.
    merged = get_peft_model(copy.deepcopy(model), lora(init_lora_weights=False)).merge_and_unload()
    assert fingerprint_base_model(merged) != before
    # The digest does not depend on where the model was loaded from.
    renamed = copy.deepcopy(model)
    renamed.config._name_or_path = "/some/other/path"
    assert fingerprint_base_model(renamed) == before


def test_a_different_chat_template_changes_the_reference_fingerprint():
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=1)
    other = build_tokenizer()
    other.chat_template = other.chat_template + "{# changed #}"
    expected = fingerprint("reference-logps-v1", fingerprint_base_model(model), fingerprint_tokenizer(tokenizer))
    assert reference_fingerprint(model, tokenizer) == expected
    assert reference_fingerprint(model, build_tokenizer()) == expected
    assert reference_fingerprint(model, other) != expected
    assert reference_fingerprint(get_peft_model(copy.deepcopy(model), lora()), tokenizer) == expected


def test_score_adds_the_reference_fingerprint_column(tmp_path):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=3)
    args = cpu_args(
        WeightEstimatorConfig, tmp_path, method="prompt", include_ref_logps=True, cache_shard_size=4,
        scoring_batch_size=2,
    )  # fmt: skip
    estimator = ContrastiveWeightEstimator(model, tokenizer, args)
    dataset = Dataset.from_list(preference_rows(6))
    result = estimator.score(dataset)
    expected = reference_fingerprint(model, tokenizer)
    assert all(c in result.column_names for c in REF_COLUMNS)
    assert result.features[REF_FINGERPRINT_COLUMN].dtype == "string"
    assert result[REF_FINGERPRINT_COLUMN] == [expected] * len(dataset)
    # Rescoring the output (cache hit) replaces the column rather than duplicating it.
    again = estimator.score(result)
    assert again[REF_FINGERPRINT_COLUMN] == [expected] * len(dataset)
    # Without reference log-probs there is no fingerprint column.
    args.include_ref_logps = False
    assert REF_FINGERPRINT_COLUMN not in estimator.score(dataset).column_names
