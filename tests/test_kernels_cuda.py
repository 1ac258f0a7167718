"""CUDA checks of the Triton backend of trl_tokenpo.kernels (skipped without a GPU; scripts/gpu_check.sh runs them).

Shapes large enough for every tiling case on the GPU: token chunks that end mid-way, many vocabulary chunks, column
blocks that end mid-way, vocabularies that are not multiples of the block size; float32 and bf16; the trainers.
"""

import pytest
import torch
from conftest import build_model, build_tokenizer, cpu_args
from dense import dense_loss
from kernel_reference import DIFFERENTIABLE, coefficients, combination, dense_head_stats, make_inputs
from test_tisdpo import with_token_columns

from trl_tokenpo import TDPOConfig, TDPOTrainer, TISDPOConfig, TISDPOTrainer
from trl_tokenpo.kernels import OPTIONAL_OUTPUTS, fused_token_stats, resolve_backend, tiles_triton


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or not tiles_triton.available(), reason="needs a CUDA GPU and triton"),
]

VALUES = ("policy_logps", "ref_logps", "forward_kl", "reverse_kl", "entropy", "mean_logits", "log_sum_sq_probs")


def _cuda(inputs, dtype=None):
    out = []
    for i, t in enumerate(inputs):
        if t is None or not t.is_floating_point():
            out.append(None if t is None else t.cuda())
            continue
        t = t.detach().cuda().to(dtype or t.dtype)
        out.append(t.requires_grad_() if i < 3 else t)
    return out


def _grads(out, coefs, params):
    return torch.autograd.grad(combination(out, {k: v.cuda() for k, v in coefs.items()}, torch.float32), params)


def _close(actual, expected, rtol, atol):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol)


def test_auto_is_triton_on_cuda():
    assert resolve_backend("auto", torch.device("cuda")) == "triton"


