"""Worker launched by tests/test_distributed.py with `torchrun --nproc_per_node N` (gloo, CPU).

Runs, in one process group, one optimizer step of each trainer case on a fixed global batch and (if the estimator is
importable) the "prompt" method of the estimator, and writes on rank 0:

    <out>/<case>.json   the logged metrics of the step (`state.log_history`)
    <out>/<case>.pt     the parameters after the step
    <out>/estimator.json  the token rewards row by row

The dataset has exactly `global_batch` rows, so the first step sees every row whatever the sampler's order, and every
quantity compared (mean loss, gathered metrics, averaged gradient) does not depend on the order of rows in a batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from conftest import cpu_args, preference_rows  # noqa: E402
from datasets import Dataset  # noqa: E402

from trl_tokenpo import TDPOConfig, TDPOTrainer, TISDPOConfig, TISDPOTrainer  # noqa: E402
from trl_tokenpo.data import tokenize_preference_dataset  # noqa: E402


CASES = ("tdpo", "tisdpo_none", "tisdpo_tdpo")


def weighted(dataset, tokenizer):
    """Deterministic non-uniform weights aligned with TRL's tokenization."""
    ids = tokenize_preference_dataset(dataset, tokenizer)

    def values(rows, shift):
        return [[0.3 + ((7 * i + 3 * r + shift) % 5) / 4 for i in range(len(x))] for r, x in enumerate(rows)]

    return dataset.add_column("chosen_weights", values(ids["chosen_ids"], 0)).add_column(
        "rejected_weights", values(ids["rejected_ids"], 2)
    )


def run_case(case, model_dir, out, global_batch, world_size, rank):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = Dataset.from_list(preference_rows(global_batch))
    common = dict(
        max_steps=1, optim="sgd", learning_rate=0.5, per_device_train_batch_size=global_batch // world_size, beta=0.5
    )
    output_dir = out / f"run-{case}"
    if case == "tdpo":
        args = cpu_args(TDPOConfig, output_dir, alpha=0.7, **common)
        trainer = TDPOTrainer(model=model_dir, args=args, train_dataset=dataset, processing_class=tokenizer)
    else:
        kl_term = case.split("_")[1]
        args = cpu_args(TISDPOConfig, output_dir, tis_kl_term=kl_term, alpha=0.6, **common)
        trainer = TISDPOTrainer(
            model=model_dir, args=args, train_dataset=weighted(dataset, tokenizer), processing_class=tokenizer
        )
    assert trainer.accelerator.num_processes == world_size, trainer.accelerator.num_processes
    trainer.train()
    if rank == 0:
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        (out / f"{case}.json").write_text(json.dumps({"world_size": world_size, "logs": logs}))
        params = {n: p.detach().cpu().clone() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}
        torch.save(params, out / f"{case}.pt")
    trainer.accelerator.wait_for_everyone()


def run_estimator(model_dir, out, global_batch, world_size, rank):
    try:
        from trl_tokenpo.estimator import ContrastiveWeightEstimator, WeightEstimatorConfig
    except Exception as exc:  # the estimator is optional for this worker
        if rank == 0:
            (out / "estimator.json").write_text(json.dumps({"skipped": f"{type(exc).__name__}: {exc}"}))
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # 2 rows per shard and 2 rows per forward pass: each rank scores several shards
    args = WeightEstimatorConfig(
        str(out / "estimator"), method="prompt", use_cpu=True, report_to="none", disable_tqdm=True,
        scoring_batch_size=2, cache_shard_size=2,
    )  # fmt: skip
    dataset = Dataset.from_list(preference_rows(global_batch + 3))  # a last shard with one row
    estimator = ContrastiveWeightEstimator(model, tokenizer, args=args)
    result = estimator.estimate(dataset)
    (out / f"estimator-shards-rank{rank}.json").write_text(json.dumps(estimator.stats["scored_shards"]))
    if rank == 0:
        rows = result.select_columns(["chosen_token_rewards", "rejected_token_rewards"]).to_dict()
        (out / "estimator.json").write_text(json.dumps({"world_size": world_size, "rows": rows}))


def run_fsdp2(model_dir, out, world_size, rank):
    """The fused kernel under FSDP2 (`fully_shard`, gloo on CPU): loss and gradients against the unsharded models.

    Every rank gets the same batch, so FSDP2's averaged gradient equals the single-model gradient. Two layouts:
    "root" (one unit per decoder layer plus the root, as accelerate's TRANSFORMER_BASED_WRAP; the reference is one
    root unit, as TRL's `prepare_fsdp`) reads plain unsharded heads inside the root forward; "lm_head" (the heads are
    their own units) hands the kernel DTensor heads, which it gathers with `full_tensor()`.
    """
    import copy

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from trl_tokenpo.kernels import TokenStatsRequest, add_token_stats_head

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (world_size,))
    ref = AutoModelForCausalLM.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    input_ids = torch.randint(7, policy.config.vocab_size, (3, 9), generator=generator)
    labels = input_ids.clone()
    labels[:, :4] = -100
    labels[1, 7:] = -100

    def loss_and_grads(policy, ref):
        add_token_stats_head(policy)
        add_token_stats_head(ref)
        for _ in range(2):  # twice: the second step runs on resharded parameters
            policy.zero_grad(set_to_none=True)
            with torch.no_grad():
                reference = ref(input_ids=input_ids, token_stats=TokenStatsRequest(labels=labels))
            outputs = policy(
                input_ids=input_ids,
                token_stats=TokenStatsRequest(labels=labels, reference=reference, outputs=("forward_kl", "reverse_kl")),
            )
            loss = outputs.policy_logps.sum() - outputs.forward_kl.sum() + 0.3 * outputs.reverse_kl.sum()
            loss.backward()
        grads = {}
        for name, p in policy.named_parameters():
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            grads[name] = grad.detach().clone()
        return loss.detach(), grads, type(reference.weight).__name__

    want, want_grads, _ = loss_and_grads(copy.deepcopy(policy), copy.deepcopy(ref))
    result = {"world_size": world_size}
    for layout in ("root", "lm_head"):
        sharded_policy, sharded_ref = copy.deepcopy(policy), copy.deepcopy(ref)
        for layer in sharded_policy.model.layers:
            fully_shard(layer, mesh=mesh)
        if layout == "lm_head":
            fully_shard(sharded_policy.lm_head, mesh=mesh)
            fully_shard(sharded_ref.lm_head, mesh=mesh)
        fully_shard(sharded_policy, mesh=mesh)
        fully_shard(sharded_ref, mesh=mesh)
        loss, grads, ref_weight_type = loss_and_grads(sharded_policy, sharded_ref)
        result[layout] = {
            "loss": loss.item(),
            "want": want.item(),
            "max_grad_diff": max((grads[n] - want_grads[n]).abs().max().item() for n in want_grads),
            "max_grad": max(g.abs().max().item() for g in want_grads.values()),
            "ref_weight_type": ref_weight_type,
        }
    if rank == 0:
        (out / "fsdp2.json").write_text(json.dumps(result))
    dist.barrier()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--cases", default=",".join(CASES + ("fsdp2", "estimator")))
    cli = parser.parse_args()
    torch.set_num_threads(1)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)
    for case in cli.cases.split(","):
        if case == "fsdp2":
            run_fsdp2(cli.model, out, world_size, rank)
        elif case == "estimator":
            run_estimator(cli.model, out, cli.global_batch, world_size, rank)
        else:
            run_case(case, cli.model, out, cli.global_batch, world_size, rank)


if __name__ == "__main__":
    main()
