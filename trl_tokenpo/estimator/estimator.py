"""`ContrastiveWeightEstimator`: token rewards `r_t = log pi_plus(y_t | s_t) - log pi_minus(y_t | s_t)`.

A call to :meth:`ContrastiveWeightEstimator.estimate` runs, one way:

    fit       pair.fit_pair: train the "plus" / "minus" LoRA adapters with TRL, or reuse saved ones that verify
    key       the score key: a fingerprint of the dataset, tokenizer, base weights, adapter files and settings
    fill      for each shard the store lacks: tokenize (inputs), load the pair on the base model (model_state), score
              every pass (scoring), write the shard (store); several processes share the shards through locks
    assemble  read the store back, add the columns to the dataset, report how well the rewards separate the pairs
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
from accelerate import PartialState
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..data import REF_LOGPS_COLUMNS, REWARD_COLUMNS, tokenize_preference_dataset
from ..fingerprint import (
    ModelFingerprint,
    fingerprint,
    fingerprint_dataset,
    fingerprint_tokenizer,
    reference_fingerprint,
)
from ..quantization import keep_4bit_layout
from .config import WeightEstimatorConfig
from .inputs import SIDES, ScoringInputs, scoring_inputs, validate_dataset
from .model_state import AttachedPair, attached_pair, is_peft_model
from .pair import ADAPTERS, adapter_digest, check_adapter_dir, fit_pair, fit_request, verify_saved_adapter
from .scoring import ScoringStats, Separation, label_logprobs, plan_batches, separation
from .store import IncompleteCacheError, ShardedScoreCache


logger = logging.getLogger(__name__)

__all__ = ["REF_COLUMNS", "REF_FINGERPRINT_COLUMN", "REWARD_COLUMNS", "ContrastiveWeightEstimator", "EstimatorStats"]

REF_COLUMNS = REF_LOGPS_COLUMNS
# With include_ref_logps: on every row, `reference_fingerprint(base model, tokenizer)` of the model that produced the
# reference log-probs, so a trainer can check them against its own reference model and tokenizer.
REF_FINGERPRINT_COLUMN = "ref_logps_fingerprint"
# Bump when what is stored under a key changes meaning (scoring rules, column definitions).
SCORE_FORMAT = "trl_tokenpo.estimator.scores/2"


@dataclass
class EstimatorStats(ScoringStats):
    """What the last `fit` / `score` did, besides the :class:`ScoringStats`: the adapters trained now, the score store
    (directory, key, whether it was a hit) and the :class:`Separation` of the returned rewards. Fields also read as
    `stats["name"]` / `stats.get("name")`, as when `stats` was a dict."""

    trained_adapters: list[str] = field(default_factory=list)
    cache_dir: str | None = None
    cache_key: str | None = None
    cache_hit: bool | None = None
    separation: Separation | None = None

    @property
    def tokens_per_second(self) -> float | None:
        return self.scored_tokens / self.scoring_seconds if self.scoring_seconds else None

    def __getitem__(self, name: str) -> Any:
        try:
            return getattr(self, name)
        except AttributeError:
            raise KeyError(name) from None

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)


class ContrastiveWeightEstimator:
    """
    Estimates TIS-DPO token rewards `r_t = log pi_plus(y_t|s_t) - log pi_minus(y_t|s_t)` for every completion token.

    The pair `(pi_plus, pi_minus)` is built on one base model, as set by [`WeightEstimatorConfig.method`]: two LoRA
    adapters trained with DPO (`"dpo"`: on the data, and on the data with chosen and rejected swapped; the loss is
    TRL's sigmoid DPO loss, computed by [`TDPOTrainer`] with `alpha=0` and its memory-bounded kernel) or [`~trl.SFTTrainer`] (`"sft"`: on (prompt, chosen), and on (prompt, rejected)), or no training at all
    (`"prompt"`: the base model with a positive and a negative system prompt). The scored completion tokens are always
    exactly the trainer's `chosen_ids` / `rejected_ids` (TRL's DPO tokenization without truncation, EOS or end-of-turn
    included), so the output feeds [`TISDPOTrainer`] directly.

    Example:

    ```python
    >>> from trl_tokenpo import ContrastiveWeightEstimator, TISDPOConfig, TISDPOTrainer, WeightEstimatorConfig

    >>> estimator = ContrastiveWeightEstimator("Qwen/Qwen2.5-0.5B-Instruct", args=WeightEstimatorConfig("weights"))
    >>> weighted = estimator.estimate(dataset)  # adds chosen_token_rewards / rejected_token_rewards
    >>> trainer = TISDPOTrainer("Qwen/Qwen2.5-0.5B-Instruct", args=TISDPOConfig("tisdpo"), train_dataset=weighted)
    ```

    Fit once, score several datasets: `estimator.fit(train)`, then `estimator.score(train)`, `estimator.score(other)`.
    Nothing is recomputed when the inputs are unchanged: adapters are reused when their fit key matches (dataset, base
    weights, tokenizer, method, LoRA and training settings, `max_length`) and their files verify, and scores are read
    from the on-disk store when their key matches (dataset, tokenizer and chat template, base weights, adapter files,
    method, prompts, `max_length`, `include_ref_logps`). An interrupted scoring run resumes from its last complete
    shard; several processes on one `cache_dir` share the work.

    The base model is left as it was found between calls. The base-weight fingerprint is recomputed whenever a weight
    may have changed (optimizer step, in-place edit, new parameter, `load_state_dict(..., assign=True)`, dtype or
    device change); only in-place edits through `tensor.data` go unseen.

    Args:
        model (`str` or [`~transformers.PreTrainedModel`]):
            The base model, or a path / hub id loaded with `AutoModelForCausalLM` (float32, or bfloat16 when
            `args.bf16`).
        processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            The tokenizer; loaded with `AutoTokenizer` from the model's name or path when None. Its pad token is set to
            its EOS token if missing, as TRL does.
        args ([`WeightEstimatorConfig`], *optional*):
            Settings; defaults to `WeightEstimatorConfig("<model name>-weights")`.

    Attributes:
        adapter_paths (`dict[str, str]` or `None`): directories of the `"plus"` / `"minus"` adapters.
        stats ([`EstimatorStats`]): what the last `fit` / `score` call did.
    """

    def __init__(self, model: str | PreTrainedModel, processing_class=None, args: WeightEstimatorConfig | None = None):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path or "model"
            args = WeightEstimatorConfig(f"{str(name).rstrip('/').split('/')[-1]}-weights")
        elif not isinstance(args, WeightEstimatorConfig):
            raise TypeError(f"args must be a WeightEstimatorConfig, got {type(args).__name__}.")
        self.args = args
        self.state = PartialState()
        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16 if args.bf16 else torch.float32)
        elif not isinstance(model, PreTrainedModel):
            raise TypeError(f"model must be a model path / hub id or a PreTrainedModel, got {type(model).__name__}.")
        if is_peft_model(model):
            raise ValueError(
                "model is a PeftModel. The estimator adds its own adapters to a plain base model: merge and unload "
                "yours first (model.merge_and_unload()), or pass the base model."
            )
        quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
        if getattr(model, "hf_device_map", None) is None and not quantized:
            model.to(args.device)
        keep_4bit_layout(model)  # the scoring's eval-mode forwards must not convert a 4-bit base (quantization.py)
        self.model = model
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(model.config._name_or_path)
        self.processing_class = processing_class
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.adapter_paths: dict[str, str] | None = None
        self.stats = EstimatorStats()
        self._base_fingerprint = ModelFingerprint(model)

    # ----------------------------------------------------------------------------------------------------------------
    # Public API
    # ----------------------------------------------------------------------------------------------------------------

    def estimate(self, dataset: Dataset) -> Dataset:
        """Fit the pair (or reuse saved adapters) and score `dataset`.

        Returns `dataset` (all rows, same order, original columns untouched) with `chosen_token_rewards` and
        `rejected_token_rewards` added (and `chosen_ref_logps` / `rejected_ref_logps` with `include_ref_logps`): one
        float32 per token of TRL's tokenized completion. With `include_ref_logps`, the string column
        `ref_logps_fingerprint` holds on every row the [`~trl_tokenpo.fingerprint.reference_fingerprint`] of the base
        model and tokenizer, which a trainer recomputes from its own reference model to refuse a mismatch. A repeated
        call with unchanged inputs trains and scores nothing.
        """
        validate_dataset(dataset)
        self.fit(dataset)
        return self.score(dataset)

    def fit(self, dataset: Dataset) -> ContrastiveWeightEstimator:
        """Train the `"plus"` and `"minus"` adapters on `dataset`, or reuse saved ones with the same fit key whose
        files verify. Before training, the log says why nothing saved was reused (the closest saved fit, field by
        field). The adapters are saved under `output_dir/adapters/<key>/{plus,minus}` and not kept in memory;
        [`score`] loads them. Nothing is trained for the `"prompt"` method."""
        validate_dataset(dataset)
        self.stats = EstimatorStats()
        if self.args.method == "prompt":
            self.adapter_paths = None
            return self
        digests = {
            "dataset": fingerprint_dataset(dataset),
            "base_model": self.base_model_fingerprint(),
            "tokenizer": fingerprint_tokenizer(self.processing_class),
        }
        request = fit_request(self.args, dataset, digests, self.state.num_processes)
        self.adapter_paths, self.stats.trained_adapters = fit_pair(
            self.model, self.processing_class, self.args, dataset, request, self.state
        )
        return self

    def load_adapters(self, plus: str | os.PathLike, minus: str | os.PathLike) -> ContrastiveWeightEstimator:
        """Use adapters trained elsewhere (PEFT adapter directories of this base model) as `pi_plus` / `pi_minus`."""
        for path in (plus, minus):
            check_adapter_dir(path)
        self.adapter_paths = {"plus": os.fspath(plus), "minus": os.fspath(minus)}
        return self

    def score(self, dataset: Dataset) -> Dataset:
        """Token rewards of `dataset` with the fitted pair (see [`estimate`] for the output); needs [`fit`] or
        [`load_adapters`] first unless the method is `"prompt"`."""
        validate_dataset(dataset)
        if self.args.method != "prompt" and self.adapter_paths is None:
            raise RuntimeError(
                f"score() needs the pi_plus / pi_minus adapters of the {self.args.method!r} method: call "
                "fit(dataset) first (it reuses adapters saved under output_dir when the fit key matches), "
                "load_adapters(plus, minus), or estimate(dataset)."
            )
        key, request = self._score_key(dataset)
        columns = list(REWARD_COLUMNS) + (list(REF_COLUMNS) if self.args.include_ref_logps else [])
        store = ShardedScoreCache(self.args.cache_dir, key[:32], len(dataset), self.args.cache_shard_size, columns, request)
        self.stats = EstimatorStats(
            trained_adapters=self.stats.trained_adapters, cache_dir=str(store.directory), cache_key=key, cache_hit=True
        )
        values = None
        # Under torchrun each rank first scores its share (shard i on rank i % world_size), then every process scores
        # whatever is still missing (left by another job on the same cache_dir, or found damaged while reading)
        state = self.state
        self._fill(store, dataset, [i for i in store.missing_shards() if i % state.num_processes == state.process_index])
        state.wait_for_everyone()
        for _ in range(3):
            self._fill(store, dataset, store.missing_shards())
            try:
                values = store.load_all()
                break
            except IncompleteCacheError as exc:
                logger.warning(f"{exc}; scoring them again.")
        if values is None:
            raise RuntimeError(f"The score store {store.directory} could not be completed (shards keep disappearing).")
        self._report(values)
        return self._assemble(dataset, values, key)

    def tokenize(self, dataset: Dataset) -> Dataset:
        """`dataset` tokenized exactly as the trainer does it (TRL's DPO tokenization, no truncation, no row dropped):
        adds `prompt_ids`, `chosen_ids`, `rejected_ids`."""
        validate_dataset(dataset)
        return tokenize_preference_dataset(dataset, self.processing_class, num_proc=self.args.dataset_num_proc)

    def base_model_fingerprint(self) -> str:
        """[`~trl_tokenpo.fingerprint.fingerprint_base_model`] of the base model, recomputed when a weight may have
        changed."""
        return self._base_fingerprint()

    # ----------------------------------------------------------------------------------------------------------------
    # Steps
    # ----------------------------------------------------------------------------------------------------------------

    def _score_key(self, dataset: Dataset) -> tuple[str, dict]:
        args = self.args
        adapters = None
        if args.method != "prompt":
            for path in self.adapter_paths.values():
                problem = verify_saved_adapter(path, fit_key=None) if os.path.exists(f"{path}/trained.json") else None
                if problem:
                    raise RuntimeError(f"The adapter in {path} changed since it was fitted ({problem}): call fit() again.")
            adapters = {name: adapter_digest(self.adapter_paths[name]) for name in ADAPTERS}
        request = {
            "format": SCORE_FORMAT,
            "dataset": fingerprint_dataset(dataset),
            "tokenizer": fingerprint_tokenizer(self.processing_class),
            "base_model": self.base_model_fingerprint(),
            "method": args.method,
            "adapters": adapters,
            "prompts": [args.positive_system_prompt, args.negative_system_prompt] if args.method == "prompt" else None,
            "max_length": args.max_length,
            "include_ref_logps": args.include_ref_logps,
            "shard_size": args.cache_shard_size,
        }
        return fingerprint(request), request

    def _fill(self, store: ShardedScoreCache, dataset: Dataset, shards: Sequence[int]) -> None:
        """Score the `shards` the store lacks; one held by another process is waited for, never scored twice at once."""
        work = _Work(self, store, dataset, sum(len(store.shard_rows(i)) for i in shards))
        try:
            work.run(shards)
        finally:
            work.close()

    def _passes(self) -> list[tuple[str, str | None, str]]:
        """(result, adapter to activate or None for the base model, context) of each forward pass."""
        if self.args.method == "prompt":
            passes = [("plus", None, "positive_ids"), ("minus", None, "negative_ids")]
        else:
            passes = [("plus", "plus", "prompt_ids"), ("minus", "minus", "prompt_ids")]
        return passes + ([("ref", None, "prompt_ids")] if self.args.include_ref_logps else [])

    def _score_shard(self, pair: AttachedPair, inputs: ScoringInputs, rows: Sequence[int]) -> dict[str, list]:
        """The store columns of `rows`: each pass runs over all of them with one adapter active, the 2 * len(rows)
        sequences (row j, side s at index 2j + s) length-sorted once for every pass; cuts are counted on the first."""
        completions = [inputs.completions[side][r] for r in rows for side in SIDES]
        passes = self._passes()
        contexts = {name: [inputs.contexts[name][r] for r in rows for _ in SIDES] for _, _, name in passes}
        first = contexts[passes[0][2]]
        order = sorted(range(len(completions)), key=lambda k: -(len(first[k]) + len(completions[k])))
        total = sum(len(c) for c in completions)
        results: dict[str, torch.Tensor] = {}
        for index, (result, adapter, context) in enumerate(passes):
            batches, cuts = plan_batches(
                contexts[context], completions, order, 2 * self.args.scoring_batch_size, self.args.max_length,
                self.tokenizer.pad_token_id,
            )  # fmt: skip
            if index == 0:
                self.stats.add_cuts(cuts)
            flat = torch.zeros(total, dtype=torch.float32)
            with pair.use(adapter) as model:
                for batch in batches:
                    flat[batch.destinations] = label_logprobs(model, batch)
            results[result] = flat
        self.stats.scored_tokens += total
        bounds = [0]
        for completion in completions:
            bounds.append(bounds[-1] + len(completion))
        arrays = {"token_rewards": (results["plus"] - results["minus"]).numpy()}
        if "ref" in results:
            arrays["ref_logps"] = results["ref"].numpy()
        return {
            f"{side}_{suffix}": [values[bounds[k] : bounds[k + 1]] for k in range(s, len(completions), 2)]
            for suffix, values in arrays.items()
            for s, side in enumerate(SIDES)
        }

    def _report(self, values: dict[str, list]) -> None:
        stats, max_length = self.stats, self.args.max_length
        if stats.context_truncated or stats.completion_truncated:
            logger.warning(
                f"Scoring (max_length={max_length}): {stats.context_truncated} sequences had their context cut on the "
                f"left, {stats.completion_truncated} completions were cut; {stats.unscored_tokens} completion tokens "
                "got the neutral reward 0.0."
            )
        stats.separation = separation(values[REWARD_COLUMNS[0]], values[REWARD_COLUMNS[1]])
        if self.state.is_main_process:  # shown either way, like the adapter training's notices
            message = f"Token rewards ({self.args.method} method): {stats.separation.describe()}."
            if not stats.separation.separated:
                message += (
                    " The contrastive pair may not fit this task (see docs/estimator.md, 'Does the pair fit the task?')."
                )
            logger.warning(message)

    def _assemble(self, dataset: Dataset, values: dict[str, list], key: str) -> Dataset:
        added = list(values) + ([REF_FINGERPRINT_COLUMN] if self.args.include_ref_logps else [])
        present = [c for c in added if c in dataset.column_names]
        if present:
            logger.warning(f"The dataset already has {present}; they are replaced by the new estimate.")
            dataset = dataset.remove_columns(present)
        feature = datasets.List(datasets.Value("float32"))
        for column, rows in values.items():
            new = fingerprint(dataset._fingerprint, key, column)[:32]
            dataset = dataset.add_column(column, rows, feature=feature, new_fingerprint=new)
        if self.args.include_ref_logps:
            reference = reference_fingerprint(self.model, self.processing_class, self.base_model_fingerprint())
            new = fingerprint(dataset._fingerprint, key, REF_FINGERPRINT_COLUMN)[:32]
            dataset = dataset.add_column(
                REF_FINGERPRINT_COLUMN, [reference] * len(dataset), feature=datasets.Value("string"), new_fingerprint=new
            )
        return dataset


class _Work:
    """The scoring work of one `_fill`: inputs tokenized and the pair loaded on first use, each shard scored under its
    lock and written, progress shown."""

    def __init__(self, estimator: ContrastiveWeightEstimator, store: ShardedScoreCache, dataset: Dataset, rows: int):
        self.estimator, self.store, self.dataset, self.rows = estimator, store, dataset, rows
        self.resources = contextlib.ExitStack()
        self.inputs: ScoringInputs | None = None

    def _start(self) -> None:
        est = self.estimator
        self.inputs = scoring_inputs(self.dataset, est.args, est.processing_class)
        self.pair = self.resources.enter_context(attached_pair(est.model, est.adapter_paths))
        disable = bool(est.args.disable_tqdm) or not est.state.is_local_main_process
        self.bar = self.resources.enter_context(
            tqdm(total=self.rows, unit="row", desc=f"Scoring tokens ({est.args.method})", disable=disable)
        )

    def run(self, shards: Sequence[int]) -> None:
        deferred = [i for i in shards if not self._try(i, wait=False)]
        for i in deferred:
            logger.info(f"Shard {i} of {self.store.directory} is being scored by another process: waiting for it.")
            self._try(i, wait=True)

    def _try(self, shard: int, wait: bool) -> bool:
        """Score and write `shard` under its lock unless it is stored; False when another process holds the lock."""
        store = self.store
        if store.has_shard(shard):
            return True
        with store.lock(shard, wait=wait) as held:
            if not held:
                return False
            if store.has_shard(shard):
                return True  # written by the process we waited for
            if self.inputs is None:
                self._start()
            stats, rows = self.estimator.stats, store.shard_rows(shard)
            start = time.perf_counter()
            with torch.inference_mode():
                columns = self.estimator._score_shard(self.pair, self.inputs, rows)
            stats.scoring_seconds += time.perf_counter() - start
            store.write_shard(shard, columns)
        stats.cache_hit = False
        stats.scored_shards.append(shard)
        stats.scored_rows += len(rows)
        self.bar.update(len(rows))
        self.bar.set_postfix(tok_s=f"{stats.tokens_per_second or 0:.0f}")
        return True

    def close(self) -> None:
        self.resources.close()
