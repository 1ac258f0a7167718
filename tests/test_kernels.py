"""Tests of trl_tokenpo.kernels (torch backend): the fused token-statistics function and the model patch.

Every reference value is an independent dense computation (``kernel_reference``): full ``[N, V]`` logits in float64,
``log_softmax``, sums.
"""

import copy

import pytest
import torch
from kernel_reference import (
    DIFFERENTIABLE,
    VOCAB,
    assert_close,
    coefficients,
    combination,
    dense_from_logits,
    dense_head_stats,
    dense_model_stats,
    grads_of,
    loss_of,
    make_batch,
    make_inputs,
    perturbed_copy,
    run_token_stats,
    tiny_qwen,
    transform,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import MixtralConfig, MixtralForCausalLM

from trl_tokenpo.kernels import (
    OPTIONAL_OUTPUTS,
    ReferenceHidden,
    TokenStats,
    TokenStatsRequest,
    add_token_stats_head,
    fused_token_stats,
)


# ----------------------------------------------------------------------------------------------------------------------
# The function against the dense computation
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy_scale, policy_softcap, ref_scale, ref_softcap, bias",
    [
        (1.0, None, 1.0, None, True),
        (1.0, None, 1.0, None, False),
        (0.5, 4.0, 1.0, None, True),
        (1.0, None, 2.0, 3.0, False),
        (1.7, 2.5, 0.8, 6.0, True),
    ],
)
def test_values_and_gradients_match_dense(policy_scale, policy_softcap, ref_scale, ref_softcap, bias):
    inputs = make_inputs(bias=bias)
    hp, w, b = inputs[:3]
    v = w.shape[0]
    # 5 rows per tile: 8 tiles for 37 tokens, the last one partial
    out = fused_token_stats(
        *inputs,
        policy_logit_scale=policy_scale,
        policy_softcap=policy_softcap,
        ref_logit_scale=ref_scale,
        ref_softcap=ref_softcap,
        outputs=OPTIONAL_OUTPUTS,
        tile_elements=5 * v + 3,
    )
    expected, leaves = dense_head_stats(inputs, policy_scale, policy_softcap, ref_scale, ref_softcap)
    for name in (
        "policy_logps",
        "ref_logps",
        "forward_kl",
        "reverse_kl",
        "entropy",
        "mean_logits",
        "log_sum_sq_probs",
    ):
        value = getattr(out, name)
        assert value.dtype == torch.float32 and value.shape == (hp.shape[0],), name
        assert_close(value, expected[name])
    assert torch.equal(out.is_top1, expected["is_top1"])

    coefs = coefficients(hp.shape[0], DIFFERENTIABLE)
    params = [t for t in (hp, w, b) if t is not None]
    grads = torch.autograd.grad(combination(out, coefs, torch.float32), params)
    expected_grads = torch.autograd.grad(
        combination(expected, coefs, torch.float64), [t for t in leaves if t is not None]
    )
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == torch.float32
        assert_close(grad, expected_grad)


@pytest.mark.parametrize(
    "outputs",
    [(), ("forward_kl",), ("reverse_kl",), ("entropy", "is_top1"), ("reverse_kl", "forward_kl", "mean_logits")],
)
@pytest.mark.parametrize("loss_terms", [("policy_logps",), ("forward_kl",), ("reverse_kl",), DIFFERENTIABLE])
def test_output_subsets(outputs, loss_terms):
    inputs = make_inputs(n=23, v=64, seed=3)
    hp, w, b = inputs[:3]
    out = fused_token_stats(*inputs, outputs=outputs, tile_elements=64 * 4)
    expected, leaves = dense_head_stats(inputs)
    for name in OPTIONAL_OUTPUTS:
        assert (getattr(out, name) is None) == (name not in outputs), name
    assert_close(out.policy_logps, expected["policy_logps"])
    assert_close(out.ref_logps, expected["ref_logps"])
    for name in outputs:
        if name == "is_top1":
            assert torch.equal(out.is_top1, expected["is_top1"])
        else:
            assert_close(getattr(out, name), expected[name])

    # Only the terms that were computed can enter the loss; the others receive no gradient at all
    terms = tuple(name for name in loss_terms if getattr(out, name) is not None)
    if not terms:
        return
    coefs = coefficients(hp.shape[0], terms, seed=7)
    grads = torch.autograd.grad(combination(out, coefs, torch.float32), [hp, w, b])
    expected_grads = torch.autograd.grad(combination(expected, coefs, torch.float64), leaves)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close(grad, expected_grad)


