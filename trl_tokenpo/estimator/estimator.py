"""The contrastive weight estimator of TIS-DPO: token rewards from a pair of models (pi_plus, pi_minus).

For every completion token of a preference dataset, ``r_t = log pi_plus(y_t | s_t) - log pi_minus(y_t | s_t)``, with
the token ids of TRL's own DPO tokenization (so the values line up one to one with the trainer's ``chosen_ids`` /
``rejected_ids``). The pair lives on ONE base model: two LoRA adapters named ``"plus"`` and ``"minus"`` (methods
``"sft"`` and ``"dpo"``), or the base model under two system prompts (method ``"prompt"``).

Life of a call to :meth:`ContrastiveWeightEstimator.estimate`:

1. ``fit``: the adapters are trained with TRL's ``SFTTrainer`` / ``DPOTrainer`` (``peft_config`` on the base model),
   saved under ``output_dir/adapters/<fit fingerprint>/{plus,minus}`` and unloaded, leaving the base model as it was.
   Saved adapters whose fit fingerprint matches are reused without training.
2. ``score``: the results are looked up in a :class:`~trl_tokenpo.estimator.cache.ShardedScoreCache` keyed by a
   fingerprint of everything they depend on. Missing shards are scored (both adapters loaded on the base model; each
   shard is length-sorted and scored whole with ``"plus"``, then whole with ``"minus"``, the active adapter merged
   into float32 / float16 base weights for its pass and the weights restored bit for bit afterwards; label log-probs
   gathered through TRL's fused LM head, never full-vocabulary logits for a batch), written atomically one by one,
   and the whole cache is read back. Under ``torchrun`` / ``accelerate``, rank ``r``
   scores the shards ``i`` with ``i % world_size == r``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import gc
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset, DatasetDict, IterableDataset
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, TrainingArguments
from transformers.utils import logging
from trl import DPOConfig
from trl.data_utils import is_conversational

from ..data import tokenize_preference_dataset
from ..quantization import keep_4bit_layout
from .cache import (
    IncompleteCacheError,
    ShardedScoreCache,
    fingerprint,
    fingerprint_base_model,
    fingerprint_dataset,
    fingerprint_tokenizer,
)
from .config import WeightEstimatorConfig


logger = logging.get_logger(__name__)

__all__ = ["REF_COLUMNS", "REF_FINGERPRINT_COLUMN", "REWARD_COLUMNS", "ContrastiveWeightEstimator"]

REWARD_COLUMNS = ("chosen_token_rewards", "rejected_token_rewards")
REF_COLUMNS = ("chosen_ref_logps", "rejected_ref_logps")
# With include_ref_logps: on every row, `reference_fingerprint(base model, tokenizer)` of the model that produced the
# reference log-probs, so a trainer can check them against its own reference model and tokenizer.
REF_FINGERPRINT_COLUMN = "ref_logps_fingerprint"
ADAPTERS = ("plus", "minus")
SIDES = ("chosen", "rejected")
# Bump when what is stored under a key changes meaning (scoring rules, column definitions).
SCORE_FORMAT = "trl_tokenpo.estimator.scores/1"
FIT_FORMAT = "trl_tokenpo.estimator.adapters/1"
# Columns TRL's preference tokenization reads besides prompt/chosen/rejected.
_EXTRA_INPUT_COLUMNS = ("tools", "chat_template_kwargs")
# TrainingArguments fields that change what an adapter training run produces (part of the fit fingerprint).
_TRAINING_FIELDS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "weight_decay", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "optim", "optim_args", "adam_beta1",
    "adam_beta2", "adam_epsilon", "max_grad_norm", "seed", "data_seed", "bf16", "fp16", "tf32",
    "label_smoothing_factor",
    "neftune_noise_alpha", "dataloader_drop_last", "train_sampling_strategy", "average_tokens_across_devices",
    "full_determinism",
)  # fmt: skip
# TrainingArguments fields never copied into the adapters' trainer configs.
_NOT_COPIED = {"output_dir", "resume_from_checkpoint", "push_to_hub", "hub_model_id", "hub_token", "do_eval",
               "eval_strategy", "load_best_model_at_end", "metric_for_best_model", "eval_on_start"}  # fmt: skip
_MISSING = object()


class ContrastiveWeightEstimator:
    """
    Estimates TIS-DPO token rewards `r_t = log pi_plus(y_t|s_t) - log pi_minus(y_t|s_t)` for every completion token.

    The pair `(pi_plus, pi_minus)` is built on one base model, as set by [`WeightEstimatorConfig.method`]: two LoRA
    adapters trained with TRL's [`~trl.DPOTrainer`] (`"dpo"`: on the data, and on the data with chosen and rejected
    swapped) or [`~trl.SFTTrainer`] (`"sft"`: on (prompt, chosen), and on (prompt, rejected)), or no training at all
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
    Nothing is recomputed when the inputs are unchanged: adapters are reused when their fit fingerprint matches
    (dataset, base weights, tokenizer, method, LoRA and training settings), and scores are read from the on-disk cache
    when their key matches (dataset, tokenizer and chat template, base weights, adapter weights, method, prompts,
    `max_length`, `include_ref_logps`). An interrupted scoring run resumes from its last complete shard.

    The base model is left as it was found between calls: adapters are loaded for scoring and unloaded afterwards, and
    the trainers' changes (frozen parameters, patched forward, train mode) are undone. Fingerprints of the base weights
    are computed once and recomputed when a parameter is modified in place through autograd-visible operations (an
    optimizer step); after editing weights through `.data`, create a new estimator.

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
        adapter_paths (`dict[str, str]` or `None`): directories of the fitted `"plus"` / `"minus"` adapters.
        stats (`dict`): what the last `fit` / `score` call did (trained adapters, scored shards and tokens, tokens/s,
            truncations, cache key and directory).
    """

    def __init__(
        self,
        model: str | PreTrainedModel,
        processing_class=None,
        args: WeightEstimatorConfig | None = None,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path or "model"
            args = WeightEstimatorConfig(f"{str(name).rstrip('/').split('/')[-1]}-weights")
        elif not isinstance(args, WeightEstimatorConfig):
            raise TypeError(f"args must be a WeightEstimatorConfig, got {type(args).__name__}.")
        self.args = args
        self.state = PartialState()

        if isinstance(model, str):
            dtype = torch.bfloat16 if args.bf16 else torch.float32
            model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
        elif not isinstance(model, PreTrainedModel):
            raise TypeError(f"model must be a model path / hub id or a PreTrainedModel, got {type(model).__name__}.")
        if _is_peft_model(model):
            raise ValueError(
                "model is a PeftModel. The estimator adds its own adapters to a plain base model: merge and unload "
                "yours first (model.merge_and_unload()), or pass the base model."
            )
        movable = getattr(model, "hf_device_map", None) is None and not (
            getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
        )
        if movable:
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
        self.stats: dict[str, Any] = {}
        self._base_fingerprint_memo: tuple[list[torch.Tensor], list[int], str] | None = None
        self._merge_backup: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    # ----------------------------------------------------------------------------------------------------------------
    # Public API
    # -----------------------------------------------------------------------------------------------------------------

    def estimate(self, dataset: Dataset) -> Dataset:
        """Fit the pair (or reuse saved adapters) and score `dataset`.

        Returns `dataset` (all rows, same order, original columns untouched) with `chosen_token_rewards` and
        `rejected_token_rewards` added (and `chosen_ref_logps` / `rejected_ref_logps` with `include_ref_logps`): one
        float32 per token of TRL's tokenized completion. With `include_ref_logps`, the string column
        `ref_logps_fingerprint` holds on every row the [`~trl_tokenpo.estimator.cache.reference_fingerprint`] of the
        base model and tokenizer, which a trainer can recompute from its own reference model to refuse a mismatch. A
        repeated call with unchanged inputs trains and scores nothing.
        """
        self._validate(dataset)
        self.fit(dataset)
        return self.score(dataset)

    def fit(self, dataset: Dataset) -> ContrastiveWeightEstimator:
        """Train the `"plus"` and `"minus"` adapters on `dataset`, or reuse saved ones with the same fit fingerprint.

        The adapters are saved under `output_dir/adapters/<fingerprint>/{plus,minus}` (on the main process) and are
        not kept in memory; [`score`] loads them. Nothing is trained for the `"prompt"` method.
        """
        self._validate(dataset)
        self.stats = {"trained_adapters": []}
        if self.args.method == "prompt":
            self.adapter_paths = None
            return self
        key, request = self._fit_key(dataset)
        directory = Path(self.args.output_dir) / "adapters" / key[:16]
        paths = {name: directory / name for name in ADAPTERS}
        todo = [name for name in ADAPTERS if not _adapter_is_saved(paths[name], key)]
        if todo:
            logger.info(f"Training the {' and '.join(todo)} adapter(s) of the {self.args.method!r} method.")
            train_data = self._adapter_datasets(self.tokenize(dataset))
            for name in todo:
                self._train_adapter(name, train_data[name], paths[name], key)
                self.stats["trained_adapters"].append(name)
            if self.state.is_main_process:
                _atomic_write_json(directory / "fit.json", request)
            self.state.wait_for_everyone()
        else:
            logger.info(f"Reusing the adapters saved in {directory} (same fit fingerprint).")
        self.adapter_paths = {name: str(path) for name, path in paths.items()}
        return self

    def load_adapters(self, plus: str | os.PathLike, minus: str | os.PathLike) -> ContrastiveWeightEstimator:
        """Use adapters trained elsewhere (PEFT adapter directories of this base model) as `pi_plus` / `pi_minus`."""
        for path in (plus, minus):
            if not (Path(path) / "adapter_config.json").is_file():
                raise FileNotFoundError(f"{path} is not a PEFT adapter directory (no adapter_config.json).")
        self.adapter_paths = {"plus": os.fspath(plus), "minus": os.fspath(minus)}
        return self

    def score(self, dataset: Dataset) -> Dataset:
        """Token rewards of `dataset` with the fitted pair (see [`estimate`] for the output); needs [`fit`] first
        unless the method is `"prompt"`."""
        self._validate(dataset)
        if self.args.method != "prompt" and self.adapter_paths is None:
            raise RuntimeError(
                f"score() needs the pi_plus / pi_minus adapters of the {self.args.method!r} method: call "
                "fit(dataset) first (it reuses adapters saved under output_dir when the fit fingerprint matches), "
                "load_adapters(plus, minus), or estimate(dataset)."
            )
        key, request = self._score_key(dataset)
        columns = list(REWARD_COLUMNS) + (list(REF_COLUMNS) if self.args.include_ref_logps else [])
        with self.state.main_process_first():
            cache = ShardedScoreCache(
                self.args.cache_dir,
                key[:32],
                num_rows=len(dataset),
                shard_size=self.args.cache_shard_size,
                columns=columns,
                dtype="float32",
                request=request,
            )
        stats = self.stats.setdefault("trained_adapters", [])  # keep what fit() recorded
        self.stats = {
            "trained_adapters": stats,
            "cache_dir": str(cache.directory),
            "cache_key": key,
            "cache_hit": True,
            "scored_shards": [],
            "scored_rows": 0,
            "scored_tokens": 0,
            "scoring_seconds": 0.0,
            "context_truncated": 0,
            "completion_truncated": 0,
            "unscored_tokens": 0,
        }
        values = None
        for _attempt in range(3):
            if cache.is_complete():
                try:
                    values = cache.load_all()
                    break
                except IncompleteCacheError as exc:  # corrupt shard found (and deleted): recompute it
                    logger.warning(f"Score cache: {exc}; recomputing.")
                self.state.wait_for_everyone()
            self.stats["cache_hit"] = False
            self._fill_cache(cache, dataset)
        if values is None:
            raise RuntimeError(f"The score cache {cache.directory} could not be completed.")

        out = dataset
        added = columns + ([REF_FINGERPRINT_COLUMN] if self.args.include_ref_logps else [])
        present = [c for c in added if c in out.column_names]
        if present:
            logger.warning(f"The dataset already has {present}; they are replaced by the new estimate.")
            out = out.remove_columns(present)
        feature = _float32_list_feature()
        for column in columns:
            out = out.add_column(
                column,
                values[column],
                feature=feature,
                new_fingerprint=fingerprint(out._fingerprint, key, column)[:32],
            )
        if self.args.include_ref_logps:
            import datasets

            # = reference_fingerprint(self.model, self.processing_class), with the memoized base digest
            reference = fingerprint(
                "reference-logps-v1", self.base_model_fingerprint(), fingerprint_tokenizer(self.processing_class)
            )
            out = out.add_column(
                REF_FINGERPRINT_COLUMN,
                [reference] * len(out),
                feature=datasets.Value("string"),
                new_fingerprint=fingerprint(out._fingerprint, key, REF_FINGERPRINT_COLUMN)[:32],
            )
        return out

    def tokenize(self, dataset: Dataset) -> Dataset:
        """`dataset` tokenized exactly as the trainer does it (TRL's DPO tokenization, no truncation, no row dropped):
        adds `prompt_ids`, `chosen_ids`, `rejected_ids` (implicit prompts are extracted, EOS appended to standard
        data)."""
        self._validate(dataset)
        return self._tokenize(dataset)

    def _tokenize(self, dataset: Dataset) -> Dataset:
        return tokenize_preference_dataset(
            dataset,
            self.processing_class,
            max_length=None,
            num_proc=self.args.dataset_num_proc,
            dataset_name="estimator",
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Fingerprints
    # -----------------------------------------------------------------------------------------------------------------

    def base_model_fingerprint(self) -> str:
        """Digest of the base model ([`~trl_tokenpo.estimator.cache.fingerprint_base_model`]: class, config without
        paths and versions, every weight and persistent buffer; the same with or without PEFT adapters injected)."""
        memo = self._base_fingerprint_memo
        if memo is not None:
            tensors, versions, digest = memo
            if all(t._version == v for t, v in zip(tensors, versions)):
                return digest
        tensors = [t for t in self.model.state_dict(keep_vars=True).values() if t is not None]
        digest = fingerprint_base_model(self.model)
        self._base_fingerprint_memo = (tensors, [t._version for t in tensors], digest)
        return digest

    def _fit_key(self, dataset: Dataset) -> tuple[str, dict]:
        args = self.args
        training = {name: _plain(getattr(args, name, None)) for name in _TRAINING_FIELDS}
        request = {
            "format": FIT_FORMAT,
            "dataset": fingerprint_dataset(dataset),
            "base_model": self.base_model_fingerprint(),
            "tokenizer": fingerprint_tokenizer(self.processing_class),
            "method": args.method,
            "beta": args.beta if args.method == "dpo" else None,
            "lora": self._lora_settings(),
            "training": training,
            "max_length": args.max_length,
            "num_processes": self.state.num_processes,
        }
        return fingerprint(request), request

    def _score_key(self, dataset: Dataset) -> tuple[str, dict]:
        args = self.args
        prompts = None
        if args.method == "prompt":
            prompts = {"positive": args.positive_system_prompt, "negative": args.negative_system_prompt}
        adapters = None
        if args.method != "prompt":
            adapters = {name: _fingerprint_adapter_dir(self.adapter_paths[name]) for name in ADAPTERS}
        request = {
            "format": SCORE_FORMAT,
            "dataset": fingerprint_dataset(dataset),
            "tokenizer": fingerprint_tokenizer(self.processing_class),
            "base_model": self.base_model_fingerprint(),
            "method": args.method,
            "adapters": adapters,
            "prompts": prompts,
            "max_length": args.max_length,
            "include_ref_logps": args.include_ref_logps,
            "shard_size": args.cache_shard_size,
        }
        return fingerprint(request), request

    # ----------------------------------------------------------------------------------------------------------------
    # Training the adapters
    # -----------------------------------------------------------------------------------------------------------------

    def _lora_settings(self) -> dict:
        args = self.args
        return {
            "r": args.lora_r,
            "lora_alpha": args.lora_alpha,
            "lora_dropout": args.lora_dropout,
            "target_modules": list(args.lora_target_modules) if args.lora_target_modules else "all-linear",
        }

    def _lora_config(self):
        from peft import LoraConfig

        return LoraConfig(task_type="CAUSAL_LM", bias="none", **self._lora_settings())

    def _adapter_datasets(self, tokenized: Dataset) -> dict[str, Dataset]:
        """The training data of each adapter, from the trainer-prepared dataset (prompt extracted, EOS appended)."""
        keep = ["prompt", "chosen", "rejected"] + [c for c in _EXTRA_INPUT_COLUMNS if c in tokenized.column_names]
        data = tokenized.select_columns(keep)
        if self.args.method == "sft":
            return {
                "plus": data.remove_columns("rejected").rename_column("chosen", "completion"),
                "minus": data.remove_columns("chosen").rename_column("rejected", "completion"),
            }
        swapped = data.rename_columns({"chosen": "__rejected", "rejected": "chosen"}).rename_column(
            "__rejected", "rejected"
        )
        return {"plus": data, "minus": swapped}

    def _trainer_config(self, config_class, name: str, **extra):
        """A TRL trainer config carrying this config's TrainingArguments fields, writing under output_dir/train/."""
        kwargs = {
            f.name: getattr(self.args, f.name)
            for f in dataclasses.fields(TrainingArguments)
            if f.init and f.name not in _NOT_COPIED
        }
        kwargs.update(
            output_dir=os.path.join(self.args.output_dir, "train", name),
            eval_strategy="no",
            push_to_hub=False,
            load_best_model_at_end=False,
            run_name=f"{self.args.run_name}-{name}" if self.args.run_name else None,
            **extra,
        )
        return config_class(**kwargs)

    def _train_adapter(self, name: str, train_dataset: Dataset, target: Path, fit_key: str) -> None:
        """Train one adapter on the base model with TRL, save it to `target` (main process), unload it."""
        from trl import DPOTrainer, SFTConfig, SFTTrainer

        args = self.args
        if args.method == "sft":
            config = self._trainer_config(
                SFTConfig,
                name,
                max_length=args.max_length,
                completion_only_loss=True,
                packing=False,
                dataset_num_proc=args.dataset_num_proc,
            )
            trainer_class = SFTTrainer
        else:
            config = self._trainer_config(
                DPOConfig, name, beta=args.beta, max_length=args.max_length, dataset_num_proc=args.dataset_num_proc
            )
            trainer_class = DPOTrainer
        snapshot = _ModelSnapshot(self.model)
        trainer = None
        try:
            trainer = trainer_class(
                model=self.model,
                args=config,
                train_dataset=train_dataset,
                processing_class=self.processing_class,
                peft_config=self._lora_config(),
            )
            trainer.train()
            if self.state.is_main_process:
                peft_model = trainer.accelerator.unwrap_model(trainer.model)
                staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                shutil.rmtree(staging, ignore_errors=True)
                peft_model.save_pretrained(staging)
                shutil.rmtree(target, ignore_errors=True)
                os.replace(staging, target)
                _atomic_write_json(target / "trained.json", {"fit_key": fit_key, "adapter": name})
            self.state.wait_for_everyone()
        finally:
            peft_model = getattr(trainer, "model", None) if trainer is not None else None
            if peft_model is not None and _is_peft_model(peft_model):
                peft_model.unload()
            else:  # the trainer failed after wrapping the model: take the LoRA layers out by hand
                _strip_adapter_layers(self.model)
            del trainer, peft_model
            snapshot.restore()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    # ----------------------------------------------------------------------------------------------------------------
    # Scoring
    # -----------------------------------------------------------------------------------------------------------------

    def _fill_cache(self, cache: ShardedScoreCache, dataset: Dataset) -> None:
        """Score the shards missing from `cache` (this rank's share), then finalize it on the main process."""
        state = self.state
        if state.is_main_process:
            cache.missing_shards(verify=True)  # deletes corrupt shards, so every rank sees them as missing
        state.wait_for_everyone()
        missing = cache.missing_shards(verify=False)
        state.wait_for_everyone()  # nobody writes before every rank has read the list
        mine = [i for i in missing if i % state.num_processes == state.process_index]
        if mine:
            self._score_shards(cache, dataset, mine)
        state.wait_for_everyone()
        if state.is_main_process:
            cache.finalize(meta={"stats": {k: v for k, v in self.stats.items() if k != "scored_shards"}})
        state.wait_for_everyone()

    def _score_shards(self, cache: ShardedScoreCache, dataset: Dataset, shards: Sequence[int]) -> None:
        tokenized = self.tokenize(dataset)
        contexts = self._contexts(tokenized)
        rows_total = sum(len(cache.shard_rows(i)) for i in shards)
        model = self.model
        snapshot = _ModelSnapshot(model)
        peft_model = None
        try:
            from trl.trainer.utils import add_fused_lm_head

            add_fused_lm_head(model, cast_lm_head_to_fp32=True)
            if self.args.method != "prompt":
                from peft import PeftModel

                peft_model = PeftModel.from_pretrained(
                    model, self.adapter_paths["plus"], adapter_name="plus", is_trainable=False
                )
                peft_model.load_adapter(self.adapter_paths["minus"], adapter_name="minus", is_trainable=False)
                peft_model.eval()
                self._merge_backup = _merge_backup(peft_model)
            model.eval()
            bar = tqdm(
                total=rows_total,
                unit="row",
                desc=f"Scoring tokens ({self.args.method})",
                disable=bool(self.args.disable_tqdm) or not self.state.is_local_main_process,
            )
            start = time.perf_counter()
            with torch.inference_mode(), bar:
                for i in shards:
                    self._score_shard(cache, i, tokenized, contexts, peft_model)
                    self.stats["scored_shards"].append(i)
                    bar.update(len(cache.shard_rows(i)))
                    elapsed = time.perf_counter() - start
                    bar.set_postfix(tok_s=f"{self.stats['scored_tokens'] / max(elapsed, 1e-9):.0f}")
            self.stats["scoring_seconds"] += time.perf_counter() - start
        finally:
            self._merge_backup = None
            if peft_model is not None:
                peft_model.unload()
            del peft_model
            snapshot.restore()
        seconds = self.stats["scoring_seconds"]
        self.stats["tokens_per_second"] = self.stats["scored_tokens"] / seconds if seconds else None
        for what, message in (
            ("context_truncated", "had their context cut on the left to fit max_length"),
            ("completion_truncated", "had a completion longer than max_length allows; its tail got reward 0.0"),
        ):
            if self.stats[what]:
                logger.warning(f"{self.stats[what]} scored sequences {message} (max_length={self.args.max_length}).")
        if self.stats["unscored_tokens"]:
            logger.warning(
                f"{self.stats['unscored_tokens']} completion tokens could not be scored (cut by max_length, or first "
                "token of a completion with an empty context) and got reward 0.0."
            )

    def _score_shard(self, cache, shard: int, tokenized: Dataset, contexts: dict, peft_model) -> None:
        """Score the rows of one shard and write it (atomically).

        The 2 * rows sequences (row j, side s: index 2 * j + s) are length-sorted once and batched the same way for
        every pass (less padding; results land at fixed positions of one flat array per pass, so the order is restored
        for free). Each pass runs over the whole shard with one adapter active (merged into the base weights when
        that is exact, see `_activate`), so adapters switch (and merge) twice per shard rather than per batch.
        """
        rows = list(cache.shard_rows(shard))
        part = tokenized.select(rows).select_columns(["chosen_ids", "rejected_ids"]).to_dict()
        completions = [part[f"{side}_ids"][j] for j in range(len(rows)) for side in SIDES]
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.long)
        offsets = torch.zeros(len(completions) + 1, dtype=torch.long)
        torch.cumsum(lengths, 0, out=offsets[1:])
        passes = self._passes()
        counted_context = passes[0][2]  # truncations are counted once per sequence, on the first pass's context
        row_contexts = {
            name: [contexts[name][r] for r in rows for _ in SIDES] for name in dict.fromkeys(c for _, _, c in passes)
        }
        # One order for every context, so that the passes see the same batches of completions.
        first = row_contexts[counted_context]
        order = sorted(range(len(completions)), key=lambda k: -(len(first[k]) + len(completions[k])))
        size = 2 * self.args.scoring_batch_size
        chunks = [order[b : b + size] for b in range(0, len(order), size)]
        prepared: dict[str, list] = {}
        for name, ctx in row_contexts.items():
            prepared[name] = []
            for chunk in chunks:
                batch = self._build_batch(
                    [ctx[k] for k in chunk], [completions[k] for k in chunk], count=name == counted_context
                )
                prepared[name].append(_with_destinations(batch, offsets[torch.tensor(chunk, dtype=torch.long)]))
        total = int(offsets[-1])
        results: dict[str, torch.Tensor] = {}
        for pass_name, adapter, context in passes:
            flat = torch.zeros(total, dtype=torch.float32)
            with self._activate(peft_model, adapter) as model:
                for batch in prepared[context]:
                    self._forward(batch, model, flat)
            results[pass_name] = flat
        self.stats["scored_tokens"] += total
        bounds = offsets.tolist()
        columns = {"token_rewards": (results["plus"] - results["minus"]).numpy()}
        if "ref" in results:
            columns["ref_logps"] = results["ref"].numpy()
        out: dict[str, list] = {}
        for suffix, values in columns.items():
            for s, side in enumerate(SIDES):
                out[f"{side}_{suffix}"] = [values[bounds[k] : bounds[k + 1]] for k in range(s, len(completions), 2)]
        cache.write_shard(shard, out)
        self.stats["scored_rows"] += len(rows)

    def _passes(self) -> list[tuple[str, str | None, str]]:
        """(result name, adapter to activate or None for the base model, context column) of each forward pass."""
        if self.args.method == "prompt":
            passes = [("plus", None, "positive_ids"), ("minus", None, "negative_ids")]
        else:
            passes = [("plus", "plus", "prompt_ids"), ("minus", "minus", "prompt_ids")]
        if self.args.include_ref_logps:
            passes.append(("ref", None, "prompt_ids"))
        return passes

    def _contexts(self, tokenized: Dataset) -> dict[str, list[list[int]]]:
        """The context ids of every row: the trainer's `prompt_ids`, and for the "prompt" method the system-prompted
        ones (the same prompt tokenized after the positive / negative system prompt)."""
        contexts = {"prompt_ids": _column_as_lists(tokenized, "prompt_ids")}
        if self.args.method == "prompt":
            contexts["positive_ids"] = self._system_context_ids(tokenized, self.args.positive_system_prompt)
            contexts["negative_ids"] = self._system_context_ids(tokenized, self.args.negative_system_prompt)
        return contexts

    def _system_context_ids(self, tokenized: Dataset, system_prompt: str) -> list[list[int]]:
        """Context ids of the prompt with `system_prompt` before it: a system message through the chat template for
        conversational data (merged into an existing system message; prefixed to the first user message if the
        template refuses system messages), a text prefix (`system_prompt + "\\n\\n"`) otherwise. The context is cut
        where TRL cuts the prompt (where prompt and prompt + completion tokenizations diverge)."""
        keep = ["prompt", "chosen", "rejected"] + [c for c in _EXTRA_INPUT_COLUMNS if c in tokenized.column_names]
        data = tokenized.select_columns(keep)
        for mode in ("system", "user"):
            prompted = data.map(
                _add_system_prompt,
                fn_kwargs={"system_prompt": system_prompt, "mode": mode},
                desc="Adding the system prompt",
            )
            try:
                return _column_as_lists(self._tokenize(prompted), "prompt_ids")
            except Exception as exc:  # a chat template that refuses the system role
                if mode == "user" or not is_conversational(data[0]):
                    raise
                logger.warning(
                    f"The chat template refused a system message ({type(exc).__name__}: {exc}); the system prompt is "
                    "put at the start of the first user message instead."
                )
        raise AssertionError("unreachable")

    def _build_batch(self, contexts, completions, count: bool) -> dict[str, Any]:
        """Right-padded input ids, attention mask and labels (-100 outside the scored completion tokens), applying
        the max_length rule; `spans[k] = (first label position, number of scored tokens, completion length)`."""
        max_length = self.args.max_length
        sequences, spans = [], []
        for context, completion in zip(contexts, completions):
            context, completion = list(context), list(completion)
            scored = len(completion)
            if max_length is not None and len(context) + len(completion) > max_length:
                if len(completion) < max_length:
                    context = context[len(context) - (max_length - len(completion)) :]
                    if count:
                        self.stats["context_truncated"] += 1
                else:
                    context = context[-1:]
                    scored = max_length - len(context)
                    if count:
                        self.stats["completion_truncated"] += 1
            sequences.append((context, completion[:scored]))
            spans.append((len(context), scored, len(completion)))
        length = max(len(c) + len(s) for c, s in sequences)
        pad_id = self.tokenizer.pad_token_id
        ids, mask, targets = [], [], []
        for context, completion in sequences:
            n, pad = len(context) + len(completion), length - len(context) - len(completion)
            ids.append(context + completion + [pad_id] * pad)
            mask.append([1] * n + [0] * pad)
            targets.append([-100] * len(context) + completion + [-100] * pad)
        input_ids = torch.tensor(ids, dtype=torch.long)
        attention_mask = torch.tensor(mask, dtype=torch.long)
        labels = torch.tensor(targets, dtype=torch.long)
        labels[:, 0] = -100  # never predicted
        if count:
            unscored = sum(total - scored + (1 if start == 0 and scored else 0) for start, scored, total in spans)
            self.stats["unscored_tokens"] += unscored
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "spans": spans}

    def _forward(self, batch: dict[str, Any], model, out: torch.Tensor) -> None:
        """Write the float32 log-probs of the batch's scored completion tokens under `model` (the base model or the
        PEFT model in the state `_activate` set) into their places `batch["destinations"]` of the flat `out`."""
        device = next(self.model.parameters()).device
        inputs = {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask", "labels")}
        output = model(**inputs, fused_lm_head=True)
        rows, positions = batch["sources"]
        # log_probs[k, j - 1] is the log-prob of the label at position j; gathered on the device, copied once.
        out[batch["destinations"]] = output.log_probs[rows.to(device), positions.to(device)].float().cpu()

    @contextlib.contextmanager
    def _activate(self, peft_model, adapter: str | None):
        """Make `adapter` (or the bare base model when None) the model that a pass runs; yields the model to call.

        When the adapters can be merged exactly (see `_merge_backup`), the adapter is merged into the base weights for
        the duration of the pass, so every forward runs at the speed of the plain base model. Afterwards the adapter
        is unmerged and the base weights are copied back from a backup taken before scoring, so they are restored bit
        for bit (an unmerge alone leaves rounding differences of the order of one ulp).
        """
        if peft_model is None:
            yield self.model
            return
        if adapter is None:
            with peft_model.disable_adapter():
                yield peft_model
            return
        peft_model.set_adapter(adapter)
        backup = self._merge_backup
        if not backup:
            yield peft_model
            return
        try:
            peft_model.merge_adapter([adapter])
            yield peft_model
        finally:
            try:
                peft_model.unmerge_adapter()
            finally:
                with torch.no_grad():
                    for param, saved in backup:
                        param.data.copy_(saved, non_blocking=False)

    # ----------------------------------------------------------------------------------------------------------------
    # Helpers
    # -----------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _validate(dataset) -> None:
        if isinstance(dataset, (DatasetDict, dict)):
            raise TypeError(
                f"Expected a datasets.Dataset, got a {type(dataset).__name__} (splits {list(dataset)}): pick a split, "
                "e.g. dataset['train']."
            )
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                "An IterableDataset cannot be scored and cached by row: materialize it first (e.g. "
                "Dataset.from_generator or load_dataset(..., streaming=False))."
            )
        if not isinstance(dataset, Dataset):
            raise TypeError(f"Expected a datasets.Dataset, got {type(dataset).__name__}.")
        missing = [c for c in ("chosen", "rejected") if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"The dataset lacks the column(s) {missing}; it has {dataset.column_names}. The estimator needs a TRL "
                "preference dataset: 'prompt' (optional: implicit prompts are extracted), 'chosen', 'rejected'."
            )
        if len(dataset) == 0:
            raise ValueError("The dataset is empty: there is nothing to estimate.")


