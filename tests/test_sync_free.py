"""The token-level trainers' steps never make the host wait for the device before the backward is queued.

On CPU the ops that synchronize on CUDA are counted (`host_sync.SyncCounter`); on CUDA the same code runs under
`torch.cuda.set_sync_debug_mode("error")`. The logged values stay those recorded before the change
(tests/data/metric_logs.json, see tests/metric_logs.py).
"""

import json
import math
import os

import pytest
import torch
from conftest import build_model, build_tokenizer, cpu_args, preference_rows
from datasets import Dataset
from host_sync import SyncCounter, count_step_syncs
from kernel_reference import (
    DIFFERENTIABLE,
    assert_close,
    coefficients,
    combination,
    dense_head_stats,
    make_inputs,
)
from metric_logs import CASES, run_case
from peft import LoraConfig
from test_tisdpo import with_token_columns
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from trl_tokenpo import DataCollatorForTokenPreference, TDPOConfig, TDPOTrainer, TISDPOConfig, TISDPOTrainer
from trl_tokenpo.data import LAYOUT_KEY, BatchLayout
from trl_tokenpo.kernels import fused_token_stats, tiles_triton
from trl_tokenpo.trainer.sync_free import (
    DeviceValue,
    known_padding,
    ratio_or_zero,
    read_device_values,
    resolve_metrics,
    value_if_positive,
)


LORA = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
# (trainer, config, options, per-token columns): every variant of both trainers
VARIANTS = {
    "tdpo1": (TDPOTrainer, TDPOConfig, {"tdpo_variant": "tdpo1"}, None),
    "tdpo2": (TDPOTrainer, TDPOConfig, {}, None),
    "tdpo2-ld-wpo": (TDPOTrainer, TDPOConfig, {"ld_alpha": 0.5, "use_weighting": True}, None),
    "tisdpo-none": (TISDPOTrainer, TISDPOConfig, {}, "rewards"),
    "tisdpo-none-weights": (TISDPOTrainer, TISDPOConfig, {}, "weights"),
    "tisdpo-none-precomputed": (TISDPOTrainer, TISDPOConfig, {"precompute_ref_log_probs": True}, "rewards"),
    "tisdpo-reverse": (TISDPOTrainer, TISDPOConfig, {"tis_kl_term": "reverse", "weight_transform": "rank"}, "rewards"),
    "tisdpo-tdpo": (TISDPOTrainer, TISDPOConfig, {"tis_kl_term": "tdpo", "normalize_weights": True}, "rewards"),
}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


def lora_trainer(model_dir, output_dir, variant, **options):
    trainer_class, config_class, variant_options, columns = VARIANTS[variant]
    tokenizer = build_tokenizer()
    dataset = Dataset.from_list(preference_rows(16))
    if columns:
        dataset = with_token_columns(dataset, tokenizer, kind=columns)
    options = {"max_steps": 3, "logging_steps": 3, **variant_options, **options}
    args = cpu_args(config_class, output_dir, **options)
    return trainer_class(
        model=model_dir, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=LoraConfig(**LORA)
    )


# ----------------------------------------------------------------------------------------------------------------------
# Counting on CPU
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dpo_counts(model_dir, tmp_path_factory):
    tokenizer = build_tokenizer()
    args = cpu_args(DPOConfig, tmp_path_factory.mktemp("dpo"), max_steps=3, logging_steps=3)
    trainer = DPOTrainer(
        model=model_dir, args=args, train_dataset=Dataset.from_list(preference_rows(16)), processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )  # fmt: skip
    return count_step_syncs(trainer, steps=(2,)).counts


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_no_sync_before_the_backward(model_dir, tmp_path, variant, dpo_counts, one_thread):
    trainer = lora_trainer(model_dir, tmp_path, variant)
    counter = count_step_syncs(trainer, steps=(2,))
    # Nothing inside compute_loss (forward, loss, metrics); in the whole optimizer step only transformers' own
    # NaN/inf check of the loss (`logging_nan_inf_filter`), after the backward
    assert counter.counts["compute_loss"] == 0, counter.report("compute_loss")
    assert counter.counts["step"] <= 2, counter.report("step")
    assert all("trl_tokenpo/" not in site for site in counter.sites["step"]), counter.report("step")
    # trl.DPOTrainer reads ~20 values per step in its loss; the whole run (3 steps, a log, the end) reads fewer here
    assert dpo_counts["compute_loss"] >= 15
    assert counter.counts["step"] < dpo_counts["step"]
    assert counter.counts["train"] < dpo_counts["train"]


def test_padding_free_batches_do_not_read_the_attention_mask(model_dir, tmp_path, one_thread):
    # Rows of one length: no padding, which the host knows, so SDPA's is_causal path is taken without a check
    trainer = lora_trainer(model_dir, tmp_path, "tdpo2")
    rows = [{"prompt": "what is the sky ?", "chosen": " the sky is blue .", "rejected": " the sky is red ."}] * 4
    trainer.train_dataset = trainer._prepare_dataset(Dataset.from_list(rows), trainer.processing_class, trainer.args, "train")
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert not batch[LAYOUT_KEY].padded
    counter = SyncCounter()
    with counter, counter.patched_host_reads(), counter.window("loss"):
        trainer.compute_loss(trainer.model, batch)
    assert counter.counts["loss"] == 0, counter.report("loss")


