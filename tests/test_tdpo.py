"""TDPOTrainer: the loss against a dense float64 computation, reductions to DPO, drop-in behaviour, refusals."""

import math

import pytest
import torch
from conftest import build_model, build_tokenizer, cpu_args
from dense import assert_grads_close, dense_loss
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from trl_tokenpo import TDPOConfig, TDPOTrainer


def perturbed(model, scale=0.05, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)


def make_pair():
    tokenizer = build_tokenizer()
    ref = build_model(tokenizer, seed=0)
    policy = perturbed(build_model(tokenizer, seed=0))
    return tokenizer, policy, ref


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
def test_loss_and_gradient_match_dense_float64(tmp_path, standard_dataset, variant):
    tokenizer, policy, ref = make_pair()
    args = cpu_args(TDPOConfig, tmp_path, tdpo_variant=variant, alpha=0.7, beta=0.5)
    trainer = TDPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=standard_dataset, processing_class=tokenizer)
    batch = first_batch(trainer)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    want, policy64 = dense_loss(policy, ref, batch, beta=0.5, method="tdpo", alpha=0.7, variant=variant)
    want.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close(trainer.model, policy64)
    # the KL is not zero here: the policy was moved away from the reference
    assert trainer.metric_values("train")["kl/chosen"][-1] > 1e-4


def test_tdpo2_alpha_zero_equals_dpo_trainer(tmp_path, standard_dataset):
    tokenizer, policy, ref = make_pair()
    dpo = DPOTrainer(
        model=policy, ref_model=ref, args=cpu_args(DPOConfig, tmp_path / "dpo"), train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    tdpo = TDPOTrainer(
        model=policy, ref_model=ref, args=cpu_args(TDPOConfig, tmp_path / "tdpo", alpha=0.0),
        train_dataset=standard_dataset, processing_class=tokenizer,
    )
    batch = first_batch(dpo)
    torch.testing.assert_close(batch["input_ids"], first_batch(tdpo)["input_ids"])
    dpo_loss = dpo.compute_loss(dpo.model, batch)
    tdpo_loss = tdpo.compute_loss(tdpo.model, batch)
    torch.testing.assert_close(tdpo_loss, dpo_loss, rtol=1e-6, atol=1e-6)
    for key, values in dpo._metrics["train"].items():
        assert key in tdpo.metric_values("train"), key
        torch.testing.assert_close(
            torch.tensor(tdpo.metric_values("train")[key][-1]), torch.tensor(values[-1]), rtol=1e-5, atol=1e-5,
            msg=lambda m, k=key: f"{k}: {m}",
        )
    for key in ("kl/chosen", "kl/rejected", "kl/margin", "rewards_tdpo/chosen", "rewards_tdpo/rejected", "rewards_tdpo/accuracies"):
        assert key in tdpo.metric_values("train")


def test_plain_dpo_config_means_default_tdpo(tmp_path, standard_dataset):
    tokenizer, policy, ref = make_pair()
    trainer = TDPOTrainer(
        model=policy, ref_model=ref, args=cpu_args(DPOConfig, tmp_path), train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    assert trainer.method_args == {"alpha": 0.5, "tdpo_variant": "tdpo2"}
    loss = trainer.compute_loss(trainer.model, first_batch(trainer))
    assert math.isfinite(loss.item())


@pytest.mark.parametrize(
    "options, match",
    [
        ({"loss_type": ["ipo"]}, "loss_type"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]}, "loss_type"),
        ({"precompute_ref_log_probs": True}, "precompute_ref_log_probs"),
        ({"f_divergence_type": "js_divergence"}, "f_divergence_type"),
        ({"label_smoothing": 0.1}, "label_smoothing"),
        ({"tdpo_variant": "tdpo3"}, "tdpo_variant"),
        ({"alpha": -1.0}, "alpha"),
    ],
)
def test_refused_options(tmp_path, standard_dataset, options, match):
    tokenizer, policy, ref = make_pair()
    with pytest.raises(ValueError, match=match):
        TDPOTrainer(
            model=policy, ref_model=ref, args=cpu_args(TDPOConfig, tmp_path, **options), train_dataset=standard_dataset,
            processing_class=tokenizer,
        )