# -------------------------------------------------------------------------------------------------------------------
# Module helpers
# ---------------------------------------------------------------------------------------------------------------------


def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def _strip_adapter_layers(model: torch.nn.Module) -> None:
    """Replace every PEFT adapter layer injected into `model` by the layer it wraps."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())


def _column_as_lists(dataset: Dataset, column: str) -> list[list[int]]:
    """A column as plain Python lists, converted once (indexing `dataset[column]` row by row goes through Arrow
    on every access, which cost as much as the forward passes of a small model)."""
    return dataset.select_columns([column]).to_dict()[column]


def _with_destinations(batch: dict[str, Any], starts_in_flat: torch.Tensor) -> dict[str, Any]:
    """Add to a batch of `_build_batch` where each scored label goes: `sources` (row, position - 1) in the fused
    head's `log_probs` and `destinations` in the flat per-pass array (`starts_in_flat[k]`: where sequence k starts)."""
    rows, positions = (batch["labels"] != -100).nonzero(as_tuple=True)
    context_lengths = torch.tensor([start for start, _, _ in batch["spans"]], dtype=torch.long)
    batch["sources"] = (rows, positions - 1)
    batch["destinations"] = starts_in_flat[rows] + positions - context_lengths[rows]
    return batch


def _merge_backup(peft_model) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """A CPU copy of every base weight an adapter merge would change, or None when merging is not used.

    Merging is used only for LoRA adapters on plain float32 / float16 layers (`Linear`, `Embedding`, `Conv1d/2d`,
    transformers' `Conv1D`): not for quantized layers (a merge would requantize) nor bfloat16 ones (a merged
    bfloat16 weight rounds `W + BA` to 8 bits of mantissa, visibly changing the scores). The copy lets `_activate`
    restore the weights exactly; it costs host memory the size of the adapted layers' weights.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import PeftType
    from transformers.pytorch_utils import Conv1D

    mergeable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
    if any(config.peft_type != PeftType.LORA for config in peft_model.peft_config.values()):
        return None
    params: dict[int, torch.Tensor] = {}
    for module in peft_model.modules():
        if not isinstance(module, BaseTunerLayer) or not hasattr(module, "lora_A"):
            continue
        base = module.get_base_layer()
        if type(base) not in mergeable:
            return None
        for param in base.parameters(recurse=False):
            if param.dtype not in (torch.float32, torch.float16) or param.is_meta:
                return None
            params[id(param)] = param
    if not params:
        return None
    return [(param, param.detach().to("cpu", copy=True)) for param in params.values()]


def _add_system_prompt(example: dict, system_prompt: str, mode: str) -> dict:
    prompt = example["prompt"]
    if not is_conversational(example):
        return {"prompt": f"{system_prompt}\n\n{prompt}"}
    messages = [dict(m) for m in prompt]
    if mode == "system":
        if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
            messages[0]["content"] = f"{system_prompt}\n\n{messages[0]['content']}"
        else:
            messages.insert(0, {"role": "system", "content": system_prompt})
    else:
        for message in messages:
            if message.get("role") == "user" and isinstance(message.get("content"), str):
                message["content"] = f"{system_prompt}\n\n{message['content']}"
                break
        else:
            raise ValueError("The conversational prompt has no text user message to put the system prompt in.")
    return {"prompt": messages}


def _adapter_is_saved(path: Path, fit_key: str) -> bool:
    marker = path / "trained.json"
    try:
        with open(marker) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return False
    return info.get("fit_key") == fit_key and (path / "adapter_config.json").is_file()


def _fingerprint_adapter_dir(path: str) -> str:
    """Digest of a saved PEFT adapter: its config (without paths) and the bytes of its weight files."""
    directory = Path(path)
    with open(directory / "adapter_config.json") as f:
        config = json.load(f)
    for name in ("base_model_name_or_path", "revision", "inference_mode"):
        config.pop(name, None)
    weights = sorted(p for p in directory.iterdir() if p.name.startswith("adapter_model."))
    if not weights:
        raise FileNotFoundError(f"No adapter_model.* weight file in {directory}.")
    return fingerprint("peft_adapter_files", _plain(config), [[p.name, p.read_bytes()] for p in weights])


def _plain(value: Any) -> Any:
    """JSON-able form of a config value (enums by value, unknown objects by their string)."""
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _float32_list_feature():
    import datasets

    list_type = getattr(datasets, "List", None) or datasets.Sequence
    return list_type(datasets.Value("float32"))


def _atomic_write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(staging, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, path)


class _ModelSnapshot:
    """What the trainers and the scoring change on the base model, restored afterwards: the forward (TRL patches a
    fused LM head onto the instance), `requires_grad` of every parameter (PEFT freezes the base), the train/eval mode,
    gradient checkpointing and `config.use_cache`."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.forward = model.__dict__.get("forward", _MISSING)
        self.requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self.training = model.training
        self.gradient_checkpointing = getattr(model, "is_gradient_checkpointing", False)
        self.use_cache = getattr(model.config, "use_cache", None)

    def restore(self) -> None:
        model = self.model
        if self.forward is _MISSING:
            model.__dict__.pop("forward", None)
        else:
            model.forward = self.forward
        for name, p in model.named_parameters():
            if name in self.requires_grad:
                p.requires_grad_(self.requires_grad[name])
        model.train(self.training)
        if getattr(model, "is_gradient_checkpointing", False) and not self.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        if self.use_cache is not None:
            model.config.use_cache = self.use_cache
