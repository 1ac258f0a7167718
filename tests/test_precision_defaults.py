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
