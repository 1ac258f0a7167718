"""Whole jobs on a CUDA GPU (skipped without one; scripts/gpu_check.sh runs each as a part of its own): the weight
estimator end to end on the built-in task, the main job `scripts/train_tisdpo.py`, a QLoRA step (when bitsandbytes
imports) and a DeepSpeed ZeRO-3 step in one process (when deepspeed imports).

Each test records its key figures with `record_property` (they land in pytest's JUnit XML, which gpu_check.sh reads for
its summary table). The CPU versions of these jobs are tests/test_estimator.py, tests/test_scripts.py,
tests/test_qlora.py and tests/test_distributed.py (ZeRO-3 simulated).
"""

import contextlib
import math
import time

import pytest
import torch
from conftest import build_model, build_tokenizer, cpu_args, preference_rows


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# The estimator's bar on the built-in task, as on CPU (tests/test_estimator.py: measured 0.72-0.92 over seeds there)
AUROC_BAR = 0.65


@pytest.fixture(scope="module")
def builtin_task(tmp_path_factory):
    """The built-in synthetic task at the size of tests/test_estimator.py (128 pairs, a 100-step warm-up)."""
    from trl_tokenpo.synthetic import SyntheticTaskConfig, build_task

    config = SyntheticTaskConfig(seed=0, num_train_pairs=128, num_eval_pairs=8, num_eval_prompts=4, warmup_steps=100)
    return build_task(config, cache_dir=tmp_path_factory.mktemp("synthetic"))


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_estimator_end_to_end_on_cuda(method, builtin_task, tmp_path, record_property):
    """Fit the contrastive pair of LoRA adapters on the GPU (the config's default precision there: bf16), score the
    training set, and check the token rewards against the task's oracle (AUROC of good vs bad words)."""
    from test_docs import load_script
    from test_estimator import METHOD_SETTINGS

    from trl_tokenpo.data import tokenize_preference_dataset
    from trl_tokenpo.estimator import ContrastiveWeightEstimator, WeightEstimatorConfig

    task = builtin_task
    args = WeightEstimatorConfig(
        output_dir=str(tmp_path), method=method, per_device_train_batch_size=8, lora_r=16, lora_alpha=32,
        lora_dropout=0.0, scoring_batch_size=32, cache_shard_size=256, report_to="none", disable_tqdm=True,
        logging_steps=1000, **METHOD_SETTINGS[method],
    )  # fmt: skip
    assert args.bf16 and not args.use_cpu
    start = time.perf_counter()
    estimator = ContrastiveWeightEstimator(task.model, task.tokenizer, args)
    result = estimator.estimate(task.train_dataset)
    seconds = time.perf_counter() - start
    assert estimator.stats["scored_tokens"] > 0
    quality = load_script("scripts/benchmark_quality.py").reward_quality(
        task, tokenize_preference_dataset(task.train_dataset, task.tokenizer), result
    )
    record_property(f"auroc_{method}", round(quality["auroc"], 3))
    record_property(f"seconds_{method}", round(seconds, 1))
    assert quality["num_scored_tokens"] > 200
    assert quality["auroc"] > AUROC_BAR, quality


def test_train_tisdpo_script_end_to_end_on_cuda(tmp_path, capsys, record_property):
    """`scripts/train_tisdpo.py` as a user runs it on the built-in task (reduced as in tests/test_scripts.py), on the
    GPU: estimation, training, the before/after report; its CUDA allocations prove where it ran."""
    from test_scripts import REDUCED, report_rows, run_main

    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run_main("train_tisdpo.py", "--output_dir", tmp_path / "tisdpo", "--task_cache_dir", tmp_path / "task", *REDUCED,
             "--report_to", "none", "--disable_tqdm", "true")  # fmt: skip
    seconds = time.perf_counter() - start
    stdout = capsys.readouterr().out
    rows = report_rows(stdout)
    peak = torch.cuda.max_memory_allocated() / 2**20
    record_property("seconds", round(seconds, 1))
    record_property("oracle_reward_before_after", f"{rows['before'][0]:+.3f} -> {rows['after'][0]:+.3f}")
    record_property("peak_allocated_mib", round(peak))
    assert peak > 1, "nothing was allocated on the GPU"
    assert rows["after"][0] > rows["before"][0], rows
    assert rows["before"][1] == 0.0 and rows["after"][1] > 0.0
    assert (tmp_path / "tisdpo" / "model.safetensors").exists()