# ----------------------------------------------------------------------------------------------------------------------
# Same values as before
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded_logs():
    with open(os.path.join(os.path.dirname(__file__), "data", "metric_logs.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("case", list(CASES))
def test_logged_values_equal_the_recorded_ones(tmp_path, case, recorded_logs, one_thread):
    logs = run_case(case, str(tmp_path))
    recorded = recorded_logs[case]
    assert [sorted(entry) for entry in logs] == [sorted(entry) for entry in recorded]
    for step, (entry, expected) in enumerate(zip(logs, recorded)):
        for key, value in expected.items():
            # Recorded on another machine: float32 reductions may round differently in the last bits
            assert entry[key] == pytest.approx(value, rel=1e-6, abs=1e-7), (case, step, key)


def test_device_values_read_exactly_what_item_reads():
    values = torch.tensor([0.1, 1 / 3, 7.0], dtype=torch.float32)
    count = torch.tensor(3, dtype=torch.int64)
    big = torch.tensor(2**40 + 1, dtype=torch.int64)
    pending = [
        DeviceValue(values.sum()),
        ratio_or_zero(values.sum(), values[2]),
        ratio_or_zero(values.sum(), torch.tensor(0.0)),
        value_if_positive(values.mean(), count),
        value_if_positive(values.mean(), torch.tensor(0)),
        DeviceValue(big, combine=lambda n: n + 1),
        2.5,
    ]
    expected = [
        values.sum().item(),
        values.sum().item() / values[2].item(),
        0.0,
        values.mean().item(),
        0.0,
        float(2**40 + 2),
        2.5,
    ]
    assert read_device_values(pending) == expected
    assert float(pending[1]) == expected[1]
    metrics = {"a": [pending[0], 1.0], "b": [pending[3]]}
    counter = SyncCounter()
    with counter, counter.patched_host_reads(), counter.window("read"):
        resolve_metrics(metrics)
    assert metrics == {"a": [expected[0], 1.0], "b": [expected[3]]}
    assert counter.counts["read"] == 1  # one transfer for all of them
    with pytest.raises(ValueError, match="one-element"):
        DeviceValue(values)


# ----------------------------------------------------------------------------------------------------------------------
# The pieces: the host-side layout, the attention mask, the kernel's backward
# ----------------------------------------------------------------------------------------------------------------------


def test_collator_builds_the_layout_on_the_host():
    collator = DataCollatorForTokenPreference(pad_token_id=0, max_length=6, truncation_mode="keep_start")
    examples = [
        {"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5], "rejected_ids": [6]},
        {"prompt_ids": [7], "chosen_ids": [8, 9, 10, 11, 12, 13], "rejected_ids": [14, 15]},
    ]
    batch = collator(examples)
    layout = batch[LAYOUT_KEY]
    mask = batch["completion_mask"][:, 1:] != 0
    assert torch.equal(layout.index, mask.reshape(-1).nonzero().squeeze(1))
    assert (layout.rows, layout.columns) == tuple(mask.shape)
    assert layout.num_chosen == int(mask[:2].sum()) == 3 + 5  # the second chosen row is cut at max_length
    assert layout.padded and layout.matches(batch["input_ids"])
    assert layout.to("cpu") is layout
    full = collator([{"prompt_ids": [1], "chosen_ids": [2, 3], "rejected_ids": [4, 5]}])[LAYOUT_KEY]
    assert not full.padded
    assert LAYOUT_KEY not in DataCollatorForTokenPreference(pad_token_id=0, batch_layout=False)(examples)


def test_known_padding_builds_the_same_mask_without_reading_it():
    tokenizer = build_tokenizer()
    model = build_model(tokenizer).eval()
    input_ids = torch.randint(7, len(tokenizer), (3, 9), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    attention_mask[2, 4:] = 0
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
        counter = SyncCounter()
        with counter, counter.patched_host_reads(), counter.window("forward"), known_padding(True):
            padded = model(input_ids=input_ids, attention_mask=attention_mask).logits
        ones = torch.ones_like(input_ids)
        unpadded_expected = model(input_ids=input_ids, attention_mask=ones).logits
        with counter, counter.window("unpadded"), known_padding(False):
            unpadded = model(input_ids=input_ids, attention_mask=ones).logits
    assert counter.counts["forward"] == 0 and counter.counts["unpadded"] == 0, counter.report("forward")
    assert torch.equal(padded, expected)
    assert torch.equal(unpadded, unpadded_expected)
    from transformers import masking_utils

    assert "sdpa" not in masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._local_mapping  # the override is gone


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("rows", [(3, 6), (0, 6), (2, 4), (6, 6)])
def test_kl_gradient_rows(backend, rows, monkeypatch):
    # Gradients of the KL reach only rows[0]:rows[1] (TDPO2: the rejected half); the backward projects the reference
    # for those rows only, and the gradients equal the dense float64 ones
    if backend == "triton":
        if not tiles_triton.available() or not (tiles_triton.interpreted() or torch.cuda.is_available()):
            pytest.skip("needs triton (interpreter or CUDA)")
        monkeypatch.setattr(tiles_triton, "MAX_ROWS", 4)
        monkeypatch.setattr(tiles_triton, "BLOCK_SIZE", 8)
    n = 6
    inputs = make_inputs(n=n, h=8, v=29, h_ref=6, seed=22)
    device = "cuda" if backend == "triton" and not tiles_triton.interpreted() else "cpu"
    device_inputs = [None if t is None else t.detach().to(device).requires_grad_(t.requires_grad) for t in inputs]
    out = fused_token_stats(
        *device_inputs, backend=backend, outputs=("forward_kl", "reverse_kl"), tile_elements=48, kl_gradient_rows=rows
    )
    keep = (torch.arange(n) >= rows[0]) & (torch.arange(n) < rows[1])
    coefs = coefficients(n, DIFFERENTIABLE, seed=3)
    coefs["forward_kl"] = coefs["forward_kl"] * keep
    coefs["reverse_kl"] = coefs["reverse_kl"] * keep
    grads = torch.autograd.grad(
        combination(out, {k: v.to(device) for k, v in coefs.items()}, torch.float32), device_inputs[:3]
    )
    expected, leaves = dense_head_stats(inputs)
    expected_grads = torch.autograd.grad(combination(expected, coefs, torch.float64), leaves)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close(grad.cpu(), expected_grad)
    with pytest.raises(ValueError, match="kl_gradient_rows"):
        fused_token_stats(*device_inputs, backend=backend, kl_gradient_rows=(4, 2))


def test_triton_backward_reads_nothing_back():
    # The host code of the Triton backend (tile loop, reference spans) reads no tensor value; the interpreter's own
    # copies of the tiles (CPU only) are not counted
    if not tiles_triton.available() or not tiles_triton.interpreted():
        pytest.skip("needs Triton's interpreter")
    inputs = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in make_inputs(n=6, h=8, v=29, h_ref=6)]
    counter = SyncCounter()
    with counter, counter.patched_host_reads(), counter.window("triton"):
        out = fused_token_stats(*inputs, backend="triton", outputs=("forward_kl",), kl_gradient_rows=(3, 6))
        torch.autograd.grad(out.policy_logps.sum() + out.forward_kl.sum(), inputs[:2])
    ours = {site: n for site, n in counter.sites["triton"].items() if "trl_tokenpo/" in site}
    assert not ours, ours


# ----------------------------------------------------------------------------------------------------------------------
# Fallbacks: a collator that builds no layout
# ----------------------------------------------------------------------------------------------------------------------


def test_without_a_layout_the_loss_is_the_same(model_dir, tmp_path, one_thread):
    trainer = lora_trainer(model_dir, tmp_path, "tdpo2")
    assert isinstance(trainer.data_collator, DataCollatorForTokenPreference)  # TDPO's default collator builds layouts
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    without = {k: v for k, v in batch.items() if k != LAYOUT_KEY}
    expected = trainer.compute_loss(trainer.model, batch)
    # the layout is then read back from the device (with a warning on GPUs): same positions, same loss
    assert torch.equal(trainer.compute_loss(trainer.model, without), expected)
    assert torch.equal(BatchLayout.from_batch(without).index, batch[LAYOUT_KEY].index)


def test_a_plain_trl_collator_is_kept_and_trains(model_dir, tmp_path, one_thread):
    tokenizer = build_tokenizer()
    collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)
    trainer = TDPOTrainer(
        model=model_dir, args=cpu_args(TDPOConfig, tmp_path, max_steps=2), processing_class=tokenizer,
        train_dataset=Dataset.from_list(preference_rows(16)), peft_config=LoraConfig(**LORA), data_collator=collator,
    )  # fmt: skip
    assert trainer.data_collator is collator
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


def test_dispatched_batches_leave_the_layout_out(model_dir, tmp_path, monkeypatch):
    # accelerate's DataLoaderDispatcher (iterable datasets on several processes) cannot carry a BatchLayout
    from accelerate.data_loader import DataLoaderDispatcher

    trainer = lora_trainer(model_dir, tmp_path, "tdpo2")
    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: 2))
    dispatcher = DataLoaderDispatcher.__new__(DataLoaderDispatcher)
    assert trainer._check_layout_transport(dispatcher) is dispatcher
    assert trainer.data_collator.batch_layout is False


# ----------------------------------------------------------------------------------------------------------------------
# On CUDA: torch raises on any synchronization
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cuda_loss_and_backward_never_synchronize(model_dir, tmp_path, variant):
    trainer = lora_trainer(model_dir, tmp_path, variant, use_cpu=False, bf16=True)
    trainer.model.train()
    for step, batch in enumerate(trainer.get_train_dataloader()):
        batch = trainer._prepare_inputs(batch)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = trainer.compute_loss(trainer.model, batch)
            trainer.accelerator.backward(loss)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert math.isfinite(loss.item())
        if step == 1:
            break
    logged = trainer.metric_values("train")
    assert all(isinstance(v, float) for values in logged.values() for v in values)