def test_metrics_and_reference_logps_are_not_differentiable():
    out = fused_token_stats(*make_inputs(), outputs=OPTIONAL_OUTPUTS)
    for name in DIFFERENTIABLE:
        assert getattr(out, name).requires_grad, name
    for name in ("ref_logps", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs"):
        assert not getattr(out, name).requires_grad, name
    assert out.is_top1.dtype == torch.bool


def test_is_top1_takes_the_first_argmax():
    # Identity head: the logits are the hidden states themselves
    v = 5
    logits = torch.tensor(
        [
            [1.0, 3.0, 3.0, 0.0, 0.0],  # label 1: tied with a LATER token, first argmax -> top-1
            [1.0, 3.0, 3.0, 0.0, 0.0],  # label 2: tied with an EARLIER token -> not top-1
            [1.0, 3.0, 3.0, 0.0, 0.0],  # label 0: not a maximum
            [0.0, 0.0, 0.0, 0.0, 2.0],  # label 4: unique maximum
            [2.0, 2.0, 2.0, 2.0, 2.0],  # label 0: all tied, the first one wins
            [2.0, 2.0, 2.0, 2.0, 2.0],  # label 3: all tied
        ]
    )
    labels = torch.tensor([1, 2, 0, 4, 0, 3])
    eye = torch.eye(v)
    out = fused_token_stats(logits, eye, None, logits, eye, None, labels, outputs=("is_top1",), tile_elements=2 * v)
    assert out.is_top1.tolist() == [True, False, False, True, True, False]


def test_same_parameter_as_policy_and_reference_head():
    # PEFT without a separate reference: both sides read the very same lm_head parameter
    hp, w, b, _, _, _, labels = make_inputs(h_ref=16, seed=5)
    hr = torch.randn_like(hp).requires_grad_()  # the function must not send it a gradient either
    out = fused_token_stats(hp, w, b, hr, w, b, labels, outputs=("forward_kl", "reverse_kl"), tile_elements=300)
    coefs = coefficients(hp.shape[0], DIFFERENTIABLE)
    combination(out, coefs, torch.float32).backward()
    assert hr.grad is None

    # Dense: the reference logits come from a detached copy of the same weights
    hp64, w64, b64 = (t.detach().double().requires_grad_() for t in (hp, w, b))
    z_ref = (hr.detach().double() @ w64.T + b64).detach()
    expected = dense_from_logits(hp64 @ w64.T + b64, z_ref, labels)
    combination(expected, coefs, torch.float64).backward()
    for name in DIFFERENTIABLE:
        assert_close(getattr(out, name), expected[name])
    assert_close(hp.grad, hp64.grad)
    assert_close(w.grad, w64.grad)
    assert_close(b.grad, b64.grad)


def test_bf16_autocast_on_cpu():
    inputs = make_inputs(seed=11)
    hp, w, b = inputs[:3]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_token_stats(*inputs, outputs=OPTIONAL_OUTPUTS, tile_elements=600)
    expected, leaves = dense_head_stats(inputs)
    for name in (
        "policy_logps",
        "ref_logps",
        "forward_kl",
        "reverse_kl",
        "entropy",
        "mean_logits",
        "log_sum_sq_probs",
    ):
        value = getattr(out, name)
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value.double(), expected[name], rtol=0.05, atol=0.1)
    coefs = coefficients(hp.shape[0], DIFFERENTIABLE)
    grads = torch.autograd.grad(combination(out, coefs, torch.float32), [hp, w, b])
    expected_grads = torch.autograd.grad(combination(expected, coefs, torch.float64), leaves)
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == torch.float32
        scale = expected_grad.abs().max().item()
        torch.testing.assert_close(grad.double(), expected_grad, rtol=0.05, atol=0.05 * scale)


def test_bf16_tensors_give_float32_outputs():
    hp, w, b, hr, wr, br, labels = make_inputs(seed=12)
    hp16, w16, b16 = (t.detach().bfloat16().requires_grad_() for t in (hp, w, b))
    out = fused_token_stats(
        hp16, w16, b16, hr.bfloat16(), wr.bfloat16(), br.bfloat16(), labels, outputs=OPTIONAL_OUTPUTS
    )
    expected, _ = dense_head_stats((hp16, w16, b16, hr.bfloat16(), wr.bfloat16(), br.bfloat16(), labels))
    assert all(getattr(out, name).dtype == torch.float32 for name in DIFFERENTIABLE)
    # The bf16 logits are rounded once, then all the statistics are exact float32
    torch.testing.assert_close(out.forward_kl.double(), expected["forward_kl"], rtol=0.05, atol=0.05)
    (out.policy_logps.sum() + out.forward_kl.sum()).backward()
    assert hp16.grad.dtype == w16.grad.dtype == b16.grad.dtype == torch.bfloat16