@pytest.mark.parametrize("options", [{"use_weighting": True}, {"ld_alpha": 0.5}, {"loss_weights": [2.0]}])
def test_composing_options_match_dense(tmp_path, standard_dataset, options):
    """Options that compose with TDPO change the loss the way DPOTrainer applies them to DPO."""
    tokenizer, policy, ref = make_pair()
    dpo = DPOTrainer(
        model=policy, ref_model=ref, args=cpu_args(DPOConfig, tmp_path / "d", **options), train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    tdpo = TDPOTrainer(
        model=policy, ref_model=ref, args=cpu_args(TDPOConfig, tmp_path / "t", alpha=0.0, **options),
        train_dataset=standard_dataset, processing_class=tokenizer,
    )
    batch = first_batch(dpo)
    torch.testing.assert_close(tdpo.compute_loss(tdpo.model, batch), dpo.compute_loss(dpo.model, batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dataset_fixture", ["standard_dataset", "conversational_dataset", "implicit_prompt_dataset"])
def test_dataset_formats_train(tmp_path, tiny_model_dir, dataset_fixture, request):
    dataset = request.getfixturevalue(dataset_fixture)
    trainer = TDPOTrainer(model=tiny_model_dir, args=cpu_args(TDPOConfig, tmp_path, max_steps=2), train_dataset=dataset)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(math.isfinite(entry["loss"]) for entry in logs)
    assert "kl/chosen" in logs[-1] and "rewards/accuracies" in logs[-1]


def test_training_improves_preferences(tmp_path, tiny_model_dir, standard_dataset):
    args = cpu_args(
        TDPOConfig, tmp_path, max_steps=30, learning_rate=5e-3, per_device_train_batch_size=8, beta=0.5,
        logging_steps=1,
    )
    trainer = TDPOTrainer(model=tiny_model_dir, args=args, train_dataset=standard_dataset)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    first, last = logs[:3], logs[-3:]
    assert sum(e["loss"] for e in last) / 3 < sum(e["loss"] for e in first) / 3 - 0.1
    assert sum(e["rewards/accuracies"] for e in last) / 3 > sum(e["rewards/accuracies"] for e in first) / 3
    assert last[-1]["rewards/accuracies"] == 1.0


def test_lora_trains_only_the_adapter_against_the_disabled_adapter_reference(tmp_path, tiny_model_dir, standard_dataset):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    args = cpu_args(TDPOConfig, tmp_path, max_steps=3, learning_rate=1e-2)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = TDPOTrainer(model=base, args=args, train_dataset=standard_dataset, peft_config=peft_config)
    assert trainer.ref_model is None
    batch = first_batch(trainer)
    # at initialization the adapter is zero, so the policy equals the reference: KL and log-ratios are exactly 0
    trainer.compute_loss(trainer.model, batch)
    assert abs(trainer.metric_values("train")["kl/chosen"][-1]) < 1e-6
    assert abs(trainer.metric_values("train")["rewards/margins"][-1]) < 1e-6
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if "lora_" in n}
    for name, param in trainer.model.get_base_model().named_parameters():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        torch.testing.assert_close(param.detach(), before[key], msg=f"frozen parameter {name} changed")
    assert any(
        not torch.equal(p, torch.zeros_like(p)) for n, p in trainer.model.named_parameters() if "lora_B" in n
    ), changed
    trainer.compute_loss(trainer.model, batch)
    assert trainer.metric_values("train")["kl/chosen"][-1] > 0


def test_gradient_accumulation_matches_full_batch(tmp_path, tiny_model_dir, standard_dataset):
    def run(out, **kw):
        # plain SGD: Adam's normalization would amplify float noise on near-zero gradients
        args = cpu_args(TDPOConfig, tmp_path / out, max_steps=2, learning_rate=0.5, optim="sgd", **kw)
        trainer = TDPOTrainer(model=tiny_model_dir, args=args, train_dataset=standard_dataset)
        trainer.train()
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    full = run("full", per_device_train_batch_size=8)
    accumulated = run("acc", per_device_train_batch_size=4, gradient_accumulation_steps=2)
    initial = TDPOTrainer(model=tiny_model_dir, args=cpu_args(TDPOConfig, tmp_path / "init"), train_dataset=standard_dataset)
    assert any(not torch.equal(full[n], p) for n, p in initial.model.named_parameters())
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-5, atol=1e-6)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_evaluate_save_load_and_resume(tmp_path, tiny_model_dir, standard_dataset):
    from transformers import AutoModelForCausalLM

    def make(out, **kw):
        options = dict(
            max_steps=4, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2, learning_rate=1e-2
        )
        args = cpu_args(TDPOConfig, tmp_path / out, **{**options, **kw})
        return TDPOTrainer(model=tiny_model_dir, args=args, train_dataset=standard_dataset, eval_dataset=standard_dataset)

    straight = make("straight")
    straight.train()
    metrics = straight.evaluate()
    for key in ("eval_loss", "eval_kl/chosen", "eval_rewards/accuracies", "eval_logps/chosen"):
        assert key in metrics and math.isfinite(metrics[key]), key

    interrupted = make("resumed")
    interrupted.add_callback(StopAt(2))  # a preempted job: same schedule, stopped after the first checkpoint
    interrupted.train()
    assert interrupted.state.global_step == 2
    resumed = make("resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")

    straight.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    for (name, a), (_, b) in zip(straight.model.named_parameters(), reloaded.named_parameters()):
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"{n}: {m}")


def test_vision_dataset_is_refused(tmp_path, standard_dataset):
    tokenizer, policy, ref = make_pair()
    dataset = standard_dataset.add_column("images", [[]] * len(standard_dataset))
    with pytest.raises(ValueError, match="vision"):
        TDPOTrainer(model=policy, ref_model=ref, args=cpu_args(TDPOConfig, tmp_path), train_dataset=dataset, processing_class=tokenizer)


def test_logged_sequence_kl_is_clamped_at_zero():
    # float32 rounding can leave the KL of a policy at the reference a few 1e-7 below 0; the log never shows a KL < 0
    metrics = {}
    TDPOTrainer._log_kl_metrics(None, metrics, torch.tensor([-2.7e-6, 2.0, -1e-7, 0.5]))
    torch.testing.assert_close(metrics["kl/chosen"], torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(metrics["kl/rejected"], torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(metrics["kl/margin"], torch.tensor([0.0, 1.5]))
