"""Sampling-based evaluation of a policy against a reference model and a known token-level reward.

- :func:`sample_responses`: batched, left-padded ancestral sampling with ``model.generate``.
- :func:`evaluate_policy`: oracle reward of the policy's samples, Monte-Carlo ``KL(policy || reference)`` on those
  samples, mean token entropy of the policy and mean response length.
- :func:`preference_accuracy`: the fraction of held-out pairs that the implicit reward
  ``beta * (log pi - log pi_ref)`` ranks correctly.

Prompts and pairs may be plain strings or conversational message lists (rendered with the tokenizer's chat template,
exactly as TRL's ``DPOTrainer`` does). All log-probabilities are computed in float32 with ``log_softmax``. Every
function is deterministic under its seed and leaves the global RNG state and the models' train/eval mode untouched.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


__all__ = ["Samples", "evaluate_policy", "preference_accuracy", "sample_responses", "sequence_logps"]


@dataclass
class Samples:
    """Sampled completions, one row per sample (each prompt repeated ``num_samples_per_prompt`` times, in order).

    Attributes:
        prompts: the prompt of each sample (as given).
        prompt_ids: the tokenized prompt of each sample.
        completion_ids: the sampled tokens up to and including the first EOS (no padding).
        completions: the decoded completions, special tokens skipped.
        finished: whether the completion ended with EOS within ``max_new_tokens``.
    """

    prompts: list
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completions: list[str]
    finished: list[bool]

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
) -> Samples:
    """Sample completions for every prompt with ``model.generate`` (pure ancestral sampling: no top-k/top-p).

    Prompts (strings, or message lists rendered with the chat template plus generation prompt) are left-padded in
    batches of ``batch_size`` rows. The result is deterministic for a given seed and batch size; the global torch RNG
    state is restored afterwards.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id
    device = _model_device(model)
    rows = [p for p in prompts for _ in range(num_samples_per_prompt)]
    rows_ids = [_tokenize_prompt(tokenizer, p) for p in rows]
    completion_ids: list[list[int]] = []
    finished: list[bool] = []
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
            )
            for row in out[:, length:].tolist():
                if eos_id in row:
                    row = row[: row.index(eos_id) + 1]
                    finished.append(True)
                else:
                    finished.append(False)
                completion_ids.append(row)
    completions = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completion_ids]
    return Samples(
        prompts=rows, prompt_ids=rows_ids, completion_ids=completion_ids, completions=completions, finished=finished
    )


def sequence_logps(
    model,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int = 64,
    with_entropy: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Per-token log-probabilities (float32, CPU) of each completion given its prompt.

    Sequences are right-padded, so positions start at 0 as in left-padded generation with a position ids cumsum.
    Returns one tensor of length ``len(completion_ids[i])`` per row, and the per-position entropy of the model's
    next-token distribution at the same positions when ``with_entropy``.
    """
    device = _model_device(model)
    logps: list[torch.Tensor] = []
    entropies: list[torch.Tensor] | None = [] if with_entropy else None
    with _eval_mode(model), torch.no_grad():
        for start in range(0, len(prompt_ids), batch_size):
            p_chunk = prompt_ids[start : start + batch_size]
            c_chunk = completion_ids[start : start + batch_size]
            seqs = [list(p) + list(c) for p, c in zip(p_chunk, c_chunk)]
            length = max(len(s) for s in seqs)
            input_ids = torch.full((len(seqs), length), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for i, s in enumerate(seqs):
                input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
                attention_mask[i, : len(s)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)
            token_logps = logprobs.gather(-1, input_ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1).cpu()
            if with_entropy:
                entropy = torch.special.entr(logprobs.exp()).sum(-1).cpu()
            for i, (p, c) in enumerate(zip(p_chunk, c_chunk)):
                # Token j of the completion sits at position len(p) + j, predicted from position len(p) + j - 1.
                sl = slice(len(p) - 1, len(p) - 1 + len(c))
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
) -> dict[str, Any]:
    """Sample from ``policy`` (temperature 1) and score the samples.

    Returns a dict with:

    - ``reward_mean`` / ``reward_sem``: oracle score of the decoded completions (mean, standard error).
    - ``kl_mean`` / ``kl_sem``: Monte-Carlo estimate of the sequence ``KL(policy || reference)``: per sample, the sum
      over sampled completion tokens (EOS included) of ``log pi - log pi_ref``, then averaged over samples.
    - ``entropy_mean``: mean over sampled completion positions of the policy's full next-token entropy (nats).
    - ``length_mean``: mean number of generated tokens, EOS excluded; ``eos_rate``: fraction that ended with EOS.
    - ``num_samples``.
    """
    samples = sample_responses(
        policy, tokenizer, prompts, num_samples_per_prompt, max_new_tokens, seed=seed, batch_size=batch_size
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
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


def preference_accuracy(policy, reference, tokenizer, eval_pairs, beta: float = 0.1, batch_size: int = 64) -> float:
    """Fraction of pairs where the implicit reward prefers the chosen response:
    ``beta * ((log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected)) > 0`` (ties count as wrong).

    ``eval_pairs`` is a ``datasets.Dataset`` or a sequence of ``{"prompt", "chosen", "rejected"}`` dicts, plain or
    conversational; completions are tokenized as TRL does (prompt + completion + EOS).
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_ids, completion_ids = [], []
    n = 0
    for example in eval_pairs:
        for key in ("chosen", "rejected"):
            p, c = _tokenize_pair_side(tokenizer, example["prompt"], example[key])
            prompt_ids.append(p)
            completion_ids.append(c)
        n += 1
    if n == 0:
        return float("nan")
    pol, _ = sequence_logps(policy, prompt_ids, completion_ids, pad_id, batch_size)
    ref, _ = sequence_logps(reference, prompt_ids, completion_ids, pad_id, batch_size)
    ratios = [float(a.sum() - b.sum()) for a, b in zip(pol, ref)]
    correct = sum(beta * (ratios[2 * i] - ratios[2 * i + 1]) > 0 for i in range(n))
    return correct / n