def test_no_scored_token():
    hp, w, b, hr, wr, br, labels = make_inputs()
    out = fused_token_stats(hp[:0], w, b, hr[:0], wr, br, labels[:0], outputs=OPTIONAL_OUTPUTS)
    assert out.policy_logps.shape == (0,)
    grads = torch.autograd.grad((out.policy_logps.sum() + out.forward_kl.sum() + out.reverse_kl.sum()), [w, b])
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_rejects_unknown_outputs():
    with pytest.raises(ValueError, match="Unknown token statistics"):
        fused_token_stats(*make_inputs(), outputs=("kl",))


def test_backend_choice(monkeypatch):
    from trl_tokenpo.kernels import function, resolve_backend, tiles_triton

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cuda) == "torch"
    monkeypatch.setattr(tiles_triton, "available", lambda: True)
    assert resolve_backend("auto", cuda) == "triton"
    monkeypatch.setattr(tiles_triton, "interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", cpu)
    monkeypatch.setattr(tiles_triton, "interpreted", lambda: True)
    monkeypatch.setattr(tiles_triton, "version", lambda: (3, 6))
    with pytest.raises(RuntimeError, match="interpreter from release 3.7"):
        resolve_backend("triton", cpu)
    monkeypatch.undo()
    # Without triton, or with a release older than the kernels are checked with, "auto" takes the torch tiles
    for found in (None, (3, 2)):
        monkeypatch.setattr(tiles_triton, "version", lambda found=found: found)
        assert not tiles_triton.available()
        assert resolve_backend("auto", cuda) == "torch"
        with pytest.raises(ImportError, match="pip install triton"):
            fused_token_stats(*make_inputs(), backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_token_stats(*make_inputs(), backend="cuda")
    # "auto" on CPU tensors runs the torch tiles
    def torch_tiles(*args):
        raise RuntimeError("torch tiles called")

    monkeypatch.setattr(function.tiles_torch, "forward", torch_tiles)
    with pytest.raises(RuntimeError, match="torch tiles called"):
        fused_token_stats(*make_inputs())


def test_imports_and_runs_without_triton():
    # `triton` is an optional dependency: hidden from the interpreter, the package imports, "auto" runs the torch tiles
    # and "triton" says what to install
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from trl_tokenpo import TDPOTrainer  # noqa\n"
        "from trl_tokenpo.kernels import fused_token_stats, tiles_triton\n"
        "assert not tiles_triton.available()\n"
        "h, w, y = torch.randn(5, 4), torch.randn(11, 4), torch.randint(0, 11, (5,))\n"
        "out = fused_token_stats(h, w, None, h, w, None, y, outputs=('reverse_kl',))\n"
        "assert out.reverse_kl.abs().max() < 1e-5\n"
        "try:\n"
        "    fused_token_stats(h, w, None, h, w, None, y, backend='triton')\n"
        "except ImportError as error:\n"
        "    print('refused:', error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused: backend='triton' needs the `triton` package" in result.stdout


class _TensorSizeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns (views included)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        self.shapes.extend(tuple(t.shape) for t in tree_leaves(result) if isinstance(t, torch.Tensor))
        return result

    def max_numel(self):
        return max(torch.Size(shape).numel() for shape in self.shapes)


def test_never_materializes_more_than_one_tile():
    n, h, v, budget = 400, 8, 1000, 10_000  # 10 rows per tile; N * V = 400_000
    inputs = make_inputs(n=n, h=h, v=v, h_ref=h, seed=13)
    hp, w, b = inputs[:3]
    recorder = _TensorSizeRecorder()
    with recorder:
        out = fused_token_stats(*inputs, outputs=OPTIONAL_OUTPUTS, tile_elements=budget)
        loss = out.policy_logps.sum() + out.forward_kl.sum() + out.reverse_kl.sum()
        torch.autograd.grad(loss, [hp, w, b])
    # The largest tensors are the [10, V] tiles and the [V, H] weight gradient (8_000 elements)
    assert n * v >= 40 * budget
    assert recorder.max_numel() <= budget
    assert (budget // v, v) in recorder.shapes


# ----------------------------------------------------------------------------------------------------------------------
# The model patch
# ----------------------------------------------------------------------------------------------------------------------

def test_reference_mode_returns_hidden_rows_without_projecting():
    model = tiny_qwen()
    add_token_stats_head(model)
    input_ids, attention_mask, labels = make_batch()
    recorder = _TensorSizeRecorder()
    with recorder:
        reference = model(input_ids=input_ids, attention_mask=attention_mask, token_stats=TokenStatsRequest(labels))
    assert isinstance(reference, ReferenceHidden)
    mask = labels[:, 1:] != -100
    assert torch.equal(reference.mask, mask)
    assert reference.hidden.shape == (int(mask.sum()), model.config.hidden_size)
    assert not reference.hidden.requires_grad
    assert reference.weight is model.lm_head.weight
    assert (reference.logit_scale, reference.softcap) == (1.0, None)
    # No op produced anything with a vocabulary dimension (the LM head was never applied)
    assert not any(VOCAB in shape for shape in recorder.shapes)
    # The hidden states are the backbone's, at the scored positions
    expected = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1][mask]
    assert_close(reference.hidden, expected, atol=1e-6)


def test_policy_mode_matches_dense_forwards():
    model = tiny_qwen()
    reference_model = perturbed_copy(model)
    batch = make_batch()
    dense_model, dense_reference = copy.deepcopy(model), copy.deepcopy(reference_model)
    add_token_stats_head(model)
    add_token_stats_head(reference_model)

    _, out = run_token_stats(model, reference_model, batch, outputs=OPTIONAL_OUTPUTS, tile_elements=4 * VOCAB)
    assert isinstance(out, TokenStats)
    expected, mask = dense_model_stats(dense_model, dense_reference, *batch)
    assert torch.equal(out.label_mask, mask)
    assert out.aux_loss is None
    for name in (
        "policy_logps",
        "ref_logps",
        "forward_kl",
        "reverse_kl",
        "entropy",
        "mean_logits",
        "log_sum_sq_probs",
    ):
        value = getattr(out, name)
        assert value.shape == mask.shape and value.dtype == torch.float32, name
        assert_close(value, expected[name], rtol=1e-4, atol=1e-5)
    assert torch.equal(out.is_top1, expected["is_top1"] & mask)

    coefs = coefficients(mask.shape[1], DIFFERENTIABLE)
    loss_of(out, coefs).backward()
    loss_of(expected, coefs).backward()
    grads, expected_grads = grads_of(model), grads_of(dense_model)
    assert grads.keys() == expected_grads.keys() and "lm_head.weight" in grads
    for name in grads:
        assert_close(grads[name], expected_grads[name], rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in reference_model.parameters())


def test_logit_scale_and_softcap_read_from_config():
    model = tiny_qwen(final_logit_softcapping=2.0)
    model.config.logit_scale = 0.5
    add_token_stats_head(model)
    reference_model = perturbed_copy(model)
    input_ids, attention_mask, labels = make_batch()
    _, out = run_token_stats(model, reference_model, (input_ids, attention_mask, labels))
    mask = labels[:, 1:] != -100
    with torch.no_grad():
        z_pol = transform(model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1], 0.5, 2.0)
        z_ref = transform(
            reference_model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1], 0.5, 2.0
        )
    expected = dense_from_logits(z_pol[mask], z_ref[mask], labels[:, 1:][mask])
    for name in ("policy_logps", "ref_logps", "forward_kl", "reverse_kl"):
        assert_close(getattr(out, name)[mask], expected[name], rtol=1e-4, atol=1e-5)