@pytest.mark.parametrize(
    "n, h, v, tile_elements, transform, bias",
    [
        (777, 64, 50_257, None, (1.0, None, 1.0, None), True),  # one tile; 50 column blocks, the last partial
        (5000, 32, 3001, 2**20, (0.5, 30.0, 1.3, None), False),  # 2 token chunks x 12 vocabulary chunks
    ],
)
def test_float32_matches_dense(n, h, v, tile_elements, transform, bias):
    inputs = make_inputs(n=n, h=h, v=v, h_ref=h // 2, bias=bias, seed=31)
    device_inputs = _cuda(inputs)
    policy_scale, policy_softcap, ref_scale, ref_softcap = transform
    out = fused_token_stats(
        *device_inputs, policy_logit_scale=policy_scale, policy_softcap=policy_softcap, ref_logit_scale=ref_scale,
        ref_softcap=ref_softcap, outputs=OPTIONAL_OUTPUTS, tile_elements=tile_elements, backend="triton",
    )
    expected, leaves = dense_head_stats([None if t is None else t.cuda() for t in inputs], *transform)
    for name in VALUES:
        _close(getattr(out, name), expected[name], rtol=1e-4, atol=1e-4)
    assert torch.equal(out.is_top1, expected["is_top1"])
    coefs = coefficients(n, DIFFERENTIABLE, seed=32)
    params = [t for t in device_inputs[:3] if t is not None]
    grads = _grads(out, coefs, params)
    expected_grads = torch.autograd.grad(
        combination(expected, {k: c.cuda() for k, c in coefs.items()}, torch.float64),
        [t for t in leaves if t is not None],
    )
    for grad, expected_grad in zip(grads, expected_grads):
        _close(grad, expected_grad, rtol=1e-4, atol=1e-5 * expected_grad.abs().max().item())


@pytest.mark.parametrize("mode", ["bf16-tensors", "bf16-autocast"])
def test_bf16_matches_torch_backend_and_dense(mode):
    inputs = make_inputs(n=1500, h=128, v=32_007, h_ref=128, seed=33)
    if mode == "bf16-tensors":
        device_inputs, context = _cuda(inputs, torch.bfloat16), torch.autocast("cuda", enabled=False)
    else:
        device_inputs, context = _cuda(inputs), torch.autocast("cuda", dtype=torch.bfloat16)
    with context:
        out = fused_token_stats(*device_inputs, outputs=OPTIONAL_OUTPUTS, tile_elements=2**22, backend="triton")
        torch_out = fused_token_stats(*device_inputs, outputs=OPTIONAL_OUTPUTS, backend="torch")
    expected, leaves = dense_head_stats([None if t is None else t.cuda() for t in inputs])
    for name in VALUES:
        # the same bf16 logits, then float32 statistics in both backends
        _close(getattr(out, name), getattr(torch_out, name), rtol=1e-4, atol=1e-4)
        _close(getattr(out, name), expected[name], rtol=0.05, atol=0.1)
    assert (out.is_top1 == torch_out.is_top1).float().mean() > 0.999
    coefs = coefficients(1500, DIFFERENTIABLE, seed=34)
    grads = _grads(out, coefs, device_inputs[:3])
    torch_grads = _grads(torch_out, coefs, device_inputs[:3])
    expected_grads = torch.autograd.grad(
        combination(expected, {k: c.cuda() for k, c in coefs.items()}, torch.float64), leaves
    )
    for grad, torch_grad, expected_grad in zip(grads, torch_grads, expected_grads):
        scale = expected_grad.abs().max().item()
        _close(grad, torch_grad, rtol=0.02, atol=0.02 * scale)
        _close(grad, expected_grad, rtol=0.05, atol=0.05 * scale)


def test_memory_stays_at_two_tiles():
    # Qwen2.5-0.5B's head on 4096 tokens: float32 [N, V] logits would be 2.5 GB; the Triton path holds two bf16 tiles
    # (2 x 256 MiB) and per-token vectors
    n, h, v = 4096, 896, 151_936
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(v, h, device="cuda", dtype=torch.bfloat16) * 0.02
    labels = torch.randint(0, v, (n,), device="cuda")
    ref_hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fused_token_stats(hidden, weight, None, ref_hidden, weight, None, labels, backend="triton",
                            outputs=("forward_kl", "entropy", "mean_logits", "is_top1"))
    (out.policy_logps.sum() + out.forward_kl.sum()).backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 768 * 2**20
    assert torch.isfinite(hidden.grad).all()


def _trainer_step(config_class, trainer_class, tmp_path, standard_dataset, bf16, **options):
    tokenizer = build_tokenizer()
    ref = build_model(tokenizer, seed=0)
    policy = build_model(tokenizer, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    args = cpu_args(config_class, tmp_path, use_cpu=False, bf16=bf16, **options)
    dataset = with_token_columns(standard_dataset, tokenizer) if trainer_class is TISDPOTrainer else standard_dataset
    trainer = trainer_class(model=policy, ref_model=ref, args=args, train_dataset=dataset, processing_class=tokenizer)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return trainer, batch, loss.detach(), grads


CASES = [
    (TDPOConfig, TDPOTrainer, dict(tdpo_variant="tdpo2", alpha=0.7, beta=0.5), dict(method="tdpo", variant="tdpo2")),
    (TISDPOConfig, TISDPOTrainer, dict(tis_kl_term="reverse", alpha=0.7, beta=0.5),
     dict(method="tisdpo", kl_term="reverse")),
]


@pytest.mark.parametrize("config_class, trainer_class, options, dense_options", CASES)
def test_trainer_step_on_cuda_matches_dense(tmp_path, standard_dataset, config_class, trainer_class, options,
                                            dense_options, monkeypatch):
    calls = []
    forward = tiles_triton.forward
    monkeypatch.setattr(tiles_triton, "forward", lambda *args: calls.append(1) or forward(*args))
    trainer, batch, loss, grads = _trainer_step(config_class, trainer_class, tmp_path, standard_dataset, False,
                                                **options)
    assert calls, "the trainer did not run the Triton backend"
    policy, ref = trainer.model, trainer.ref_model
    cpu_batch = {k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()}
    weights = cpu_batch.get("token_weights")
    want, policy64 = dense_loss(policy.cpu(), ref.cpu(), cpu_batch, beta=0.5, alpha=0.7, weights=weights,
                                **dense_options)
    want.backward()
    torch.testing.assert_close(loss.double().cpu(), want.detach(), rtol=1e-5, atol=1e-6)
    grads64 = dict(policy64.named_parameters())
    for name, grad in grads.items():
        torch.testing.assert_close(grad.double().cpu(), grads64[name].grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("config_class, trainer_class, options, dense_options", CASES)
def test_bf16_trainer_step_triton_matches_torch_backend(tmp_path, standard_dataset, config_class, trainer_class,
                                                        options, dense_options, monkeypatch):
    _, _, loss, grads = _trainer_step(config_class, trainer_class, tmp_path, standard_dataset, True, **options)
    from trl_tokenpo.kernels import function

    monkeypatch.setattr(function, "resolve_backend", lambda backend, device: "torch")
    _, _, torch_loss, torch_grads = _trainer_step(config_class, trainer_class, tmp_path, standard_dataset, True,
                                                  **options)
    torch.testing.assert_close(loss.float(), torch_loss.float(), rtol=1e-3, atol=1e-3)
    assert grads.keys() == torch_grads.keys()
    for name in grads:
        scale = torch_grads[name].abs().max().item()
        torch.testing.assert_close(grads[name].float(), torch_grads[name].float(), rtol=0.02, atol=0.02 * scale)
