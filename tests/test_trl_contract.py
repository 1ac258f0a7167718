"""The private TRL names trl_tokenpo relies on. When TRL changes them, these tests fail first, with the name."""

import inspect

import trl
from conftest import cpu_args
from packaging.version import Version
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from trl_tokenpo.data import tokenize_preference_dataset


def test_trl_version_is_in_the_pinned_range():
    assert Version("1.16.0") <= Version(trl.__version__) < Version("1.17"), trl.__version__


def test_private_methods_and_signatures():
    assert list(inspect.signature(DPOTrainer._compute_loss).parameters) == ["self", "model", "inputs", "return_outputs"]
    assert list(inspect.signature(DPOTrainer._prepare_dataset).parameters) == [
        "self", "dataset", "processing_class", "args", "dataset_name",
    ]  # fmt: skip
    assert hasattr(DPOTrainer, "_set_signature_columns_if_needed")
    assert DPOTrainer.loss_is_scaled_for_ga is False
    fields = {f for f in DataCollatorForPreference.__dataclass_fields__}
    assert {"pad_token_id", "max_length", "truncation_mode", "pad_to_multiple_of"} <= fields
    from trl.models.utils import disable_gradient_checkpointing  # noqa: F401
    from trl.trainer.utils import add_fused_lm_head, maybe_gather_lm_head_ctx, pad, use_adapter  # noqa: F401

    assert "outputs" in inspect.signature(add_fused_lm_head).parameters


def test_tokenize_preference_dataset_gives_the_trainers_ids(tmp_path, tiny_model_dir, standard_dataset, conversational_dataset):
    for dataset in (standard_dataset, conversational_dataset):
        trainer = DPOTrainer(model=tiny_model_dir, args=cpu_args(DPOConfig, tmp_path, max_length=None), train_dataset=dataset)
        ours = tokenize_preference_dataset(dataset, trainer.processing_class)
        for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert ours[column] == trainer.train_dataset[column], column