def test_peft_lora_with_adapters_disabled_as_reference():
    peft = pytest.importorskip("peft")
    base = tiny_qwen()
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, lora_config)
    add_token_stats_head(model.get_base_model())
    input_ids, attention_mask, labels = make_batch()

    with torch.no_grad(), model.disable_adapter():
        reference = model(input_ids=input_ids, attention_mask=attention_mask, token_stats=TokenStatsRequest(labels))
    request = TokenStatsRequest(labels, reference=reference, outputs=("forward_kl", "reverse_kl"))
    out = model(input_ids=input_ids, attention_mask=attention_mask, token_stats=request)
    coefs = coefficients(labels.shape[1] - 1, DIFFERENTIABLE)
    loss_of(out, coefs).backward()
    grads = grads_of(model)
    model.zero_grad(set_to_none=True)

    # Dense: the same model, adapters on for the policy and off for the reference
    z_pol = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    with torch.no_grad(), model.disable_adapter():
        z_ref = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    mask = labels[:, 1:] != -100
    expected = dense_from_logits(z_pol, z_ref, labels[:, 1:].clamp(min=0))
    expected = {name: torch.where(mask, value, torch.zeros_like(value)) for name, value in expected.items()}
    for name in ("policy_logps", "ref_logps", "forward_kl", "reverse_kl"):
        assert_close(getattr(out, name), expected[name], rtol=1e-4, atol=1e-5)
    assert out.forward_kl[mask].abs().min() > 0  # the adapters really change the policy
    loss_of(expected, coefs).backward()
    expected_grads = grads_of(model)

    assert grads and grads.keys() == expected_grads.keys()
    assert all("lora_" in name for name in grads)
    for name in grads:
        assert_close(grads[name], expected_grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("trl_first", [True, False])
def test_composes_with_trl_fused_lm_head_and_generation(trl_first):
    from trl.trainer.utils import add_fused_lm_head

    model = tiny_qwen()
    input_ids, attention_mask, labels = make_batch()
    with torch.no_grad():
        logits_before = model(input_ids=input_ids, attention_mask=attention_mask).logits
        generated_before = model.generate(input_ids[:1], max_new_tokens=4, do_sample=False)
    patches = [add_fused_lm_head, add_token_stats_head]
    for patch in patches if trl_first else patches[::-1]:
        patch(model)

    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids, attention_mask=attention_mask).logits, logits_before)
        assert torch.equal(model.generate(input_ids[:1], max_new_tokens=4, do_sample=False), generated_before)
        fused = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        _, out = run_token_stats(model, model, (input_ids, attention_mask, labels), outputs=("forward_kl",))
    torch.testing.assert_close(out.policy_logps, fused.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.policy_logps, out.ref_logps)
    assert out.forward_kl.abs().max() < 1e-5  # the model is its own reference


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_qwen().train()
    reference_model = perturbed_copy(model)
    add_token_stats_head(model)
    add_token_stats_head(reference_model)
    batch = make_batch()
    coefs = coefficients(batch[0].shape[1] - 1, DIFFERENTIABLE)

    loss_of(run_token_stats(model, reference_model, batch)[1], coefs).backward()
    plain = grads_of(model)
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    loss_of(run_token_stats(model, reference_model, batch)[1], coefs).backward()
    checkpointed = grads_of(model)
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


