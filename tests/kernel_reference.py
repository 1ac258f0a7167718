"""Shared by the kernel tests: random LM heads and tiny models, and the dense float64 reference they are checked against.

Every reference value is an independent dense computation: full ``[N, V]`` logits in float64, ``log_softmax``, sums.
"""

import copy

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from trl_tokenpo.kernels import TokenStatsRequest


DIFFERENTIABLE = ("policy_logps", "forward_kl", "reverse_kl")


def transform(x, scale, softcap):
    x = x * scale
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def dense_from_logits(z_pol, z_ref, labels):
    """Every statistic from float64 (transformed) logits ``[N, V]``; differentiable through ``z_pol``."""
    lp = torch.log_softmax(z_pol.double(), dim=-1)
    lr = torch.log_softmax(z_ref.double(), dim=-1)
    p, q = lp.exp(), lr.exp()
    target = labels.unsqueeze(-1)
    return {
        "policy_logps": lp.gather(-1, target).squeeze(-1),
        "ref_logps": lr.gather(-1, target).squeeze(-1),
        "forward_kl": (q * (lr - lp)).sum(-1),
        "reverse_kl": (p * (lp - lr)).sum(-1),
        "entropy": -(p * lp).sum(-1),
        "mean_logits": z_pol.double().mean(-1),
        "is_top1": z_pol.argmax(-1) == labels,
        "log_sum_sq_probs": torch.log((p * p).sum(-1)),
    }


def dense_head_stats(inputs, policy_scale=1.0, policy_softcap=None, ref_scale=1.0, ref_softcap=None):
    """Dense stats with float64 leaf copies of the policy tensors; returns ``(stats, [h, W, b] leaves)``."""
    hp, w, b, hr, wr, br, labels = inputs
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (hp, w, b)]
    hp64, w64, b64 = leaves
    x_pol = hp64 @ w64.T + (0 if b64 is None else b64)
    x_ref = hr.double() @ wr.double().T + (0 if br is None else br.double())
    stats = dense_from_logits(
        transform(x_pol, policy_scale, policy_softcap), transform(x_ref, ref_scale, ref_softcap), labels
    )
    return stats, leaves


def make_inputs(n=37, h=16, v=101, h_ref=12, bias=True, seed=0):
    """Random policy / reference heads whose logits have a standard deviation of a few units."""
    g = torch.Generator().manual_seed(seed)
    hp = torch.randn(n, h, generator=g).requires_grad_()
    w = (torch.randn(v, h, generator=g) * 2.0 / h**0.5).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.5).requires_grad_() if bias else None
    hr = torch.randn(n, h_ref, generator=g)
    wr = torch.randn(v, h_ref, generator=g) * 2.0 / h_ref**0.5
    br = torch.randn(v, generator=g) * 0.5 if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    return hp, w, b, hr, wr, br, labels


def coefficients(n, names, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(n, generator=g, dtype=torch.float64) for name in names}


def combination(stats, coefs, dtype):
    return sum((coefs[name].to(dtype) * stats[name].to(dtype)).sum() for name in coefs)


def assert_close(actual, expected, rtol=1e-5, atol=2e-5):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


VOCAB = 97


def tiny_qwen(seed=0, **overrides):
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        **overrides,
    )
    return Qwen2ForCausalLM(config).float().eval()


def perturbed_copy(model, scale=0.05, seed=1):
    """A copy of ``model`` with seeded noise on every parameter, the same noise whatever the model's device: it is
    drawn on the CPU (one generator for every device) and moved to the parameter's device."""
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in ref.parameters():
            param.add_((torch.randn(param.shape, generator=g) * scale).to(param.device))
    ref.requires_grad_(False)
    return ref


def make_batch():
    g = torch.Generator().manual_seed(42)
    input_ids = torch.randint(0, VOCAB, (3, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # right padding, as DPOTrainer's collator does
    labels = input_ids.clone()
    labels[:, :4] = -100  # prompt
    labels[attention_mask == 0] = -100
    return input_ids, attention_mask, labels


def dense_model_stats(policy, reference, input_ids, attention_mask, labels):
    """Dense per-position stats ``[B, T-1]`` from two ordinary forwards, zero where the label is -100."""
    z_pol = policy(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    with torch.no_grad():
        z_ref = reference(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    shifted = labels[:, 1:]
    mask = shifted != -100
    stats = dense_from_logits(z_pol, z_ref, shifted.clamp(min=0))
    return {name: torch.where(mask, value, torch.zeros_like(value)) for name, value in stats.items()}, mask


def loss_of(stats, coefs):
    return sum((coefs[name] * stats[name].double()).sum() for name in coefs)


def grads_of(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def run_token_stats(model, reference_model, batch, outputs=("forward_kl", "reverse_kl"), **request_kwargs):
    input_ids, attention_mask, labels = batch
    with torch.no_grad():
        reference = reference_model(
            input_ids=input_ids, attention_mask=attention_mask, token_stats=TokenStatsRequest(labels=labels)
        )
    request = TokenStatsRequest(labels=labels, reference=reference, outputs=outputs, **request_kwargs)
    return reference, model(input_ids=input_ids, attention_mask=attention_mask, token_stats=request)
