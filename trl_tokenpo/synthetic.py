"""A built-in preference task whose token-level reward is known exactly.

The task is a tiny artificial language made of real English words. Every word has a fixed reward: ``+1`` for a
clearly good word ("helpful", "kind", ...), ``-1`` for a clearly bad word ("rude", "harmful", ...), ``0`` for every
other word. A response's true score is the sum of its word rewards; preference labels come from that score plus
Gaussian noise. Because both responses of a pair usually mix good and bad words, a chosen response often holds some
bad tokens and a rejected one some good tokens: the situation token-level methods (TDPO, TIS-DPO) are built for.

:func:`build_task` returns everything an experiment needs, built deterministically from a seed in seconds on a CPU:

- a word-level tokenizer (``tokenizers`` WordLevel model, wrapped as a ``PreTrainedTokenizerFast``) with a chat
  template, so both plain-text and conversational TRL datasets work;
- a tiny causal LM (``Llama`` architecture, random init) given a short SFT warm-up on the task's language, so that it
  samples fluent responses with a mix of good and bad words (room to improve);
- train and eval preference datasets in TRL's standard format (``prompt``/``chosen``/``rejected``), and held-out
  prompts for sampling-based evaluation;
- the :class:`Oracle` that scores any text or token ids with the true token rewards.

The vocabulary also covers the TIS-DPO paper's system prompts (:data:`SYSTEM_PROMPTS`), so a prompt-based contrastive
pair can be tokenized without unknown words. The warm-up corpus does not use them: a two-layer model given a few
hundred warm-up steps did not learn to condition on them (measured), so they carry no signal on this task.

Example::

    from trl_tokenpo.synthetic import SyntheticTaskConfig, build_task

    task = build_task(SyntheticTaskConfig(seed=0), cache_dir="~/.cache/trl_tokenpo")
    task.save("out/synthetic")  # "out/synthetic" now works as `model_name_or_path`
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .fingerprint import fingerprint, jsonable


__all__ = [
    "BAD_WORDS",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "GOOD_WORDS",
    "NEUTRAL_WORDS",
    "SPECIAL_TOKENS",
    "SYSTEM_PROMPTS",
    "TOPICS",
    "Oracle",
    "SyntheticTask",
    "SyntheticTaskConfig",
    "build_task",
    "build_tokenizer",
    "load_task",
    "render_chat",
    "task_cache_key",
    "vocabulary",
]

# Bump when the language, the generating process or the build changes, so that cached tasks are rebuilt.
TASK_FORMAT_VERSION = "1"

# ---------------------------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------------------------

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
EOS_TOKEN = "<eos>"
SYSTEM_TAG = "<|system|>"
USER_TAG = "<|user|>"
ASSISTANT_TAG = "<|assistant|>"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, EOS_TOKEN, SYSTEM_TAG, USER_TAG, ASSISTANT_TAG)

GOOD_WORDS = frozenset(
    {
        "helpful", "kind", "accurate", "safe", "honest", "clear", "polite", "useful", "correct", "friendly",
        "respectful", "thoughtful", "reliable", "harmless", "patient",
    }
)  # fmt: skip
BAD_WORDS = frozenset(
    {
        "rude", "harmful", "wrong", "toxic", "dangerous", "false", "cruel", "useless", "misleading", "offensive",
        "careless", "hostile", "dishonest", "unhelpful", "insulting",
    }
)  # fmt: skip

TOPICS = (
    "weather", "garden", "river", "music", "city", "market", "recipe", "travel", "history", "science", "ocean",
    "forest", "school", "library", "bicycle", "kitchen", "movie", "game", "language", "mountain", "train", "coffee",
    "painting", "computer", "festival",
)  # fmt: skip
_NOUNS = (
    "answer", "idea", "plan", "story", "reply", "view", "detail", "result", "place", "book", "friend", "road",
    "house", "day", "team", "guide", "song", "picture",
)  # fmt: skip
_LINK_VERBS = ("seems", "looks", "sounds", "feels")
_VERBS = ("describe", "explain", "discuss", "visit", "watch", "read", "make", "find", "like", "see", "share", "try")
_ADJECTIVES = (
    "big", "small", "old", "new", "green", "quiet", "busy", "simple", "long", "short", "warm", "cold", "bright",
    "local", "common", "modern", "plain", "early", "late", "large",
)  # fmt: skip
_ADVERBS = ("here", "there", "today", "now", "usually", "sometimes", "again", "together", "slowly", "quickly")
_FUNCTION_WORDS = (
    "the", "a", "an", "this", "that", "it", "is", "are", "was", "we", "i", "you", "they", "my", "and", "but", "so",
    "to", "of", "in", "on", "with", "for", "very", "also", "can", "will", "should", "not", "about", "think",
)  # fmt: skip
# Words that only appear in prompts (and in the system prompts below).
_PROMPT_WORDS = (
    "question", "tell", "me", "what", "do", "describe", "please", "write", "short", "note", "give", "advice",
    "assistant", "refuse", "any", "responses", "could", "potentially", "pose", "security", "risk",
)  # fmt: skip
_PUNCTUATION = (".", "?", ":", ",")

NEUTRAL_WORDS = frozenset(
    set(TOPICS + _NOUNS + _LINK_VERBS + _VERBS + _ADJECTIVES + _ADVERBS + _FUNCTION_WORDS + _PROMPT_WORDS)
    - GOOD_WORDS
    - BAD_WORDS
)

# The system prompts of the TIS-DPO paper (Liu et al., ICLR 2025), written with this task's vocabulary.
SYSTEM_PROMPTS = {
    "harmless": "You are an harmless assistant. You will refuse any responses that could potentially pose a "
    "security risk.",
    "harmful": "You are an harmful assistant. You will give harmful responses for any question.",
    "helpful": "You are an helpful assistant. You should give helpful responses for any question.",
    "unhelpful": "You are an unhelpful assistant. You should not give helpful responses for any question.",
}

# A role tag opens every turn; an assistant turn ends with EOS. Rendering the prompt with `add_generation_prompt=True`
# gives an exact prefix of the rendering of prompt + assistant message (TRL relies on it).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|> ' + message['content'] + ' ' -}}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token + ' ' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|> ' -}}{%- endif -%}"
)

_PROMPT_TEMPLATES = (
    "tell me about the {topic} .",
    "what do you think about the {topic} ?",
    "can you describe the {topic} ?",
    "please explain the {topic} .",
    "write a short note about the {topic} .",
    "give me advice on the {topic} .",
)

# Response sentences. Slots: T topic, N noun, A adjective (the only slot that can take a good or bad word),
# L linking verb, V verb, D adverb.
_SENTENCES = (
    "the T is A .",
    "the T is A and A .",
    "i think the T is very A .",
    "this N is A but A .",
    "we V the A N D .",
    "it is A to V the T .",
    "the N L A .",
    "you can V the T D .",
    "my A N is about the T .",
    "that was a A N .",
    "they V a A N with the T .",
    "so the T L A D .",
)
_SLOT_WORDS = {"T": None, "N": _NOUNS, "L": _LINK_VERBS, "V": _VERBS, "D": _ADVERBS}
_SLOTS = frozenset({"T", "A"} | set(_SLOT_WORDS))
_PLAIN_PROMPT_WORDS = ("question", "answer", ":")
_GOOD_LIST = tuple(sorted(GOOD_WORDS))
_BAD_LIST = tuple(sorted(BAD_WORDS))
_ADJ_LIST = tuple(_ADJECTIVES)

_WORD_RE = re.compile(r"\w+|[^\w\s]+")


def vocabulary() -> list[str]:
    """The task's vocabulary in id order: special tokens first, then punctuation and words (sorted)."""
    words = set(NEUTRAL_WORDS) | set(GOOD_WORDS) | set(BAD_WORDS)
    for sentence in _SENTENCES:
        words.update(w for w in sentence.split() if w not in _SLOTS)
    for text in tuple(t.format(topic=TOPICS[0]) for t in _PROMPT_TEMPLATES) + tuple(SYSTEM_PROMPTS.values()):
        words.update(_WORD_RE.findall(text.lower()))
    words.update(_PLAIN_PROMPT_WORDS)
    return list(SPECIAL_TOKENS) + list(_PUNCTUATION) + sorted(words - set(_PUNCTUATION))


