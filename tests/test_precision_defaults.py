"""The `bf16` default of this package's configs (the trainers' and the estimator's): TRL's (True) where it works,
float32 on CPU; explicit values kept."""

import pytest
import transformers.training_args
import transformers.utils
from trl import DPOConfig

from trl_tokenpo import TDPOConfig, TISDPOConfig, WeightEstimatorConfig


CONFIGS = [TDPOConfig, TISDPOConfig, WeightEstimatorConfig]


@pytest.fixture
def bf16_device(monkeypatch):
    """Pretend a bf16-capable accelerator is present (what transformers' own check and ours both ask)."""
    monkeypatch.setattr(transformers.utils, "is_torch_bf16_gpu_available", lambda: True)
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)


@pytest.mark.parametrize("config_class", CONFIGS)
def test_cpu_runs_in_float32_without_settings(config_class, tmp_path):
    if transformers.utils.is_torch_bf16_gpu_available():
        pytest.skip("this machine has a bf16 accelerator")
    with pytest.raises(ValueError, match="bf16"):  # what a TRL user gets from the plain DPOConfig here
        DPOConfig(output_dir=str(tmp_path))
    assert config_class(output_dir=str(tmp_path)).bf16 is False
    assert config_class(output_dir=str(tmp_path), use_cpu=True).bf16 is False  # TRL would keep bf16 here
    assert DPOConfig(output_dir=str(tmp_path), use_cpu=True).bf16 is True
    with pytest.raises(ValueError, match=r"bf16=True\) needs a bf16-capable accelerator.*Leave bf16 unset"):
        config_class(output_dir=str(tmp_path), bf16=True)  # an explicit value is never changed
    assert config_class(output_dir=str(tmp_path), bf16=True, use_cpu=True).bf16 is True


@pytest.mark.parametrize("config_class", CONFIGS)
def test_bf16_accelerator_keeps_trl_default(config_class, tmp_path, bf16_device):
    assert DPOConfig(output_dir=str(tmp_path)).bf16 is True
    assert config_class(output_dir=str(tmp_path)).bf16 is True
    assert config_class(output_dir=str(tmp_path), use_cpu=True).bf16 is False
    assert config_class(output_dir=str(tmp_path), bf16=False).bf16 is False


# ----------------------------------------------------------------------------------------------------------------------
# A default run prints no library warning caused by this package's calls (issue 21)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_class", CONFIGS)
def test_configs_resolve_pin_memory_and_the_checkpointing_name_quietly(config_class, tmp_path):
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = config_class(output_dir=str(tmp_path))
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, UserWarning))] == []
    accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    assert config.dataloader_pin_memory is accelerator  # pinning only helps copies to an accelerator
    assert config.gradient_checkpointing is True  # TRL's default, under its new name where transformers has one
    assert getattr(config, "activation_checkpointing", True) is True


@pytest.mark.slow
def test_a_tisdpo_run_with_estimation_warns_nothing(tmp_path, tiny_model_dir, one_thread):
    """The code paths that read gradient checkpointing (the estimator's adapters, PEFT wrapping by TRL, the reference
    forward of the KL term) and the dataloaders: no FutureWarning or UserWarning on CPU with transformers 5.24+."""
    import warnings

    from conftest import preference_rows
    from datasets import Dataset
    from peft import LoraConfig

    from trl_tokenpo import ContrastiveWeightEstimator, TISDPOTrainer

    dataset = Dataset.from_list(preference_rows(8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        estimator = ContrastiveWeightEstimator(
            tiny_model_dir,
            args=WeightEstimatorConfig(str(tmp_path / "est"), method="sft", max_steps=1, report_to="none", disable_tqdm=True),
        )
        weighted = estimator.estimate(dataset)
        trainer = TISDPOTrainer(
            model=tiny_model_dir,
            args=TISDPOConfig(str(tmp_path / "tis"), max_steps=1, report_to="none", tis_kl_term="tdpo",
                              per_device_train_batch_size=4, disable_tqdm=True),
            train_dataset=weighted,
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
        )  # fmt: skip
        trainer.train()
    messages = [f"{w.category.__name__}: {w.message}" for w in caught if issubclass(w.category, (FutureWarning, UserWarning))]
    assert messages == []


def test_the_bitsandbytes_cpu_kernel_notice_is_dropped(caplog):
    """bitsandbytes logs it at import on AVX512-BF16 CPUs when its Hub kernel cannot be fetched; nothing to act on."""
    import logging

    import trl_tokenpo  # noqa: F401 (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure", "offline")
        logger.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]
