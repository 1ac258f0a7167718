"""Sampling-based evaluation of a policy against a reference model and a known token-level reward.

- :func:`sample_responses`: batched, left-padded ancestral sampling with ``model.generate`` (optionally with the
  sampling model's own per-token log-probabilities and entropies, read from the logits of the same pass).
- :func:`evaluate_policy`: oracle reward of the policy's samples, Monte-Carlo ``KL(policy || reference)`` on those
  samples, mean token entropy of the policy and mean response length.
- :func:`preference_accuracy`: the fraction of held-out pairs that the implicit reward
  ``beta * (log pi - log pi_ref)`` ranks correctly.
- :func:`pair_statistics`: that accuracy and, from the same two forward passes, the mean sequence forward KL
  ``sum_t KL(pi_ref || pi)`` of the chosen and of the rejected responses (what ``TDPOTrainer`` logs as ``kl/*``).

Prompts and pairs may be plain strings or conversational message lists (rendered with the tokenizer's chat template,
exactly as TRL's ``DPOTrainer`` does). All log-probabilities are computed in float32 with ``log_softmax``. Every
function is deterministic under its seed and leaves the global RNG state and the models' train/eval mode untouched.
Inputs are moved to the model's device (CPU or CUDA); results come back as Python floats or CPU tensors.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


__all__ = [
    "Samples",
    "evaluate_policy",
    "pair_statistics",
    "preference_accuracy",
    "sample_responses",
    "sequence_logps",
]


@dataclass
class Samples:
    """Sampled completions, one row per sample (each prompt repeated ``num_samples_per_prompt`` times, in order).

    Attributes:
        prompts: the prompt of each sample (as given).
        prompt_ids: the tokenized prompt of each sample.
        completion_ids: the sampled tokens up to and including the first EOS (no padding).
        completions: the decoded completions, special tokens skipped.
        finished: whether the completion ended with EOS within ``max_new_tokens``.
        logps: with ``return_logps``, the sampling model's log-probability (float32, CPU) of each completion token.
        entropies: with ``return_logps``, the entropy of the model's next-token distribution at each of those positions.
    """

    prompts: list
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completions: list[str]
    finished: list[bool]
    logps: list[torch.Tensor] | None = None
    entropies: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.completions)


@contextlib.contextmanager
def _eval_mode(*models):
    states = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, state in zip(models, states):
            m.train(state)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _tokenize_prompt(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _tokenize_pair_side(tokenizer, prompt, completion) -> tuple[list[int], list[int]]:
    """Prompt and completion ids the way TRL's DPOTrainer builds them: plain text gets EOS appended to the completion
    and ``prompt + completion`` is tokenized as one string; conversations go through the chat template. The completion
    starts where the tokenized prompt and the tokenized prompt + completion diverge."""
    if isinstance(prompt, str):
        eos = tokenizer.eos_token
        if not completion.endswith(eos):
            completion = completion + eos
        prompt_ids = tokenizer(prompt)["input_ids"]
        full_ids = tokenizer(prompt + completion)["input_ids"]
    else:
        prompt_ids = _tokenize_prompt(tokenizer, prompt)
        text = tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)
        full_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = 0
    for a, b in zip(prompt_ids, full_ids):
        if a != b:
            break
        n += 1
    return full_ids[:n], full_ids[n:]


def sample_responses(
    model,
    tokenizer,
    prompts: Sequence,
    num_samples_per_prompt: int = 1,
    max_new_tokens: int = 32,
    seed: int = 0,
    temperature: float = 1.0,
    batch_size: int = 64,
    return_logps: bool = False,
) -> Samples:
    """Sample completions for every prompt with ``model.generate`` (pure ancestral sampling: no top-k/top-p).

    Prompts (strings, or message lists rendered with the chat template plus generation prompt) are left-padded in
    batches of ``batch_size`` rows. The result is deterministic for a given seed and batch size; the global torch RNG
    state is restored afterwards.

    With ``return_logps``, the model's log-probability of each sampled token and the entropy of its next-token
    distribution are read from the raw logits of the same generation pass (float32 ``log_softmax``), so no second
    forward pass of the sampling model is needed. That is the sampling distribution only at ``temperature=1``.
    """
    if return_logps and temperature != 1.0:
        raise ValueError(
            f"return_logps gives the model's own log-probabilities; it needs temperature=1.0, got {temperature}."
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id
    device = _model_device(model)
    rows = [p for p in prompts for _ in range(num_samples_per_prompt)]
    rows_ids = [_tokenize_prompt(tokenizer, p) for p in rows]
    completion_ids: list[list[int]] = []
    finished: list[bool] = []
    logps: list[torch.Tensor] = []
    entropies: list[torch.Tensor] = []
    with _eval_mode(model), torch.no_grad(), torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        for start in range(0, len(rows_ids), batch_size):
            chunk = rows_ids[start : start + batch_size]
            length = max(len(ids) for ids in chunk)
            input_ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for i, ids in enumerate(chunk):
                input_ids[i, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[i, length - len(ids) :] = 1
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                min_new_tokens=0,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
                return_dict_in_generate=True,
                output_logits=return_logps,
            )
            new_tokens = out.sequences[:, length:]
            if return_logps:
                token_logps, token_entropy = [], []
                for step, logits in enumerate(out.logits):  # one (rows, vocab) tensor per generated position
                    step_logps = F.log_softmax(logits.float(), dim=-1)
                    token_logps.append(step_logps.gather(-1, new_tokens[:, step : step + 1]).squeeze(-1))
                    token_entropy.append(torch.special.entr(step_logps.exp()).sum(-1))
                token_logps = torch.stack(token_logps, dim=1).cpu()
                token_entropy = torch.stack(token_entropy, dim=1).cpu()
            for i, row in enumerate(new_tokens.tolist()):
                if eos_id in row:
                    row = row[: row.index(eos_id) + 1]
                    finished.append(True)
                else:
                    finished.append(False)
                completion_ids.append(row)
                if return_logps:
                    logps.append(token_logps[i, : len(row)])
                    entropies.append(token_entropy[i, : len(row)])
    completions = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completion_ids]
    return Samples(
        prompts=rows,
        prompt_ids=rows_ids,
        completion_ids=completion_ids,
        completions=completions,
        finished=finished,
        logps=logps if return_logps else None,
        entropies=entropies if return_logps else None,
    )


def _completion_logprobs(model, prompt_ids, completion_ids, pad_token_id):
    """Next-token log-probabilities (float32) at the positions that predict the completion tokens of a batch.

    The sequences are left-padded (position ids counted from each row's first real token, as ``generate`` does), so
    every completion ends at the last position and the model's LM head only has to run on the last
    ``max completion length + 1`` positions (``logits_to_keep``). Returns ``(logprobs, labels, mask)``:
    ``logprobs`` is ``(rows, K, vocab)``, ``labels`` / ``mask`` are ``(rows, K)``; row ``i``'s completion token ``j``
    sits at ``K - len(completion_ids[i]) + j``.
    """
    device = _model_device(model)
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    length = max(len(s) for s in seqs)
    keep = max(len(c) for c in completion_ids)
    input_ids = torch.full((len(seqs), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    mask = torch.zeros((len(seqs), keep), dtype=torch.bool)
    for i, (s, c) in enumerate(zip(seqs, completion_ids)):
        input_ids[i, length - len(s) :] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, length - len(s) :] = 1
        mask[i, keep - len(c) :] = True
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device),
        logits_to_keep=keep + 1,
    ).logits[:, :-1]
    labels = input_ids[:, length - keep :].to(device)
    return F.log_softmax(logits.float(), dim=-1), labels, mask.to(device)


def sequence_logps(
    model,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int = 64,
    with_entropy: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Per-token log-probabilities (float32, CPU) of each completion given its prompt.

    Sequences are left-padded with position ids counted from each row's first real token (as in ``generate``), and
    the LM head runs only on the positions that predict completion tokens. Returns one tensor of length
    ``len(completion_ids[i])`` per row, and the per-position entropy of the model's next-token distribution at the same
    positions when ``with_entropy``.
    """
    logps: list[torch.Tensor] = []
    entropies: list[torch.Tensor] | None = [] if with_entropy else None
    with _eval_mode(model), torch.no_grad():
        for start in range(0, len(prompt_ids), batch_size):
            c_chunk = completion_ids[start : start + batch_size]
            logprobs, labels, _ = _completion_logprobs(
                model, prompt_ids[start : start + batch_size], c_chunk, pad_token_id
            )
            token_logps = logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1).cpu()
            if with_entropy:
                entropy = torch.special.entr(logprobs.exp()).sum(-1).cpu()
            keep = logprobs.shape[1]
            for i, c in enumerate(c_chunk):
                sl = slice(keep - len(c), keep)
                logps.append(token_logps[i, sl])
                if with_entropy:
                    entropies.append(entropy[i, sl])
    return logps, entropies