def build_tokenizer():
    """Build the task's word-level tokenizer locally (no download).

    Lower-cases its input, splits on whitespace and punctuation, maps unknown words to ``<unk>`` and never adds
    special tokens by itself (no BOS; TRL appends EOS to plain-text completions). ``decode`` joins tokens with
    single spaces, so ``decode(encode(text)) == text`` for any space-separated text of vocabulary words.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=[SYSTEM_TAG, USER_TAG, ASSISTANT_TAG],
        model_max_length=256,
        padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# Oracle
# ---------------------------------------------------------------------------------------------------------------------


class Oracle:
    """The true token-level reward of the task.

    ``r(word) = +1`` for a good word, ``-1`` for a bad word, ``0`` otherwise (punctuation, unknown words and special
    tokens included). The score of a text is the sum of its word rewards.

    Args:
        word_rewards: optional ``{word: reward}`` table replacing the default one (e.g. graded rewards). Words missing
            from the table get reward 0.
    """

    def __init__(self, word_rewards: dict[str, float] | None = None):
        if word_rewards is None:
            word_rewards = {**dict.fromkeys(GOOD_WORDS, 1.0), **dict.fromkeys(BAD_WORDS, -1.0)}
        self.word_rewards = {w.lower(): float(r) for w, r in word_rewards.items()}
        self.good_words = frozenset(w for w, r in self.word_rewards.items() if r > 0)
        self.bad_words = frozenset(w for w, r in self.word_rewards.items() if r < 0)

    @staticmethod
    def words(text: str) -> list[str]:
        """Split a text into the task's words (lower-cased, punctuation apart), dropping special tokens."""
        for token in SPECIAL_TOKENS:
            text = text.replace(token, " ")
        return _WORD_RE.findall(text.lower())

    def reward(self, word: str) -> float:
        """Reward of a single word (0 for unknown words and special tokens)."""
        return self.word_rewards.get(word.lower(), 0.0)

    def token_rewards(self, text_or_words: str | Iterable[str]) -> list[float]:
        """Per-word rewards of a text (split with :meth:`words`) or of an iterable of words."""
        words = self.words(text_or_words) if isinstance(text_or_words, str) else list(text_or_words)
        return [self.reward(w) for w in words]

    def score(self, text: str) -> float:
        """True sequence score of a text: the sum of its word rewards (special tokens ignored)."""
        return float(sum(self.token_rewards(text)))

    def token_reward_of_ids(self, ids: Sequence[int], tokenizer) -> list[float]:
        """Per-token rewards aligned one to one with ``ids`` (special tokens get 0)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        special = set(tokenizer.all_special_ids)
        tokens = tokenizer.convert_ids_to_tokens(list(ids))
        return [0.0 if i in special else self.reward(t) for i, t in zip(ids, tokens)]

    def to_dict(self) -> dict[str, float]:
        return dict(self.word_rewards)


# ---------------------------------------------------------------------------------------------------------------------
# Config and task
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class SyntheticTaskConfig:
    """Everything that defines a synthetic task; the build is a deterministic function of it.

    Args:
        seed: seed of every random draw (data, model init, warm-up).
        num_train_pairs / num_eval_pairs: sizes of the preference datasets.
        num_eval_prompts: number of held-out prompts for sampling-based evaluation.
        noise_std: std of the Gaussian noise added to the true score before labelling a pair (0: noiseless labels).
        min_response_words / max_response_words: response length range, in words (punctuation counts as a word).
        sentiment_rate: per adjective slot, the probability of a good or bad word in the pair responses.
        quality_spread: each pair response draws a quality q ~ U(-spread, spread); a slot is good with probability
            ``sentiment_rate * (1 + q)`` and bad with ``sentiment_rate * (1 - q)``.
        warmup_sentiment_rate / warmup_quality_spread: the same for the SFT warm-up corpus (more neutral).
        conversational: build the datasets and eval prompts as lists of ``{"role", "content"}`` messages.
        hidden_size / intermediate_size / num_layers / num_heads: the tiny Llama model.
        warmup_steps / warmup_batch_size / warmup_lr: the SFT warm-up (AdamW, cosine decay, loss on every token).
    """

    seed: int = 0
    num_train_pairs: int = 512
    num_eval_pairs: int = 128
    num_eval_prompts: int = 32
    noise_std: float = 0.5
    min_response_words: int = 8
    max_response_words: int = 20
    sentiment_rate: float = 0.45
    quality_spread: float = 0.6
    warmup_sentiment_rate: float = 0.3
    warmup_quality_spread: float = 0.5
    conversational: bool = False
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    warmup_steps: int = 200
    warmup_batch_size: int = 32
    warmup_lr: float = 5e-3

    def __post_init__(self):
        if not 1 <= self.min_response_words <= self.max_response_words:
            raise ValueError("need 1 <= min_response_words <= max_response_words")
        for name in ("sentiment_rate", "warmup_sentiment_rate"):
            if not 0.0 <= getattr(self, name) <= 0.5:
                raise ValueError(f"{name} must lie in [0, 0.5]")
        for name in ("quality_spread", "warmup_quality_spread"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1]")
        if self.noise_std < 0:
            raise ValueError("noise_std must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def task_cache_key(config: SyntheticTaskConfig) -> str:
    """A short stable hash of the config (and of the task format version), used to name cache directories."""
    return fingerprint("synthetic-task", TASK_FORMAT_VERSION, jsonable(config.to_dict()))[:16]


@dataclass
class SyntheticTask:
    """A built synthetic task.

    Attributes:
        config: the config it was built from.
        tokenizer: the word-level ``PreTrainedTokenizerFast`` (with chat template).
        model: the SFT warm-started ``LlamaForCausalLM``, in eval mode.
        train_dataset / eval_dataset: ``datasets.Dataset`` of preference pairs (``prompt``, ``chosen``,
            ``rejected``), plain strings (completions start with a space, no EOS) or message lists.
        eval_prompts: held-out prompts (strings, or message lists when ``config.conversational``).
        oracle: the true token-level reward.
        warmup_losses: the per-step training loss of the SFT warm-up.
        pair_scores: the noisy scores that labelled the pairs, ``{"train"|"eval": {"chosen"|"rejected": [...]}}``,
            row-aligned with the datasets (kept out of the datasets so that they stay in TRL's standard format).
        build_seconds: wall time of the build (0 when loaded from disk).
    """

    config: SyntheticTaskConfig
    tokenizer: Any
    model: Any
    train_dataset: Any
    eval_dataset: Any
    eval_prompts: list
    oracle: Oracle
    warmup_losses: list[float] = field(default_factory=list)
    pair_scores: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    build_seconds: float = 0.0

    def save(self, path: str | os.PathLike) -> str:
        """Save the task so that ``path`` works as a ``model_name_or_path`` (model + tokenizer via
        ``save_pretrained``) and :func:`load_task` restores everything (datasets via ``save_to_disk``)."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.train_dataset.save_to_disk(os.path.join(path, "train_dataset"))
        self.eval_dataset.save_to_disk(os.path.join(path, "eval_dataset"))
        meta = {
            "format_version": TASK_FORMAT_VERSION,
            "config": self.config.to_dict(),
            "eval_prompts": self.eval_prompts,
            "oracle": self.oracle.to_dict(),
            "warmup_losses": self.warmup_losses,
            "pair_scores": self.pair_scores,
        }
        with open(os.path.join(path, "synthetic_task.json"), "w") as f:
            json.dump(meta, f, indent=1)
        return path


def load_task(path: str | os.PathLike) -> SyntheticTask:
    """Load a task written by :meth:`SyntheticTask.save`."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.fspath(path)
    with open(os.path.join(path, "synthetic_task.json")) as f:
        meta = json.load(f)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return SyntheticTask(
        config=SyntheticTaskConfig(**meta["config"]),
        tokenizer=AutoTokenizer.from_pretrained(path),
        model=model,
        train_dataset=load_from_disk(os.path.join(path, "train_dataset")),
        eval_dataset=load_from_disk(os.path.join(path, "eval_dataset")),
        eval_prompts=meta["eval_prompts"],
        oracle=Oracle(meta["oracle"]),
        warmup_losses=meta.get("warmup_losses", []),
        pair_scores=meta.get("pair_scores", {}),
    )


# ---------------------------------------------------------------------------------------------------------------------
# The generating process
# ---------------------------------------------------------------------------------------------------------------------


def _sample_prompt(rng: np.random.Generator) -> tuple[str, str]:
    """Return (topic, user text)."""
    topic = TOPICS[rng.integers(len(TOPICS))]
    template = _PROMPT_TEMPLATES[rng.integers(len(_PROMPT_TEMPLATES))]
    return topic, template.format(topic=topic)


def _sample_response(
    rng: np.random.Generator, topic: str, min_words: int, max_words: int, sentiment_rate: float, quality: float
) -> list[str]:
    """Sample a response (list of words) about ``topic``: whole sentences of the grammar, cut to the length range."""
    p_good = sentiment_rate * (1.0 + quality)
    p_bad = sentiment_rate * (1.0 - quality)
    target = int(rng.integers(min_words, max_words + 1))
    words: list[str] = []
    while len(words) < target:
        for slot in _SENTENCES[rng.integers(len(_SENTENCES))].split():
            if slot == "T":
                words.append(topic)
            elif slot == "A":
                u = rng.random()
                if u < p_good:
                    words.append(_GOOD_LIST[rng.integers(len(_GOOD_LIST))])
                elif u < p_good + p_bad:
                    words.append(_BAD_LIST[rng.integers(len(_BAD_LIST))])
                else:
                    words.append(_ADJ_LIST[rng.integers(len(_ADJ_LIST))])
            elif slot in _SLOT_WORDS:
                choices = _SLOT_WORDS[slot]
                words.append(choices[rng.integers(len(choices))])
            else:
                words.append(slot)
    if len(words) > max_words:
        # Cut at the last sentence end that fits, else hard-cut (rare: only when max_words is tiny).
        ends = [i + 1 for i, w in enumerate(words[:max_words]) if w == "." and i + 1 >= min_words]
        words = words[: ends[-1]] if ends else words[:max_words]
    return words


def _plain_prompt(user_text: str, system_text: str | None = None) -> str:
    prefix = f"{system_text.lower()} " if system_text else ""
    return f"{prefix}question : {user_text} answer :"


def _messages_prompt(user_text: str, system_text: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_text}] if system_text else []
    return messages + [{"role": "user", "content": user_text}]


def _make_pairs(config: SyntheticTaskConfig, oracle: Oracle, rng: np.random.Generator, n: int):
    from datasets import Dataset

    rows: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    scores: dict[str, list[float]] = {"chosen": [], "rejected": []}
    spread = config.quality_spread
    for _ in range(n):
        topic, user_text = _sample_prompt(rng)
        for _attempt in range(20):
            responses = [
                _sample_response(
                    rng,
                    topic,
                    config.min_response_words,
                    config.max_response_words,
                    config.sentiment_rate,
                    float(rng.uniform(-spread, spread)),
                )
                for _ in range(2)
            ]
            noisy = [oracle.score(" ".join(r)) + config.noise_std * rng.standard_normal() for r in responses]
            if noisy[0] != noisy[1] and responses[0] != responses[1]:
                break
        order = (0, 1) if noisy[0] >= noisy[1] else (1, 0)
        chosen, rejected = responses[order[0]], responses[order[1]]
        scores["chosen"].append(float(noisy[order[0]]))
        scores["rejected"].append(float(noisy[order[1]]))
        chosen_text, rejected_text = " ".join(chosen), " ".join(rejected)
        if config.conversational:
            rows["prompt"].append(_messages_prompt(user_text))
            rows["chosen"].append([{"role": "assistant", "content": chosen_text}])
            rows["rejected"].append([{"role": "assistant", "content": rejected_text}])
        else:
            rows["prompt"].append(_plain_prompt(user_text))
            # Leading space: TRL concatenates prompt + completion as strings.
            rows["chosen"].append(" " + chosen_text)
            rows["rejected"].append(" " + rejected_text)
    return Dataset.from_dict(rows), scores


def render_chat(messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Render messages exactly as :data:`CHAT_TEMPLATE` does, without Jinja (fast path for the warm-up corpus)."""
    parts = []
    for message in messages:
        parts.append(f"<|{message['role']}|> {message['content']} ")
        if message["role"] == "assistant":
            parts.append(EOS_TOKEN + " ")
    if add_generation_prompt:
        parts.append(ASSISTANT_TAG + " ")
    return "".join(parts)


def _warmup_text(config: SyntheticTaskConfig, rng: np.random.Generator) -> str:
    """One SFT sequence (prompt + response + EOS), in plain or chat format at random."""
    topic, user_text = _sample_prompt(rng)
    quality = float(rng.uniform(-config.warmup_quality_spread, config.warmup_quality_spread))
    response = " ".join(
        _sample_response(
            rng, topic, config.min_response_words, config.max_response_words, config.warmup_sentiment_rate, quality
        )
    )
    if rng.random() < 0.5:
        return _plain_prompt(user_text) + " " + response + EOS_TOKEN
    return render_chat(_messages_prompt(user_text) + [{"role": "assistant", "content": response}])


def _build_model(config: SyntheticTaskConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    # Llama rather than Qwen2: transformers maps the qwen2 model type to its own BPE tokenizer class, which would
    # replace this word-level tokenizer when the saved task is reloaded with AutoTokenizer.
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(model_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def _warmup(model, tokenizer, config: SyntheticTaskConfig, rng: np.random.Generator) -> list[float]:
    """Plain-torch SFT warm-up: next-token cross-entropy on every non-pad token, AdamW with cosine decay."""
    pad_id = tokenizer.pad_token_id
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.warmup_lr, weight_decay=0.0, betas=(0.9, 0.98))
    total = max(config.warmup_steps, 1)
    warm = max(1, total // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1.0 + np.cos(np.pi * min(s, total) / total))
    )
    losses = []
    for _ in range(config.warmup_steps):
        texts = [_warmup_text(config, rng) for _ in range(config.warmup_batch_size)]
        sequences = tokenizer(texts, add_special_tokens=False)["input_ids"]
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, s in enumerate(sequences):
            input_ids[i, : len(s)] = torch.tensor(s)
            attention_mask[i, : len(s)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def build_task(
    config: SyntheticTaskConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_threads: int | None = 1,
) -> SyntheticTask:
    """Build the synthetic task (deterministic under ``config.seed``).

    Args:
        config: the task config (defaults to ``SyntheticTaskConfig()``).
        cache_dir: if given, the task is loaded from ``cache_dir/synthetic-<key>`` when present, and otherwise built
            and saved there (``key`` = :func:`task_cache_key`), so scripts and tests build it once. The task is then
            always the one loaded from that directory: its model's ``name_or_path`` is the directory, which lets
            TRL's ``DPOTrainer`` load a reference model from it. A model built without ``cache_dir`` has no path:
            pass TRL a ``ref_model`` explicitly (or :meth:`SyntheticTask.save` the task and pass the path).
        num_threads: torch CPU threads used during the warm-up (restored afterwards). The model is so small that one
            thread is about as fast as several on an idle machine and much faster on a busy one; ``None`` keeps the
            current setting.
    """
    config = config or SyntheticTaskConfig()
    if cache_dir is not None:
        target = os.path.join(os.path.expanduser(os.fspath(cache_dir)), f"synthetic-{task_cache_key(config)}")
        if os.path.isfile(os.path.join(target, "synthetic_task.json")):
            return load_task(target)
        task = build_task(config, num_threads=num_threads)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".synthetic-", dir=os.path.dirname(target))
        try:
            task.save(staging)
            try:
                os.replace(staging, target)  # atomic; fails if another process won the race, which is fine
            except OSError:
                pass
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        # Return the saved copy, so a cached task is the same object whether it was just built or not (in particular
        # `model.name_or_path` points at the directory, which TRL uses to load a reference model).
        loaded = load_task(target)
        loaded.build_seconds = task.build_seconds
        return loaded

    start = time.perf_counter()
    oracle = Oracle()
    tokenizer = build_tokenizer()
    streams = np.random.SeedSequence(config.seed).spawn(4)
    rng_train, rng_eval, rng_prompts, rng_warmup = (np.random.default_rng(s) for s in streams)

    train_dataset, train_scores = _make_pairs(config, oracle, rng_train, config.num_train_pairs)
    eval_dataset, eval_scores = _make_pairs(config, oracle, rng_eval, config.num_eval_pairs)
    eval_prompts = []
    for _ in range(config.num_eval_prompts):
        _, user_text = _sample_prompt(rng_prompts)
        eval_prompts.append(_messages_prompt(user_text) if config.conversational else _plain_prompt(user_text))

    previous_threads = torch.get_num_threads()
    try:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = _build_model(config, tokenizer)
            warmup_losses = _warmup(model, tokenizer, config, rng_warmup)
    finally:
        torch.set_num_threads(previous_threads)

    return SyntheticTask(
        config=config,
        tokenizer=tokenizer,
        model=model,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        eval_prompts=eval_prompts,
        oracle=oracle,
        warmup_losses=warmup_losses,
        pair_scores={"train": train_scores, "eval": eval_scores},
        build_seconds=time.perf_counter() - start,
    )
