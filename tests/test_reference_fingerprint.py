"""trl_tokenpo.fingerprint: the canonical digest, the tokenizer / dataset / base-model digests (the latter ignoring PEFT
adapters), the memoized model digest, and the `ref_logps_fingerprint` column of an estimate with reference log-probs."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_model, build_tokenizer, cpu_args, preference_rows
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from trl_tokenpo.estimator import ContrastiveWeightEstimator, WeightEstimatorConfig
from trl_tokenpo.estimator.estimator import REF_COLUMNS, REF_FINGERPRINT_COLUMN
from trl_tokenpo.fingerprint import (
    ModelFingerprint,
    fingerprint,
    fingerprint_base_model,
    fingerprint_dataset,
    fingerprint_tokenizer,
    reference_fingerprint,
)


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


# The digest of GOLDEN_PARTS, fixed here: it must not depend on the process, the hash seed or the machine, and must
# not change between releases (a change invalidates every user's saved adapters and score stores once).
GOLDEN_PARTS = {"b": [1, 2.5, None, True], "a": "x", "t": torch.arange(4), "y": b"\x00"}
GOLDEN_DIGEST = "5b6dec7364020fa59cb495dad2fb6fe369c938dbb1636f4bd3082d694a4531b2"


def test_fingerprint_is_stable_canonical_and_sensitive():
    digest = fingerprint(GOLDEN_PARTS)
    assert digest == GOLDEN_DIGEST
    assert fingerprint({k: GOLDEN_PARTS[k] for k in reversed(list(GOLDEN_PARTS))}) == digest
    assert fingerprint({**GOLDEN_PARTS, "b": (1, 2.5, None, True)}) == digest  # a tuple hashes as its list
    assert fingerprint({**GOLDEN_PARTS, "t": torch.arange(8)[::2] // 2}) == digest  # strides do not matter
    others = [
        fingerprint("a", 1.0), fingerprint("a", True), fingerprint("a", "1"), fingerprint(["a", 1]),
        fingerprint("a1"), fingerprint("a", 1, None), fingerprint(torch.zeros(2)),
        fingerprint(torch.zeros(2, dtype=torch.float64)), fingerprint(torch.zeros(1, 2)),
        fingerprint(torch.zeros(2, dtype=torch.bfloat16)),
    ]  # fmt: skip
    assert len({fingerprint("a", 1), *others}) == len(others) + 1
    with pytest.raises(TypeError, match="cannot fingerprint"):
        fingerprint(object())


def make_tokenizer(chat_template=None) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2, "hello": 3, "world": 4, "good": 5, "bad": 6}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
    tok.chat_template = chat_template
    return tok


def test_fingerprint_tokenizer():
    template = "{% for m in messages %}{{ m['content'] }}<eos>{% endfor %}"
    digest = fingerprint_tokenizer(make_tokenizer(template))
    assert fingerprint_tokenizer(make_tokenizer(template)) == digest
    tok = make_tokenizer(template)  # padding and truncation settings do not change the ids of an example
    tok.padding_side, tok.truncation_side = "left", "left"
    tok.backend_tokenizer.enable_truncation(max_length=3)
    assert fingerprint_tokenizer(tok) == digest
    assert fingerprint_tokenizer(make_tokenizer(template.replace("<eos>", "\n"))) != digest
    assert fingerprint_tokenizer(make_tokenizer(None)) != digest
    tok = make_tokenizer(template)
    tok.add_tokens(["extra"])
    assert fingerprint_tokenizer(tok) != digest
    tok = make_tokenizer(template)
    tok.eos_token = "<pad>"
    assert fingerprint_tokenizer(tok) != digest


def test_fingerprint_dataset():
    data = {"prompt": ["p1", "p2"], "chosen": ["a", "b"], "rejected": ["c", "d"]}
    digest = fingerprint_dataset(Dataset.from_dict(data))
    assert fingerprint_dataset(Dataset.from_dict(data)) == digest
    assert fingerprint_dataset(Dataset.from_dict({**data, "chosen": ["a", "B"]})) != digest
    assert fingerprint_dataset(Dataset.from_dict(data).select([1, 0])) != digest
    with pytest.raises(TypeError, match="cannot fingerprint a dataset"):
        fingerprint_dataset(Dataset.from_dict(data).to_iterable_dataset())


def test_the_memoized_model_digest_follows_every_kind_of_weight_change():
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=1)
    digest = ModelFingerprint(model)
    calls = []
    original = fingerprint_base_model

    def counting(m):
        calls.append(1)
        return original(m)

    import trl_tokenpo.fingerprint as module

    module.fingerprint_base_model, saved = counting, module.fingerprint_base_model
    try:
        first = digest()
        assert digest() == first and len(calls) == 1  # unchanged: not recomputed
        changes = [
            lambda: model.lm_head.weight.data.mul_(1.0),  # through .data (here a no-op): not recomputed
            lambda: torch.no_grad()(lambda: model.lm_head.weight.add_(1.0))(),  # in place
            lambda: setattr(model.lm_head, "weight", torch.nn.Parameter(model.lm_head.weight.detach() * 2)),
            lambda: model.load_state_dict(build_model(tokenizer, seed=2).state_dict(), assign=True),
            lambda: model.to(torch.float16),
        ]
        seen = []
        for change in changes:
            before = len(calls)
            change()
            value = digest()
            seen.append(len(calls) > before)
            assert value == original(model)
        assert seen == [False, True, True, True, True]
    finally:
        module.fingerprint_base_model = saved