def _mean_sem(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def evaluate_policy(
    policy,
    reference,
    tokenizer,
    prompts: Sequence,
    oracle,
    num_samples_per_prompt: int = 4,
    max_new_tokens: int = 32,
    seed: int = 0,
    batch_size: int = 64,
    sampling_logps: bool = False,
) -> dict[str, Any]:
    """Sample from ``policy`` (temperature 1) and score the samples.

    With ``sampling_logps``, the policy's log-probabilities and entropies are read from the logits of the sampling
    pass (``sample_responses(return_logps=True)``) instead of a second forward pass over the samples: one forward pass
    fewer (a third of the compute), the same numbers up to float rounding (so the KL of a model against an identical
    copy is then about 1e-6 rather than exactly 0). Without it, the reference and the policy are scored by the same
    code path, and a model against itself gives exactly 0.

    Returns a dict with:

    - ``reward_mean`` / ``reward_sem``: oracle score of the decoded completions (mean, standard error).
    - ``kl_mean`` / ``kl_sem``: Monte-Carlo estimate of the sequence ``KL(policy || reference)``: per sample, the sum
      over sampled completion tokens (EOS included) of ``log pi - log pi_ref``, then averaged over samples.
    - ``entropy_mean``: mean over sampled completion positions of the policy's full next-token entropy (nats).
    - ``length_mean``: mean number of generated tokens, EOS excluded; ``eos_rate``: fraction that ended with EOS.
    - ``num_samples``.
    """
    samples = sample_responses(
        policy,
        tokenizer,
        prompts,
        num_samples_per_prompt,
        max_new_tokens,
        seed=seed,
        batch_size=batch_size,
        return_logps=sampling_logps,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if sampling_logps:
        pol_logps, entropies = samples.logps, samples.entropies
    else:
        pol_logps, entropies = sequence_logps(
            policy, samples.prompt_ids, samples.completion_ids, pad_id, batch_size, with_entropy=True
        )
    if reference is policy:
        ref_logps = pol_logps
    else:
        ref_logps, _ = sequence_logps(reference, samples.prompt_ids, samples.completion_ids, pad_id, batch_size)
    rewards = [float(oracle.score(text)) for text in samples.completions]
    kls = [float((a - b).sum()) for a, b in zip(pol_logps, ref_logps)]
    all_entropy = torch.cat(entropies) if entropies else torch.zeros(0)
    lengths = [len(ids) - int(done) for ids, done in zip(samples.completion_ids, samples.finished)]
    reward_mean, reward_sem = _mean_sem(rewards)
    kl_mean, kl_sem = _mean_sem(kls)
    return {
        "reward_mean": reward_mean,
        "reward_sem": reward_sem,
        "kl_mean": kl_mean,
        "kl_sem": kl_sem,
        "entropy_mean": float(all_entropy.mean()) if all_entropy.numel() else float("nan"),
        "length_mean": sum(lengths) / max(len(lengths), 1),
        "eos_rate": sum(samples.finished) / max(len(samples.finished), 1),
        "num_samples": len(samples),
    }


def _pair_rows(tokenizer, eval_pairs) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and completion ids of every pair, chosen then rejected, tokenized as TRL's DPOTrainer does."""
    prompt_ids, completion_ids = [], []
    for example in eval_pairs:
        for key in ("chosen", "rejected"):
            p, c = _tokenize_pair_side(tokenizer, example["prompt"], example[key])
            prompt_ids.append(p)
            completion_ids.append(c)
    return prompt_ids, completion_ids


def preference_accuracy(policy, reference, tokenizer, eval_pairs, beta: float = 0.1, batch_size: int = 64) -> float:
    """Fraction of pairs where the implicit reward prefers the chosen response:
    ``beta * ((log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected)) > 0`` (ties count as wrong).

    ``eval_pairs`` is a ``datasets.Dataset`` or a sequence of ``{"prompt", "chosen", "rejected"}`` dicts, plain or
    conversational; completions are tokenized as TRL does (prompt + completion + EOS).
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_ids, completion_ids = _pair_rows(tokenizer, eval_pairs)
    n = len(prompt_ids) // 2
    if n == 0:
        return float("nan")
    pol, _ = sequence_logps(policy, prompt_ids, completion_ids, pad_id, batch_size)
    ref, _ = sequence_logps(reference, prompt_ids, completion_ids, pad_id, batch_size)
    ratios = [float(a.sum() - b.sum()) for a, b in zip(pol, ref)]
    correct = sum(beta * (ratios[2 * i] - ratios[2 * i + 1]) > 0 for i in range(n))
    return correct / n


def pair_statistics(
    policy, reference, tokenizer, eval_pairs, beta: float = 0.1, batch_size: int = 8
) -> dict[str, Any]:
    """Held-out pair statistics from one policy and one reference forward pass per batch.

    Returns a dict with:

    - ``preference_accuracy``: as :func:`preference_accuracy` (ties count as wrong); ``num_pairs``; ``num_correct``.
    - ``seq_fkl_chosen`` / ``seq_fkl_rejected``: mean over pairs of the sequence forward KL
      ``sum_t KL(pi_ref(.|s_t) || pi(.|s_t))`` over the completion tokens (full vocabulary, float32).

    ``batch_size`` rows (a pair is two rows) go through the models at once; each holds two ``(rows, completion
    length, vocab)`` float32 tensors, so keep it small for large vocabularies on CPU.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_ids, completion_ids = _pair_rows(tokenizer, eval_pairs)
    n = len(prompt_ids) // 2
    if n == 0:
        return {"preference_accuracy": float("nan"), "num_pairs": 0, "num_correct": 0,
                "seq_fkl_chosen": float("nan"), "seq_fkl_rejected": float("nan")}  # fmt: skip
    batch_size = max(2, batch_size - batch_size % 2)  # whole pairs per batch
    ratios, fkls = [], []
    with _eval_mode(policy, reference), torch.no_grad():
        for start in range(0, len(prompt_ids), batch_size):
            args = (prompt_ids[start : start + batch_size], completion_ids[start : start + batch_size], pad_id)
            lp_pol, labels, mask = _completion_logprobs(policy, *args)
            lp_ref, _, _ = _completion_logprobs(reference, *args)
            index = labels.unsqueeze(-1)
            ratio = (lp_pol.gather(-1, index) - lp_ref.gather(-1, index)).squeeze(-1)
            fkl = (lp_ref.exp() * (lp_ref - lp_pol)).sum(-1)  # log_softmax is finite: no 0 * inf
            ratios += (ratio * mask).sum(-1).tolist()
            fkls += (fkl * mask).sum(-1).tolist()
    correct = sum(beta * (ratios[2 * i] - ratios[2 * i + 1]) > 0 for i in range(n))
    return {
        "preference_accuracy": correct / n,
        "num_pairs": n,
        "num_correct": int(correct),
        "seq_fkl_chosen": sum(fkls[0::2]) / n,
        "seq_fkl_rejected": sum(fkls[1::2]) / n,
    }
