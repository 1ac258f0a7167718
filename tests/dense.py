"""An independent dense float64 implementation of the objectives, written straight from methods.md.

It materializes the full `(2B, T, V)` logits of a float64 copy of each model, so it is only for tiny test models.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F


def float64_copy(model):
    """A fresh float64 instance with the same weights (not a deepcopy: trainers patch `forward` with closures that a
    deepcopy would keep pointing at the original model)."""
    clone = type(model)(copy.deepcopy(model.config))
    clone.load_state_dict(model.state_dict())
    return clone.double().train(model.training)


def dense_per_token(policy, ref, batch):
    """Float64 per-token statistics of a collated batch: log-ratio, forward KL, reverse KL, (2B, T-1) each, and the
    float64 policy copy (whose parameter gradients the caller can read after `backward`)."""
    policy64 = float64_copy(policy)
    ref64 = float64_copy(ref)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    logp = F.log_softmax(policy64(input_ids=ids, attention_mask=attn).logits[:, :-1], dim=-1)
    with torch.no_grad():
        logq = F.log_softmax(ref64(input_ids=ids, attention_mask=attn).logits[:, :-1], dim=-1)
    labels = ids[:, 1:].unsqueeze(-1)
    logratio = logp.gather(-1, labels).squeeze(-1) - logq.gather(-1, labels).squeeze(-1)
    forward_kl = (logq.exp() * (logq - logp)).sum(-1)
    reverse_kl = (logp.exp() * (logp - logq)).sum(-1)
    mask = batch["completion_mask"][:, 1:].double()
    return policy64, logratio, forward_kl, reverse_kl, mask


def _split(x):
    b = x.shape[0] // 2
    return x[:b], x[b:]


def dense_loss(policy, ref, batch, beta, method="dpo", alpha=0.0, variant="tdpo2", kl_term="none", weights=None):
    """The loss of `method` ("dpo", "tdpo", "tisdpo") in float64; returns `(loss, policy64)`."""
    policy64, lr, fkl, rkl, mask = dense_per_token(policy, ref, batch)
    w = mask if weights is None else mask * weights[:, 1:].double()
    LR = (lr * w).sum(-1)
    FKL = (fkl * w).sum(-1)
    RKL = (rkl * w).sum(-1)
    lr_w, lr_l = _split(LR)
    f_w, f_l = _split(FKL)
    r_w, r_l = _split(RKL)
    if method == "dpo" or (method == "tisdpo" and kl_term == "none"):
        z = lr_w - lr_l
    elif method == "tdpo" and variant == "tdpo1":
        z = (lr_w - lr_l) - (f_l - f_w)
    elif method == "tdpo" or kl_term == "tdpo":
        z = (lr_w - lr_l) - alpha * (f_l - f_w.detach())
    elif kl_term == "reverse":
        z = (lr_w - lr_l) - alpha * (r_w - r_l)
    else:
        raise ValueError(method)
    return -F.logsigmoid(beta * z).mean(), policy64


def assert_grads_close(model, model64, rtol=1e-4, atol=1e-6):
    """Compare the float32 gradients of `model` with the float64 ones of its copy, parameter by parameter."""
    grads64 = dict(model64.named_parameters())
    checked = 0
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        other = grads64[name].grad
        assert other is not None, name
        torch.testing.assert_close(param.grad.double(), other, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
        checked += 1
    assert checked > 0
