"""Scoring: token ids in, per-token log-probabilities and typed statistics out.

* :func:`fit_to_max_length` is THE truncation rule of the estimator, for scoring and for adapter training alike: the
  context is cut on the left so that the whole completion fits; only a completion that alone does not fit is cut (one
  context token and its first `max_length - 1` tokens are kept).
* :func:`plan_batches` turns (context, completion) id lists into right-padded batches, length-sorted, each knowing
  where its scored tokens go in one flat array per pass.
* :func:`label_logprobs` runs the model's backbone and gathers the label log-probs through the LM head in row tiles
  of the scored positions only, in float32, never a `(tokens x vocabulary)` tensor for the batch.
* :func:`separation` summarizes how well rewards separate chosen from rejected completions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..kernels import logit_transform_from_config


__all__ = [
    "ScoringBatch",
    "ScoringStats",
    "Separation",
    "fit_to_max_length",
    "label_logprobs",
    "plan_batches",
    "separation",
]

# Elements of one float32 `[rows, V]` logits tile of the scorer: 2^24 (64 MiB), i.e. 512 rows at a 32k vocabulary.
TILE_ELEMENTS = 2**24


@dataclass
class ScoringStats:
    """What scoring did: shards, rows and tokens scored, seconds in the forward passes, and the `max_length` cuts
    (sequences whose context was cut on the left, sequences whose completion was cut, completion tokens that got the
    neutral reward 0.0 because they were cut or had no context token before them)."""

    scored_shards: list[int] = field(default_factory=list, metadata={"help": "Shards this process scored."})
    scored_rows: int = field(default=0, metadata={"help": "Rows (pairs) in those shards."})
    scored_tokens: int = field(default=0, metadata={"help": "Completion tokens scored (both sides)."})
    scoring_seconds: float = field(default=0.0, metadata={"help": "Seconds spent scoring and writing shards."})
    context_truncated: int = field(default=0, metadata={"help": "Sequences whose context was cut on the left."})
    completion_truncated: int = field(default=0, metadata={"help": "Sequences whose completion was cut."})
    unscored_tokens: int = field(default=0, metadata={"help": "Completion tokens given the neutral reward 0.0."})

    def add_cuts(self, other: ScoringStats) -> None:
        for name in ("context_truncated", "completion_truncated", "unscored_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True)
class Separation:
    """How well the token rewards separate the chosen from the rejected completions of the scored pairs.

    Attributes:
        num_pairs: pairs scored.
        mean_reward_chosen / mean_reward_rejected: mean `r_t` over every chosen / rejected completion token.
        chosen_higher: share of pairs whose chosen completion has the larger summed reward `sum_t r_t` (the
            pair's sequence log-ratio `log pi_plus / pi_minus`); ties count one half. 0.5 is chance.
        separated: `chosen_higher` exceeds chance by more than two standard errors (`0.5 + 1 / sqrt(num_pairs)`).
    """

    num_pairs: int
    mean_reward_chosen: float
    mean_reward_rejected: float
    chosen_higher: float
    separated: bool

    @property
    def threshold(self) -> float:
        """The share of pairs above which the rewards count as separated: chance plus two standard errors."""
        return 0.5 + 1.0 / math.sqrt(self.num_pairs) if self.num_pairs else 1.0

    def describe(self) -> str:
        verdict = "they separate" if self.separated else "they do not separate"
        return (
            f"mean r_t chosen {self.mean_reward_chosen:+.4f}, rejected {self.mean_reward_rejected:+.4f}; the chosen "
            f"completion scores higher in {100 * self.chosen_higher:.1f}% of {self.num_pairs} pairs: {verdict} "
            f"chosen from rejected (separated above {100 * min(self.threshold, 1.0):.1f}% = 50% chance + two standard "
            "errors, 1 / sqrt(pairs))"
        )


def separation(chosen: Sequence[Sequence[float]], rejected: Sequence[Sequence[float]]) -> Separation:
    """:class:`Separation` of per-token rewards, one list per completion (`chosen[i]` and `rejected[i]` are a pair)."""
    sums_c = [math.fsum(r) for r in chosen]
    sums_r = [math.fsum(r) for r in rejected]
    tokens_c, tokens_r = sum(len(r) for r in chosen), sum(len(r) for r in rejected)
    n = len(sums_c)
    higher = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(sums_c, sums_r)) / max(n, 1)
    return Separation(
        num_pairs=n,
        mean_reward_chosen=math.fsum(sums_c) / max(tokens_c, 1),
        mean_reward_rejected=math.fsum(sums_r) / max(tokens_r, 1),
        chosen_higher=higher,
        separated=n > 0 and higher > 0.5 + 1.0 / math.sqrt(n),  # Separation.threshold
    )


def fit_to_max_length(context_length: int, completion_length: int, max_length: int | None) -> tuple[int, int]:
    """`(context tokens kept, completion tokens kept)` of one sequence under `max_length` (None: no cut). The context
    keeps its LAST tokens; when the completion alone does not fit, one context token and the completion's first
    `max_length - 1` tokens are kept."""
    if max_length is None or context_length + completion_length <= max_length:
        return context_length, completion_length
    if completion_length < max_length:
        return max_length - completion_length, completion_length
    kept_context = min(1, context_length)
    return kept_context, max_length - kept_context


@dataclass
class ScoringBatch:
    """Right-padded model inputs and where the scored tokens go.

    Attributes:
        input_ids, attention_mask: `(B, T)` int64.
        rows, positions: `(n,)` row and position `t` (>= 1) of each scored label `input_ids[row, t]`.
        labels: `(n,)` the scored token ids.
        destinations: `(n,)` index of each scored token in the pass's flat output.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor
    destinations: torch.Tensor


def plan_batches(
    contexts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    order: Sequence[int],
    batch_size: int,
    max_length: int | None,
    pad_token_id: int,
) -> tuple[list[ScoringBatch], ScoringStats]:
    """Batches of `batch_size` sequences in `order`; sequence `k` is `contexts[k] + completions[k]` cut by
    :func:`fit_to_max_length`, and its completion's scored tokens go to `offset[k] + j` of the flat output, where
    `offset[k]` is the total length of the completions before `k`. Returns the batches and the cuts made."""
    offsets = [0]
    for completion in completions:
        offsets.append(offsets[-1] + len(completion))
    cuts = ScoringStats()
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        sequences = []
        for k in chunk:
            context, completion = contexts[k], completions[k]
            kept_context, kept = fit_to_max_length(len(context), len(completion), max_length)
            cuts.context_truncated += kept_context < len(context) and kept == len(completion)
            cuts.completion_truncated += kept < len(completion)
            # the first completion token is not predicted when no context token precedes it
            cuts.unscored_tokens += len(completion) - kept + (kept > 0 and kept_context == 0)
            sequences.append((list(context[len(context) - kept_context :]), list(completion[:kept])))
        width = max(len(c) + len(s) for c, s in sequences)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        rows, positions, destinations = [], [], []
        for r, (k, (context, completion)) in enumerate(zip(chunk, sequences)):
            sequence = context + completion
            ids[r, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            mask[r, : len(sequence)] = 1
            first = max(len(context), 1)
            rows.extend([r] * (len(sequence) - first))
            positions.extend(range(first, len(sequence)))
            destinations.extend(range(offsets[k] + first - len(context), offsets[k] + len(completion)))
        rows_t, positions_t = torch.tensor(rows, dtype=torch.long), torch.tensor(positions, dtype=torch.long)
        batches.append(
            ScoringBatch(ids, mask, rows_t, positions_t, ids[rows_t, positions_t], torch.tensor(destinations))
        )
    return batches, cuts


def _lm_head_logits(lm_head: torch.nn.Module, hidden: torch.Tensor, weight, bias) -> torch.Tensor:
    """float32 logits `(rows, V)` of one tile of float32 hidden states."""
    if hasattr(lm_head, "lora_A") and not getattr(lm_head, "merged", False):  # an unmerged LoRA adapter on the head
        return lm_head(hidden.to(lm_head.get_base_layer().weight.dtype)).float()
    return torch.nn.functional.linear(hidden, weight, bias)


@torch.inference_mode()
def label_logprobs(model: torch.nn.Module, batch: ScoringBatch, tile_elements: int = TILE_ELEMENTS) -> torch.Tensor:
    """float32 log-probabilities `(n,)` of the batch's scored labels under `model` (a transformers causal LM, possibly
    with PEFT layers injected): the backbone runs on the whole batch, the LM head only on the scored positions, in
    tiles of at most `tile_elements` logits, with the model's logit scale / soft-capping applied."""
    lm_head = model.get_output_embeddings()
    weight = getattr(lm_head, "weight", None)
    device = weight.device if weight is not None else next(model.parameters()).device
    output = model.base_model(
        input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False
    )
    hidden = output.last_hidden_state[batch.rows.to(device), batch.positions.to(device) - 1]
    labels = batch.labels.to(hidden.device)
    bias = getattr(lm_head, "bias", None)
    weight = weight.float() if weight is not None else None
    bias = bias.float() if bias is not None else None
    scale, softcap = logit_transform_from_config(model.config)
    vocab = model.config.get_text_config().vocab_size
    rows = max(1, tile_elements // max(vocab, 1))
    out = torch.empty(len(labels), dtype=torch.float32, device=hidden.device)
    for start in range(0, len(labels), rows):
        logits = _lm_head_logits(lm_head, hidden[start : start + rows].float(), weight, bias)
        if scale != 1.0:
            logits.mul_(scale)
        if softcap is not None:
            logits.div_(softcap).tanh_().mul_(softcap)
        picked = logits.gather(1, labels[start : start + rows, None])[:, 0]
        peak = logits.amax(dim=-1, keepdim=True)
        # log-sum-exp in place on the tile (about 3x faster than torch.logsumexp, which allocates temporaries)
        out[start : start + rows] = picked - peak[:, 0] - logits.sub_(peak).exp_().sum(dim=-1).log_()
    return out.cpu()
