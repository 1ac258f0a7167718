"""Several processes and sharded weights, on CPU.

* `torchrun --nproc_per_node 2` (gloo) against one process with the full global batch (slow: the two launches of
  `distributed_worker.py` are shared by the tests through a module fixture). `accelerate launch --cpu
  --num_processes 2` silently starts ONE process on a machine without GPU, hence torchrun.
* FSDP2 (`fully_shard` on CPU with gloo, 1 and 2 ranks, in the same launches): the fused kernel on sharded heads.
* DeepSpeed ZeRO-3, simulated (deepspeed is not installed here): a fake `GatheredParameters` that keeps the LM heads
  "partitioned" (NaN) outside the gather context checks that the kernel gathers the policy and reference heads in its
  forward AND in its backward, through TRL's `maybe_gather_lm_head_ctx`.
"""

import contextlib
import enum
import importlib.machinery
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_model, build_tokenizer, cpu_args, preference_rows
from datasets import Dataset

from trl_tokenpo import TDPOConfig, TDPOTrainer, TISDPOConfig, TISDPOTrainer


WORKER = Path(__file__).with_name("distributed_worker.py")
GLOBAL_BATCH = 8


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc, model_dir, out):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", str(WORKER), "--model", model_dir, "--out", str(out),
        "--global-batch", str(GLOBAL_BATCH),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"torchrun --nproc_per_node {nproc} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return out


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    return {n: launch(n, tiny_model_dir, root / f"np{n}") for n in (1, 2)}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tdpo", "tisdpo_none", "tisdpo_tdpo"])
def test_two_processes_match_one_process(runs, tiny_model_dir, case):
    from transformers import AutoModelForCausalLM

    one = json.loads((runs[1] / f"{case}.json").read_text())
    two = json.loads((runs[2] / f"{case}.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert len(one["logs"]) == len(two["logs"]) == 1
    single, split = one["logs"][0], two["logs"][0]
    assert set(single) == set(split)
    expected = {"loss", "grad_norm", "rewards/accuracies", "rewards/margins", "logps/chosen", "entropy", "num_tokens"}
    if case != "tisdpo_none":
        expected |= {"kl/chosen", "kl/rejected", "kl/margin"}
    if case.startswith("tisdpo"):
        expected |= {"weights/chosen_mean", "weights/rejected_mean", "weights/chosen_max", "weights/rejected_min"}
    assert expected <= set(single), expected - set(single)
    for key, value in single.items():
        assert math.isfinite(value), key
        torch.testing.assert_close(
            torch.tensor(split[key], dtype=torch.float64), torch.tensor(value, dtype=torch.float64), rtol=1e-5,
            atol=1e-6, msg=lambda m, k=key: f"{case} {k}: {m}",
        )  # fmt: skip
    # the same SGD step: the gradient averaged over 2 ranks x 4 pairs equals the gradient over 8 pairs
    initial = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    params_one = torch.load(runs[1] / f"{case}.pt")
    params_two = torch.load(runs[2] / f"{case}.pt")
    assert set(params_one) == set(params_two) == set(initial)
    assert any(not torch.equal(params_one[n], initial[n].detach()) for n in initial)  # a step did happen
    for name, value in params_one.items():
        torch.testing.assert_close(params_two[name], value, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_fsdp2_sharded_heads_match_unsharded(runs, nproc):
    result = json.loads((runs[nproc] / "fsdp2.json").read_text())
    assert result["world_size"] == nproc
    for layout, expected_ref_weight in (("root", "Parameter"), ("lm_head", "DTensor")):
        r = result[layout]
        assert r["ref_weight_type"] == expected_ref_weight, layout  # "lm_head": the DTensor path was exercised
        assert math.isclose(r["loss"], r["want"], rel_tol=1e-5, abs_tol=1e-5), (layout, r)
        assert r["max_grad_diff"] <= 1e-5 * max(1.0, r["max_grad"]), (layout, r)


@pytest.mark.slow
def test_estimator_scoring_two_processes_matches_one_process(runs):
    one = json.loads((runs[1] / "estimator.json").read_text())
    two = json.loads((runs[2] / "estimator.json").read_text())
    if "skipped" in one:
        pytest.skip(f"estimator not importable: {one['skipped']}")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    # the work was split: each rank scored its own shards (rank r takes the shards i with i % 2 == r)
    shards = [json.loads((runs[2] / f"estimator-shards-rank{r}.json").read_text()) for r in (0, 1)]
    assert shards[0] and shards[1] and not set(shards[0]) & set(shards[1])
    for column in ("chosen_token_rewards", "rejected_token_rewards"):
        assert len(one["rows"][column]) == len(two["rows"][column]) == GLOBAL_BATCH + 3
        for row, (a, b) in enumerate(zip(one["rows"][column], two["rows"][column])):
            assert len(a) == len(b), (column, row)
            torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3, simulated
# ----------------------------------------------------------------------------------------------------------------------


class FakeZeroStatus(enum.Enum):
    AVAILABLE = 1
    NOT_AVAILABLE = 2


class FakeZero3:
    """Partitions chosen parameters the way the kernel can observe it: outside a `GatheredParameters` context their
    values are NaN (ZeRO-3 leaves an empty shard; NaN keeps the shape so that autograd can accumulate the gradient),
    inside it the full values are back. Records which parameters each gather saw, and in which phase."""

    def __init__(self):
        self.phase = None
        self.gathers = []
        fake = self

        class GatheredParameters:
            def __init__(self, params):
                self.params = list(params)

            def __enter__(self):
                fake.gathers.append((fake.phase, {id(p) for p in self.params}))
                for p in self.params:
                    p.data.copy_(p._fake_full)
                    p.ds_status = FakeZeroStatus.AVAILABLE

            def __exit__(self, *exc):
                for p in self.params:
                    fake.partition(p)

        self.GatheredParameters = GatheredParameters

    @staticmethod
    def partition(p):
        p._fake_full = p.data.clone()
        p.data.fill_(float("nan"))
        p.ds_status = FakeZeroStatus.NOT_AVAILABLE

    def install(self, monkeypatch):
        import transformers.integrations.deepspeed as hf_deepspeed

        deepspeed = type(sys)("deepspeed")
        # a spec but no distribution metadata: `accelerate` still reports deepspeed as not installed
        deepspeed.__spec__ = importlib.machinery.ModuleSpec("deepspeed", None)
        deepspeed.zero = type(sys)("deepspeed.zero")
        deepspeed.zero.GatheredParameters = self.GatheredParameters
        partition_parameters = type(sys)("deepspeed.runtime.zero.partition_parameters")
        partition_parameters.ZeroParamStatus = FakeZeroStatus
        for name, module in (
            ("deepspeed", deepspeed),
            ("deepspeed.runtime", type(sys)("deepspeed.runtime")),
            ("deepspeed.runtime.zero", type(sys)("deepspeed.runtime.zero")),
            ("deepspeed.runtime.zero.partition_parameters", partition_parameters),
        ):
            monkeypatch.setitem(sys.modules, name, module)
        monkeypatch.setattr(hf_deepspeed, "is_deepspeed_zero3_enabled", lambda: True)


def _zero3_trainer(tmp_path, method):
    tokenizer = build_tokenizer()
    ref = build_model(tokenizer, seed=0)
    policy = build_model(tokenizer, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    dataset = Dataset.from_list(preference_rows())
    if method == "tdpo":
        args = cpu_args(TDPOConfig, tmp_path, alpha=0.7)
        return TDPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=dataset, processing_class=tokenizer)
    from trl_tokenpo.data import tokenize_preference_dataset

    ids = tokenize_preference_dataset(dataset, tokenizer)
    dataset = dataset.add_column("chosen_weights", [[0.5 + (i % 3) / 2 for i in range(len(x))] for x in ids["chosen_ids"]])
    dataset = dataset.add_column("rejected_weights", [[1.5 - (i % 2) for i in range(len(x))] for x in ids["rejected_ids"]])
    args = cpu_args(TISDPOConfig, tmp_path, tis_kl_term=method.split("_")[1], alpha=0.6)
    return TISDPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=dataset, processing_class=tokenizer)


@pytest.mark.parametrize("method", ["tdpo", "tisdpo_reverse"])
def test_zero3_kernel_gathers_policy_and_reference_heads_in_forward_and_backward(tmp_path, monkeypatch, method):
    trainer = _zero3_trainer(tmp_path, method)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model = trainer.model
    model.train()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    fake = FakeZero3()
    fake.install(monkeypatch)
    heads = {id(model.lm_head.weight), id(trainer.ref_model.lm_head.weight)}
    fake.partition(model.lm_head.weight)
    fake.partition(trainer.ref_model.lm_head.weight)
    fake.phase = "forward"
    got = trainer.compute_loss(model, batch)
    fake.phase = "backward"
    got.backward()
    assert {phase for phase, _ in fake.gathers} == {"forward", "backward"}
    for phase in ("forward", "backward"):
        assert any(heads <= ids for p, ids in fake.gathers if p == phase), (phase, fake.gathers)
    assert torch.isnan(model.lm_head.weight).all()  # partitioned again after the step
    torch.testing.assert_close(got, loss)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, want[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")

    # the simulation does catch a kernel that reads the heads without gathering them
    import trl_tokenpo.kernels.function as kernel_function

    monkeypatch.setattr(kernel_function, "maybe_gather_lm_head_ctx", lambda *params: contextlib.nullcontext())
    assert torch.isnan(trainer.compute_loss(model, batch))


# ----------------------------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------------------------

CONFIGS = Path(__file__).parent.parent / "scripts" / "accelerate_configs"


@pytest.mark.parametrize(
    "name, distributed_type, settings",
    [
        ("multi_gpu.yaml", "MULTI_GPU", {}),
        ("deepspeed_zero2.yaml", "DEEPSPEED", {"zero_stage": 2}),
        ("deepspeed_zero3.yaml", "DEEPSPEED", {"zero_stage": 3, "zero3_init_flag": True}),
        ("fsdp.yaml", "FSDP", {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}),
    ],
)
def test_accelerate_config_files_load(name, distributed_type, settings):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / name))
    assert config.distributed_type.value == distributed_type
    assert not config.use_cpu and config.num_machines == 1
    plugin = config.deepspeed_config if distributed_type == "DEEPSPEED" else config.fsdp_config
    for key, value in settings.items():
        assert plugin[key] == value, key
