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
    # trl_tokenpo.data.tokenize_preference_dataset is built from the data_utils names and global_then_local_main_first
    # (no private TRL method, no stand-in `self`)
    from trl.data_utils import common_prefix_length, extract_prompt, is_conversational  # noqa: F401
    from trl.models.utils import disable_gradient_checkpointing  # noqa: F401
    from trl.trainer.utils import (  # noqa: F401
        add_fused_lm_head,
        global_then_local_main_first,
        maybe_gather_lm_head_ctx,
        pad,
        use_adapter,
    )

    assert "outputs" in inspect.signature(add_fused_lm_head).parameters


def test_tokenize_preference_dataset_gives_the_trainers_ids(
    tmp_path, tiny_model_dir, standard_dataset, conversational_dataset, implicit_prompt_dataset
):
    """`tokenize_preference_dataset` mirrors `DPOTrainer._prepare_dataset` with TRL's public data utilities: the ids
    must stay those of the trainer (prompt extraction, EOS, chat template, the completion split, dropped rows)."""
    tools = conversational_dataset.add_column("tools", ['[{"type": "function", "function": {"name": "f"}}]'] * 8)
    cases = [(standard_dataset, None), (conversational_dataset, None), (implicit_prompt_dataset, None), (tools, None),
             (standard_dataset, 5)]  # fmt: skip
    for dataset, max_length in cases:
        args = cpu_args(DPOConfig, tmp_path, max_length=max_length)
        trainer = DPOTrainer(model=tiny_model_dir, args=args, train_dataset=dataset)
        ours = tokenize_preference_dataset(dataset, trainer.processing_class, max_length=max_length)
        for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert ours[column] == trainer.train_dataset[column], (column, max_length)
    assert len(ours) < len(standard_dataset)  # max_length 5 dropped rows whose prompt fills it, as TRL does