def test_all_positions_masked_keeps_the_graph_connected():
    model = tiny_qwen()
    add_token_stats_head(model)
    input_ids, attention_mask, labels = make_batch()
    labels = torch.full_like(labels, -100)
    _, out = run_token_stats(model, model, (input_ids, attention_mask, labels))
    assert out.policy_logps.requires_grad and torch.count_nonzero(out.policy_logps) == 0
    (out.policy_logps.sum() + out.forward_kl.sum()).backward()
    assert model.lm_head.weight.grad is not None and torch.count_nonzero(model.lm_head.weight.grad) == 0


def test_mismatched_inputs_raise():
    model = tiny_qwen()
    add_token_stats_head(model)
    input_ids, attention_mask, labels = make_batch()
    with pytest.raises(ValueError, match="do not line up"):
        model(input_ids=input_ids, token_stats=TokenStatsRequest(labels[:, 1:]))
    with torch.no_grad():
        reference = model(input_ids=input_ids, token_stats=TokenStatsRequest(labels))
    other = labels.clone()
    other[0, 5] = -100
    with pytest.raises(ValueError, match="other scored positions"):
        model(input_ids=input_ids, token_stats=TokenStatsRequest(other, reference=reference))
    with pytest.raises(ValueError, match="not as `labels`"):
        model(input_ids=input_ids, labels=labels, token_stats=TokenStatsRequest(labels, reference=reference))


def test_moe_aux_loss_matches_the_model():
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
        max_position_embeddings=64,
    )
    model = MixtralForCausalLM(config).eval()
    add_token_stats_head(model)
    input_ids, attention_mask, labels = make_batch()
    _, out = run_token_stats(model, model, (input_ids, attention_mask, labels))
    expected = model(input_ids=input_ids, attention_mask=attention_mask).aux_loss
    assert out.aux_loss is not None
    torch.testing.assert_close(out.aux_loss, expected)


def test_ddp_single_process(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs a fresh torch.distributed")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_qwen()
        reference_model = perturbed_copy(model)
        dense_model = copy.deepcopy(model)
        add_token_stats_head(model)
        add_token_stats_head(reference_model)
        ddp_model = DistributedDataParallel(model)
        batch = make_batch()
        coefs = coefficients(batch[0].shape[1] - 1, DIFFERENTIABLE)
        loss_of(run_token_stats(ddp_model, reference_model, batch)[1], coefs).backward()
        expected, _ = dense_model_stats(dense_model, reference_model, *batch)
        loss_of(expected, coefs).backward()
        grads, expected_grads = grads_of(model), grads_of(dense_model)
        assert grads.keys() == expected_grads.keys()
        for name in grads:
            assert_close(grads[name], expected_grads[name], rtol=1e-4, atol=1e-5)
    finally:
        dist.destroy_process_group()
