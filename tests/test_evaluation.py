"""trl_tokenpo.evaluation's fast paths against plain per-row computations on a tiny model (CPU, float32)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import build_model, build_tokenizer

from trl_tokenpo.evaluation import (
    _pair_rows,
    evaluate_policy,
    pair_statistics,
    preference_accuracy,
    sample_responses,
    sequence_logps,
)


PROMPTS = [[{"role": "user", "content": t}] for t in ("what is the sky ?", "why is the cat very rude ?", "how ?")]
PAIRS = [
    {"prompt": PROMPTS[0], "chosen": [{"role": "assistant", "content": "the sky is blue ."}],
     "rejected": [{"role": "assistant", "content": "fire"}]},
    {"prompt": PROMPTS[1], "chosen": [{"role": "assistant", "content": "it is not rude ."}],
     "rejected": [{"role": "assistant", "content": "because it is bad and terrible and red"}]},
    {"prompt": PROMPTS[2], "chosen": [{"role": "assistant", "content": "good"}],
     "rejected": [{"role": "assistant", "content": "no ."}]},
]  # fmt: skip


class Judge:
    def score(self, text):
        return text.count("good") - text.count("bad")


@pytest.fixture(scope="module")
def models():
    tokenizer = build_tokenizer()
    policy, reference = build_model(tokenizer, seed=0), build_model(tokenizer, seed=1)
    policy.eval(), reference.eval()
    return policy, reference, tokenizer


def _row_logprobs(model, prompt, completion):
    """Dense reference: one unpadded row, full logits, log_softmax at the positions predicting the completion."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return logprobs[len(prompt) - 1 :]


def test_sequence_logps_left_padded_matches_unpadded_rows(models, one_thread):
    policy, _, tokenizer = models
    prompts = [[5, 9, 12, 7, 30], [6], [8, 20, 21, 22, 23, 24, 25, 26]]
    completions = [[11, 13, 1], [14, 15, 16, 17, 18, 19, 40, 41, 1], []]
    logps, entropies = sequence_logps(policy, prompts, completions, tokenizer.pad_token_id, with_entropy=True)
    assert [len(x) for x in logps] == [3, 9, 0] == [len(x) for x in entropies]
    for p, c, lp, ent in zip(prompts, completions, logps, entropies):
        if not c:
            continue
        dense = _row_logprobs(policy, p, c)
        torch.testing.assert_close(lp, dense.gather(-1, torch.tensor(c)[:, None]).squeeze(-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(ent, -(dense.exp() * dense).sum(-1), atol=1e-5, rtol=0)
    # batch composition does not matter beyond float rounding
    one_by_one = [sequence_logps(policy, [p], [c], tokenizer.pad_token_id, batch_size=1)[0][0] for p, c in
                  zip(prompts, completions)]  # fmt: skip
    for a, b in zip(logps, one_by_one):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_sampling_logps_equal_a_forward_pass(models, one_thread):
    policy, _, tokenizer = models
    samples = sample_responses(
        policy, tokenizer, PROMPTS, 3, max_new_tokens=12, seed=0, batch_size=4, return_logps=True
    )
    assert len(samples.logps) == len(samples) == 9
    assert [len(x) for x in samples.logps] == [len(c) for c in samples.completion_ids]
    forward, entropy = sequence_logps(policy, samples.prompt_ids, samples.completion_ids, tokenizer.pad_token_id,
                                      with_entropy=True)  # fmt: skip
    for a, b in zip(samples.logps, forward):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for a, b in zip(samples.entropies, entropy):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    plain = sample_responses(policy, tokenizer, PROMPTS, 3, max_new_tokens=12, seed=0, batch_size=4)
    assert plain.completion_ids == samples.completion_ids and plain.logps is None  # same samples either way
    with pytest.raises(ValueError, match="temperature=1.0"):
        sample_responses(policy, tokenizer, PROMPTS, 1, temperature=0.7, return_logps=True)


def test_evaluate_policy_with_sampling_logps(models, one_thread):
    policy, reference, tokenizer = models
    kwargs = dict(num_samples_per_prompt=2, max_new_tokens=10, seed=3, batch_size=4)
    slow = evaluate_policy(policy, reference, tokenizer, PROMPTS, Judge(), **kwargs)
    fast = evaluate_policy(policy, reference, tokenizer, PROMPTS, Judge(), sampling_logps=True, **kwargs)
    assert fast["reward_mean"] == slow["reward_mean"] and fast["length_mean"] == slow["length_mean"]
    assert fast["kl_mean"] == pytest.approx(slow["kl_mean"], abs=1e-4) and slow["kl_mean"] != 0.0
    assert fast["entropy_mean"] == pytest.approx(slow["entropy_mean"], abs=1e-5)
    itself = evaluate_policy(policy, policy, tokenizer, PROMPTS, Judge(), sampling_logps=True, **kwargs)
    assert itself["kl_mean"] == 0.0


def test_pair_statistics_match_dense_per_row_values(models, one_thread):
    policy, reference, tokenizer = models
    stats = pair_statistics(policy, reference, tokenizer, PAIRS, beta=0.1, batch_size=2)
    prompt_ids, completion_ids = _pair_rows(tokenizer, PAIRS)
    ratios, fkls = [], []
    for p, c in zip(prompt_ids, completion_ids):
        lp_pol, lp_ref = _row_logprobs(policy, p, c), _row_logprobs(reference, p, c)
        index = torch.tensor(c)[:, None]
        ratios.append(float((lp_pol.gather(-1, index) - lp_ref.gather(-1, index)).sum()))
        fkls.append(float((lp_ref.exp() * (lp_ref - lp_pol)).sum()))
    correct = sum(ratios[2 * i] > ratios[2 * i + 1] for i in range(3))
    assert stats["num_pairs"] == 3 and stats["num_correct"] == correct
    assert stats["preference_accuracy"] == correct / 3 == preference_accuracy(policy, reference, tokenizer, PAIRS)
    assert stats["seq_fkl_chosen"] == pytest.approx(sum(fkls[0::2]) / 3, abs=1e-4)
    assert stats["seq_fkl_rejected"] == pytest.approx(sum(fkls[1::2]) / 3, abs=1e-4)
    assert min(fkls) > 0
    same = pair_statistics(policy, policy, tokenizer, PAIRS, batch_size=3)  # odd batch sizes round down to pairs
    assert same["seq_fkl_chosen"] == 0.0 and same["preference_accuracy"] == 0.0  # ties count as wrong
    assert math.isnan(pair_statistics(policy, reference, tokenizer, [])["preference_accuracy"])