@pytest.mark.parametrize("method", ["tdpo", "tisdpo_reverse"])
def test_qlora_step_on_cuda(method, tmp_path, record_property):
    """A 4-bit NF4 base (bitsandbytes' CUDA kernels) with LoRA adapters: two steps train the adapters only."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (QLoRA needs it)")
    from test_qlora import frozen_changes, make_trainer, snapshot

    tokenizer = build_tokenizer()
    build_model(tokenizer, seed=0, hidden_size=64).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    trainer = make_trainer(method, str(tmp_path / "model"), tmp_path / "out", torch.bfloat16, use_cpu=False,
                           bf16=True)  # fmt: skip
    base = trainer.model.get_base_model()
    assert getattr(base, "is_loaded_in_4bit", False) and base.device.type == "cuda"
    before = snapshot(trainer.model)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2 and all(math.isfinite(e["loss"]) for e in logs)
    changed, _ = frozen_changes(before, snapshot(trainer.model), torch.bfloat16)
    assert changed == [], f"frozen (non-adapter) entries changed: {changed}"
    assert any(not torch.equal(v, before[k]) for k, v in snapshot(trainer.model).items() if "lora_B" in k)
    record_property(f"loss_{method}", round(logs[-1]["loss"], 4))


@pytest.mark.parametrize("method", ["tdpo", "tisdpo_reverse"])
def test_deepspeed_zero3_step_on_cuda(method, tmp_path, monkeypatch, record_property):
    """DeepSpeed ZeRO-3 in one process: the LM heads of the policy and the reference are partitioned, and the fused
    kernel gathers both (TRL's `maybe_gather_lm_head_ctx`) in its forward and again in its backward."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed")
    import socket

    import trl_tokenpo.kernels.function as kernel_function
    from trl_tokenpo import TDPOConfig, TDPOTrainer, TISDPOConfig, TISDPOTrainer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
                            WORLD_SIZE="1").items():  # fmt: skip
        monkeypatch.setenv(name, value)
    gathers = []
    real_gather = kernel_function.maybe_gather_lm_head_ctx

    @contextlib.contextmanager
    def counting_gather(*params):
        with real_gather(*params):
            gathers.append(torch.is_grad_enabled())
            yield

    monkeypatch.setattr(kernel_function, "maybe_gather_lm_head_ctx", counting_gather)
    zero3 = {
        "zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
    }  # fmt: skip
    from datasets import Dataset

    tokenizer = build_tokenizer()
    dataset = Dataset.from_list(preference_rows(8))
    if method == "tdpo":
        args = cpu_args(TDPOConfig, tmp_path, use_cpu=False, bf16=True, deepspeed=zero3, max_steps=1)
        trainer_class = TDPOTrainer
    else:
        from test_tisdpo import with_token_columns

        args = cpu_args(TISDPOConfig, tmp_path, use_cpu=False, bf16=True, deepspeed=zero3, max_steps=1,
                        tis_kl_term="reverse")  # fmt: skip
        trainer_class, dataset = TISDPOTrainer, with_token_columns(dataset, tokenizer)
    # the models are made after the config, so that ZeRO-3 partitions them as they are built (HfDeepSpeedConfig)
    policy, reference = build_model(tokenizer, seed=0), build_model(tokenizer, seed=1)
    trainer = trainer_class(model=policy, ref_model=reference, args=args, train_dataset=dataset,
                            processing_class=tokenizer)  # fmt: skip
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs and math.isfinite(logs[0]["loss"]) and math.isfinite(logs[0]["kl/rejected"]), logs
    for model in (trainer.model, trainer.ref_model):
        weight = model.lm_head.weight
        assert getattr(weight, "ds_numel", 0) == weight.ds_shape.numel() > 0 and weight.numel() == 0, "not partitioned"
    # the forward (with gradients enabled: the policy's gather covers the reference head too) and the backward
    assert len(gathers) >= 2, gathers
    record_property(f"loss_{method}", round(logs[0]["loss"], 4))
