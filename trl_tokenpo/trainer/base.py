"""`TokenLevelDPOTrainer`: what TDPO and TIS-DPO share on top of `trl.DPOTrainer`.

The subclass keeps DPOTrainer's constructor, data preparation, PEFT handling, reference model handling,
DeepSpeed/FSDP preparation, logging and checkpointing. It replaces only the loss computation (`_compute_loss`) by a
per-token one:

1. per-token statistics of the policy and the reference: the label log-probabilities always, and when the objective
   needs them the forward / reverse KL over the full vocabulary (computed in tiles by `kernels.py`, never as a
   `(tokens x vocab)` tensor);
2. the objective of the subclass (`losses.py`), from those statistics and the per-token weights of the batch;
3. every metric DPOTrainer logs, with the same names and meaning, plus the subclass's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass, field, fields

import torch
from accelerate.logging import get_logger
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import use_adapter

from .. import losses
from ..compat import disable_checkpointing, quiet_checkpointing_rename
from ..data import LAYOUT_KEY, BatchLayout, DataCollatorForTokenPreference, check_preference_rows
from ..errors import InputError
from ..files import atomic_write_json
from ..kernels import TokenStats, TokenStatsRequest, add_token_stats_head
from ..precision import BF16_HELP, resolve_defaults
from ..quantization import keep_4bit_layout
from .sync_free import DeviceValue, known_padding, ratio_or_zero, resolve_metrics, value_if_positive


logger = get_logger(__name__)

# Batch keys that are not model inputs: DPOTrainer passes every other key to `model(**kwargs)`, whose `**kwargs`
# would silently swallow them.
# Written into each checkpoint: trainer counters that `TrainerState` does not hold
COUNTERS_NAME = "token_level_trainer_counters.json"
# Temporary column holding each row's index in the dataset as given, while TRL tokenizes (and may drop rows)
ROW_COLUMN = "__trl_tokenpo_row__"
NON_MODEL_KEYS = frozenset(
    {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "token_weights", "ref_token_logps", LAYOUT_KEY}
)
METRIC_OUTPUTS = ("entropy", "mean_logits", "is_top1")

@dataclass
class TokenLevelDPOConfig(DPOConfig):
    r"""
    Base configuration of the token-level trainers ([`TDPOConfig`], [`TISDPOConfig`]).

    Everything of [`~trl.DPOConfig`] applies (see each trainer's documentation for the few options it refuses), except
    that an unset `bf16` is `True` only where TRL's default works (a bf16 accelerator, no `fp16`, no `use_cpu`) and
    `False` (float32) on CPU, so `TDPOConfig(output_dir=...)` also runs there; a value you set is kept.

    Parameters:
        bf16 (`bool` or `None`, *optional*, defaults to `None`):
            Whether to use bf16 (mixed) precision; `None` resolves as above.
    """

    bf16: bool | None = field(default=None, metadata={"help": BF16_HELP})

    def __post_init__(self):
        resolve_defaults(self)
        super().__post_init__()


@dataclass
class Objective:
    """What a subclass's objective returns: the per-pair margin `z` (the loss is `-log sigmoid(beta z)`), and extra
    per-sequence or per-pair tensors to log (name -> `(2B,)` or `(B,)` tensor, averaged over the global batch, or a
    ready `DeviceValue`). Metrics stay on the device until they are logged."""

    margin: torch.Tensor
    metrics: dict[str, torch.Tensor | DeviceValue] = dataclasses.field(default_factory=dict)


class TokenLevelDPOTrainer(DPOTrainer):
    """Base class of the token-level trainers. Not used directly: see [`TDPOTrainer`] and [`TISDPOTrainer`].

    Subclasses set `config_class` and implement `_objective`, and say through `_kl_outputs` which full-vocabulary
    statistics they need (`()` keeps DPOTrainer's cost: only gathered label log-probabilities) and through
    `_kl_gradient_sides` which completions' KL carries a gradient.

    The step never makes the host wait for the device before the backward is queued (see `sync_free.py`): the scored
    positions and the padding come from the host with the batch (`BatchLayout`), and the metrics stay on the device
    until TRL logs them, when they are read in one transfer.
    """

    config_class: type[DPOConfig] = DPOConfig
    _tag_names = ["trl", "dpo", "trl-tokenpo"]
    _name = "TokenLevelDPO"

    def __init__(
        self,
        model,
        ref_model=None,
        args: DPOConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = self.config_class(f"{str(model_name).rstrip('/').split('/')[-1]}-{self._name}")
        elif not isinstance(args, DPOConfig):
            raise TypeError(f"`args` must be a `{self.config_class.__name__}` or a `DPOConfig`; got {type(args).__name__}.")
        # A plain DPOConfig means this method with its default settings
        self.method_args = {f.name: getattr(args, f.name, f.default) for f in self._method_fields()}
        self._check_method_args(args)
        self._check_dpo_options(args, peft_config)

        with quiet_checkpointing_rename():  # peft's get_peft_model, called by DPOTrainer, reads the old name
            super().__init__(
                model=model,
                ref_model=ref_model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                compute_metrics=compute_metrics,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
            )

        if data_collator is None:
            self._ensure_token_collator()
        self._layout_warned = False

        # bitsandbytes would convert a 4-bit base in place on CPU in eval-mode forwards (see quantization.py)
        keep_4bit_layout(self.model)
        keep_4bit_layout(self.ref_model)

        # Checked after DPOTrainer's own checks, so that a vision dataset with a text model gets TRL's message
        if self._is_vision_dataset:
            raise ValueError(
                f"{type(self).__name__} supports text preference datasets only; this dataset has an `image(s)` column "
                "(vision-language DPO). Use trl.DPOTrainer for vision-language models."
            )
        if self._kl_outputs:
            unwrapped = self.accelerator.unwrap_model(self.model)
            add_token_stats_head(unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped)
            if self.ref_model is not None:
                add_token_stats_head(self.accelerator.unwrap_model(self.ref_model))

    # ------------------------------------------------------------------------------------------------------------
    # Configuration
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def _method_fields(cls) -> list[dataclasses.Field]:
        """The fields `config_class` adds to `DPOConfig`."""
        base = {f.name for f in fields(DPOConfig)}
        return [f for f in fields(cls.config_class) if f.name not in base]

    def _check_method_args(self, args: DPOConfig) -> None:
        """Validate the method's own settings (subclasses)."""

    @property
    def _kl_outputs(self) -> tuple[str, ...]:
        """Full-vocabulary statistics the objective needs, among `"forward_kl"` and `"reverse_kl"`."""
        return ()

    @property
    def _kl_gradient_sides(self) -> str:
        """`"both"`, or `"rejected"` when the objective stops the gradient of the chosen completions' KL (TDPO2): the
        backward then recomputes the reference's logits for the rejected completions only."""
        return "both"

    def _check_dpo_options(self, args: DPOConfig, peft_config) -> None:
        """Refuse the DPOConfig options that do not compose with a token-level objective, before any work."""
        method = type(self).__name__
        if list(args.loss_type) != ["sigmoid"]:
            raise ValueError(
                f"{method} replaces DPO's sigmoid loss with its own token-level objective, so `loss_type` must be "
                f"['sigmoid'] (the default); got {args.loss_type}. Use trl.DPOTrainer for the other DPO losses."
            )
        if args.f_divergence_type != "reverse_kl":
            raise ValueError(
                f"{method} is derived for DPO's reverse-KL regularization; `f_divergence_type="
                f"{args.f_divergence_type!r}` has no token-level counterpart here. Use the default 'reverse_kl'."
            )
        if args.label_smoothing != 0.0:
            raise ValueError(
                f"`label_smoothing={args.label_smoothing}` is not supported by {method}. In TRL 1.16 it only affects the "
                "'robust' and 'exo_pair' losses (DPO's sigmoid loss ignores it), and those losses have no token-level "
                "counterpart here. Set `label_smoothing=0.0`."
            )
        if args.precompute_ref_log_probs and self._precompute_refusal(args):
            raise ValueError(self._precompute_refusal(args))
        if self._kl_outputs and peft_config is not None:
            from peft import PromptLearningConfig

            if isinstance(peft_config, PromptLearningConfig):
                raise ValueError(
                    f"{method} computes the KL from the backbone's hidden states position by position, which "
                    "prompt-learning PEFT methods (prefix / prompt tuning) shift with virtual tokens. Use LoRA (or "
                    "another adapter method) instead."
                )

    def _precompute_refusal(self, args: DPOConfig) -> str | None:
        """Why `precompute_ref_log_probs=True` cannot work, or `None` if it can."""
        return (
            f"`precompute_ref_log_probs=True` is not supported by {type(self).__name__}: it stores one summed "
            "reference log-probability per completion, while the token-level objective needs the reference "
            "distribution at every position. Set `precompute_ref_log_probs=False`."
        )

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = _last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if isinstance(resume_from_checkpoint, (str, os.PathLike)) and os.path.isdir(resume_from_checkpoint):
            problem = _checkpoint_problem(resume_from_checkpoint)
            if problem is not None:
                found = _last_complete_checkpoint(os.path.dirname(os.path.abspath(resume_from_checkpoint)), quiet=True)
                hint = f" The newest complete checkpoint next to it is {found}." if found else ""
                raise ValueError(
                    f"Cannot resume from {resume_from_checkpoint}: {problem}, so its save did not finish (the process "
                    f"was stopped while writing it).{hint} Pass a complete checkpoint, or `resume_from_checkpoint=True` "
                    "for the newest complete one."
                )
            self._total_train_tokens = self._load_counters(resume_from_checkpoint)
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval
        )

    def _save_checkpoint(self, model, trial):
        # DPOTrainer logs `num_tokens` from a counter kept on the trainer, which a resumed run would restart from 0: the
        # checkpoint holds its value. Written (atomically) BEFORE the rest of the checkpoint, so that every checkpoint
        # that counts as complete (Trainer writes trainer_state.json last) has it.
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            atomic_write_json(os.path.join(folder, COUNTERS_NAME), {"total_train_tokens": self._total_train_tokens})
        super()._save_checkpoint(model, trial)

    @staticmethod
    def _load_counters(checkpoint: str | os.PathLike) -> int:
        """The `num_tokens` counter saved in `checkpoint`. A checkpoint without a readable counters file (written by
        another trainer, e.g. `trl.DPOTrainer`, or damaged) resumes from the last `num_tokens` in its log history, with
        a warning, so that the logged metric does not silently restart from 0."""
        path = os.path.join(checkpoint, COUNTERS_NAME)
        try:
            with open(path) as f:
                return int(json.load(f)["total_train_tokens"])
        except FileNotFoundError:
            problem = f"has no {COUNTERS_NAME} (written by another trainer, e.g. trl.DPOTrainer, or an older trl-tokenpo)"
        except (OSError, ValueError, KeyError, TypeError) as error:
            problem = f"has an unreadable {COUNTERS_NAME} ({type(error).__name__}: {error})"
        with open(os.path.join(checkpoint, TRAINER_STATE_NAME)) as f:
            history = json.load(f).get("log_history", [])
        logged = [(e["step"], e["num_tokens"]) for e in history if "num_tokens" in e and "step" in e]
        if logged:
            step, tokens = logged[-1]
            fallback = f"the logged `num_tokens` continues from its last logged value, {tokens:.0f} (step {step})"
        else:
            tokens, fallback = 0, "the logged `num_tokens` restarts from 0"
        logger.warning(f"Checkpoint {checkpoint} {problem}: {fallback}. The rest of its state is restored as usual.")
        return int(tokens)

    # ------------------------------------------------------------------------------------------------------------
    # Data
    # ------------------------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        num_rows = len(dataset) if isinstance(dataset, Dataset) else None
        self._check_text_columns(dataset, dataset_name)
        if num_rows:
            # Carried through TRL's tokenization, so that messages name the user's row even after rows were dropped
            dataset = dataset.add_column(ROW_COLUMN, list(range(num_rows)))
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        source_rows = None
        if num_rows:
            if len(dataset) < num_rows:
                source_rows = list(dataset[ROW_COLUMN])
            dataset = dataset.remove_columns(ROW_COLUMN)
        if not hasattr(self, "_source_rows"):
            self._source_rows = {}
        self._source_rows[dataset_name] = source_rows
        if num_rows and len(dataset) == 0:
            raise InputError(
                f"All {num_rows} rows of the {dataset_name} dataset were dropped because their prompt alone fills "
                f"`max_length={args.max_length}` (with truncation_mode='keep_start' no completion token would remain). "
                "Increase `max_length` or use truncation_mode='keep_end'."
            )
        if num_rows is not None and len(dataset) < num_rows:
            dropped = sorted(set(range(num_rows)) - set(source_rows))
            shown = ", ".join(map(str, dropped[:10])) + (", ..." if len(dropped) > 10 else "")
            logger.warning(
                f"{num_rows - len(dataset)} of {num_rows} rows of the {dataset_name} dataset were dropped because "
                f"their prompt alone fills `max_length={args.max_length}` (with truncation_mode='keep_start' no "
                "completion token would remain). Increase `max_length` or use truncation_mode='keep_end' to keep them. "
                f"Dropped rows (0-based): {shown}.",
                main_process_only=True,
            )
        if isinstance(dataset, Dataset) and len(dataset) > 0:
            self._check_completions(dataset, dataset_name, source_rows)
        return dataset

    @staticmethod
    def _check_text_columns(dataset, dataset_name: str) -> None:
        """Refuse, naming the row and the column, what TRL's tokenization would fail on with an unrelated error (a
        `KeyError`, or an `AttributeError` on `None`) or silently train on: a missing `chosen` / `rejected` column or
        value, a prompt or completion that is neither a string nor a list of messages, an empty completion
        (`check_preference_rows`). An `IterableDataset` is checked by TRL only."""
        check_preference_rows(dataset, f"{dataset_name} dataset")

    @staticmethod
    def _check_completions(dataset: Dataset, dataset_name: str, source_rows: list[int] | None = None) -> None:
        """A completion with no token would give an empty sum and no learning signal: refuse it with its row (the
        row of the dataset as given, `source_rows[i]` when rows were dropped)."""
        row = 0
        for batch in dataset.select_columns(["chosen_ids", "rejected_ids"]).iter(batch_size=4096):
            for side in ("chosen", "rejected"):
                for i, ids in enumerate(batch[f"{side}_ids"]):
                    if len(ids) == 0:
                        raise InputError(
                            f"{dataset_name} dataset, row {source_rows[row + i] if source_rows else row + i} (0-based), "
                            f"column `{side}`: the completion tokenizes to no "
                            "token (after the prompt). Check that the completion is not empty and that the chat "
                            "template renders an assistant turn for it, or drop the row."
                        )
            row += len(batch["chosen_ids"])

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in self._extra_signature_columns():
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def _extra_signature_columns(self) -> list[str]:
        """Dataset columns the collator needs besides TRL's (subclasses)."""
        return []

    def _token_columns(self) -> list:
        """The per-token columns the collator lays out (subclasses; [`TokenColumn`] objects)."""
        return []

    def _ensure_token_collator(self) -> None:
        """Replace DPOTrainer's default collator by a [`DataCollatorForTokenPreference`] with the same settings, which
        also lays out the per-token columns and builds each batch's `BatchLayout` on the host. (DPOTrainer builds its
        collator, and may run the reference precomputation with it, inside its own `__init__`.)"""
        if isinstance(self.data_collator, DataCollatorForTokenPreference):
            return
        base = self.data_collator
        self.data_collator = DataCollatorForTokenPreference(
            pad_token_id=base.pad_token_id,
            max_length=base.max_length,
            truncation_mode=base.truncation_mode,
            pad_to_multiple_of=base.pad_to_multiple_of,
            token_columns=self._token_columns(),
        )

    def get_train_dataloader(self):
        return self._check_layout_transport(super().get_train_dataloader())

    def get_eval_dataloader(self, eval_dataset=None):
        return self._check_layout_transport(super().get_eval_dataloader(eval_dataset))

    def _check_layout_transport(self, dataloader):
        """accelerate's `DataLoaderDispatcher` (iterable datasets on several processes) concatenates and broadcasts
        the batch's tensors and cannot carry a `BatchLayout`: the collator then leaves it out, and each step finds the
        scored positions on the device instead (with a warning)."""
        from accelerate.data_loader import DataLoaderDispatcher

        if isinstance(dataloader, DataLoaderDispatcher) and self.accelerator.num_processes > 1:
            if getattr(self.data_collator, "batch_layout", False):
                self.data_collator.batch_layout = False
        return dataloader

    # ------------------------------------------------------------------------------------------------------------
    # Per-token statistics
    # ------------------------------------------------------------------------------------------------------------

    def _reference_context(self):
        """With PEFT and no separate reference model, the reference is the model with its adapter disabled (or the
        frozen copy "ref" of a pre-trained adapter), exactly as DPOTrainer does."""
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return contextlib.nullcontext()

    @staticmethod
    def _model_inputs(inputs) -> tuple[dict, torch.Tensor]:
        """The model's keyword arguments from a batch (our own keys stripped: the model's `**kwargs` would swallow
        them) and the labels, `-100` outside the completion, as DPOTrainer builds them."""
        model_kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        return model_kwargs, labels

    def _reference_forward(self, ref_model, model_kwargs, **kwargs):
        """Call the reference without gradient (PEFT: adapters disabled), as DPOTrainer does. The reference returns no
        MoE router logits, and gradient checkpointing is off for its no-grad forward."""
        ref_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
        with (
            torch.no_grad(),
            disable_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._reference_context(),
        ):
            return ref_model(**ref_kwargs, **kwargs)

    def _ld_weights(self, mask: torch.Tensor) -> torch.Tensor:
        """`(2B, T-1)` LD-DPO multipliers of the log-ratio (`ld_alpha`), or `mask` itself without LD-DPO."""
        return losses.length_desensitized_weights(mask, self.ld_alpha) if self.ld_alpha is not None else mask

    def _per_token_stats(self, model, model_kwargs, labels, layout: BatchLayout, need_log_sum_sq: bool) -> TokenStats:
        """Run the reference (no gradient) and the policy and return their per-token statistics, `(2B, T-1)` float32
        (after the shift), zero outside the completion; `forward_kl` / `reverse_kl` / `log_sum_sq_probs` are `None`
        when not requested, `ref_logps` when the reference sums were precomputed."""
        seq_len = labels.size(1) - 1
        ref_model = self.ref_model if self.ref_model is not None else self.model
        kl_outputs = self._kl_outputs

        if not kl_outputs:
            # DPOTrainer's path: gathered label log-probabilities from TRL's fused LM head, nothing vocabulary-sized
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
            ref_logps = None if self.precompute_ref_logps else self._reference_token_logps(ref_model, model_kwargs, labels)
            return TokenStats(
                policy_logps=outputs.log_probs[:, -seq_len:],
                ref_logps=ref_logps,
                entropy=outputs.entropy[:, -seq_len:],
                mean_logits=outputs.mean_logits[:, -seq_len:],
                is_top1=outputs.is_top1[:, -seq_len:],
                log_sum_sq_probs=outputs.log_sum_sq_probs[:, -seq_len:] if need_log_sum_sq else None,
                aux_loss=outputs.aux_loss,
            )

        # Token-level path: the reference returns its last hidden states at the scored positions (no LM head), the
        # policy's forward projects both heads in tiles and returns every statistic in one pass. The positions come
        # from the host; with a stop-gradient on the chosen KL (TDPO2), only the rejected positions, which come after
        # the chosen ones, need the reference's logits again in the backward.
        kl_rows = (layout.num_chosen, layout.num_positions) if self._kl_gradient_sides == "rejected" else None
        request = TokenStatsRequest(labels=labels, positions=layout.index, kl_gradient_rows=kl_rows)
        reference = self._reference_forward(ref_model, model_kwargs, token_stats=request)
        requested = kl_outputs + METRIC_OUTPUTS + (("log_sum_sq_probs",) if need_log_sum_sq else ())
        request = dataclasses.replace(request, reference=reference, outputs=requested)
        return model(**model_kwargs, token_stats=request)

    def _objective(
        self, stats: TokenStats, mask: torch.Tensor, ld_weights: torch.Tensor, inputs, layout: BatchLayout
    ) -> Objective:
        """The method's margin from the per-token statistics (subclasses).

        Args:
            stats: the per-token statistics, `(2B, T-1)`; `stats.ref_logps` is `None` when the reference sums were
                precomputed (they are then in `inputs["ref_chosen_logps"]` / `inputs["ref_rejected_logps"]`).
            mask: `(2B, T-1)` float completion mask (after the shift).
            ld_weights: `(2B, T-1)` LD-DPO multipliers of the log-ratio (`ld_alpha`), equal to `mask` without LD-DPO.
            inputs: the batch (for per-token weights).
            layout: the batch's `BatchLayout` (scored positions known on the host), on the batch's device.
        """
        raise NotImplementedError

    def _reference_token_logps(self, ref_model, model_kwargs, labels) -> torch.Tensor:
        """`(2B, T-1)` reference label log-probabilities through TRL's fused LM head (no gradient; PEFT: adapters
        disabled), exactly as DPOTrainer computes them."""
        outputs = self._reference_forward(ref_model, model_kwargs, labels=labels, fused_lm_head=True)
        return outputs.log_probs[:, -(labels.size(1) - 1) :]

    @staticmethod
    def _precomputed_ref_sums(inputs) -> torch.Tensor:
        """The precomputed reference sums of a batch, stacked `[chosen; rejected]`: `(2B,)`, or `(2B, k)` when a
        subclass stores several sums per completion (column 0 is always DPOTrainer's unweighted sum)."""
        return torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])

    def _batch_layout(self, inputs) -> BatchLayout:
        """The batch's `BatchLayout` on the device of its tensors: the one the collator built on the host, or (a
        collator that builds none) one read from the device, which makes the host wait once per step."""
        input_ids = inputs["input_ids"]
        layout = inputs.get(LAYOUT_KEY)
        if layout is None or not layout.matches(input_ids):
            if not self._layout_warned and input_ids.device.type != "cpu":
                self._layout_warned = True
                logger.warning(
                    f"The batches carry no `{LAYOUT_KEY}` (collator: {type(self.data_collator).__name__}), so each step "
                    "reads the scored positions back from the device, which makes the host wait for it. Use "
                    "`trl_tokenpo.DataCollatorForTokenPreference` to build them on the host.",
                    main_process_only=True,
                )
            layout = BatchLayout.from_batch(inputs)
        return layout.to(input_ids.device)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        layout = self._batch_layout(inputs)
        model_kwargs, labels = self._model_inputs(inputs)
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        mask = inputs["completion_mask"][..., 1:].to(torch.float32)

        with known_padding(layout.padded):
            stats = self._per_token_stats(model, model_kwargs, labels, layout, need_log_sum_sq=self.use_weighting)
        ld_weights = self._ld_weights(mask)

        # Sequence log-probabilities as DPOTrainer computes them (LD-DPO weighting included)
        policy_logps = losses.masked_sum(stats.policy_logps, mask, ld_weights)
        if stats.ref_logps is None:  # precomputed sums (`precompute_ref_log_probs`)
            ref_logps = self._precomputed_ref_sums(inputs).to(policy_logps)
            ref_logps = ref_logps[:, 0] if ref_logps.dim() == 2 else ref_logps
        else:
            ref_logps = losses.masked_sum(stats.ref_logps, mask, ld_weights)
        logratio = policy_logps - ref_logps

        objective = self._objective(stats, mask, ld_weights, inputs, layout)
        per_pair_loss = losses.preference_loss(objective.margin, self.beta)
        if self.use_weighting:
            per_pair_loss = per_pair_loss * losses.wpo_weights(stats.policy_logps, stats.log_sum_sq_probs, mask)
        loss = per_pair_loss.mean() * self.loss_weights[0]
        if self.aux_loss_enabled and stats.aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * stats.aux_loss
            self._metrics[mode]["aux_loss"].append(DeviceValue(self.accelerator.gather_for_metrics(stats.aux_loss).mean()))

        self._log_dpo_metrics(mode, inputs, stats, mask, policy_logps, logratio)
        for name, value in objective.metrics.items():
            if not isinstance(value, DeviceValue):
                value = DeviceValue(self.accelerator.gather_for_metrics(value.detach()).float().mean())
            self._metrics[mode][name].append(value)

        if return_outputs:
            warnings.warn(
                "`return_outputs=True` (logits for `compute_metrics`) is deprecated in TRL and costs an extra forward "
                "pass.",
                FutureWarning,
                stacklevel=2,
            )
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _log_dpo_metrics(self, mode, inputs, stats, mask, policy_logps, logratio) -> None:
        """Every metric `trl.DPOTrainer` logs, with the same names and meaning, kept on the device (`DeviceValue`)
        and read when they are logged; each gives the number DPOTrainer's `.item()` at this step gives."""
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]

        entropy_sum = gather((stats.entropy.detach() * mask).sum()).sum()
        total_tokens = gather(mask.sum()).sum()
        metrics["entropy"].append(value_if_positive(entropy_sum / total_tokens, total_tokens))

        if mode == "train":
            batch_tokens = gather(inputs["attention_mask"].sum()).sum() // self._tp_size
            self._pending_train_tokens = (
                batch_tokens if self._pending_train_tokens is None else self._pending_train_tokens + batch_tokens
            )
        metrics["num_tokens"] = [self._train_tokens_value()]

        chosen_mask, rejected_mask = losses.split_pairs(mask)
        chosen_logits, rejected_logits = losses.split_pairs(stats.mean_logits.detach())
        for name, logits, side_mask in (("chosen", chosen_logits, chosen_mask), ("rejected", rejected_logits, rejected_mask)):
            total = gather((logits * side_mask).sum()).sum()
            count = gather(side_mask.sum()).sum()
            metrics[f"logits/{name}"].append(ratio_or_zero(total, count))

        chosen_top1, _ = losses.split_pairs(stats.is_top1)
        correct = gather((chosen_top1.bool() & chosen_mask.bool()).sum()).sum()
        count = gather(chosen_mask.sum()).sum()
        metrics["mean_token_accuracy"].append(value_if_positive(correct / count, count))

        chosen_rewards, rejected_rewards = losses.split_pairs(self.beta * logratio.detach())
        metrics["rewards/chosen"].append(DeviceValue(self.accelerator.gather(chosen_rewards).mean()))
        metrics["rewards/rejected"].append(DeviceValue(self.accelerator.gather(rejected_rewards).mean()))
        accuracies = (chosen_rewards > rejected_rewards).float()
        metrics["rewards/accuracies"].append(DeviceValue(self.accelerator.gather(accuracies).mean()))
        margins = chosen_rewards - rejected_rewards
        metrics["rewards/margins"].append(DeviceValue(self.accelerator.gather(margins).mean()))
        chosen_logps, rejected_logps = losses.split_pairs(policy_logps.detach())
        metrics["logps/chosen"].append(DeviceValue(self.accelerator.gather(chosen_logps).mean()))
        metrics["logps/rejected"].append(DeviceValue(self.accelerator.gather(rejected_logps).mean()))

    # ------------------------------------------------------------------------------------------------------------
    # Metrics: read from the device when they are logged
    # ------------------------------------------------------------------------------------------------------------

    @property
    def _total_train_tokens(self) -> int:
        """DPOTrainer's `num_tokens` counter. The steps add to a device tensor; reading the counter (a checkpoint
        save) folds it into the host count."""
        if self._pending_train_tokens is not None:
            self._host_train_tokens += int(self._pending_train_tokens.item())
            self._pending_train_tokens = None
        return self._host_train_tokens

    @_total_train_tokens.setter
    def _total_train_tokens(self, value: int) -> None:
        self._host_train_tokens = int(value)
        self._pending_train_tokens = None

    def _train_tokens_value(self):
        """The `num_tokens` metric now, without reading the device."""
        if self._pending_train_tokens is None:
            return self._host_train_tokens
        return DeviceValue(self._pending_train_tokens, combine=lambda pending, base=self._host_train_tokens: base + int(pending))

    def metric_values(self, mode: str = "train") -> dict[str, list[float]]:
        """The metrics gathered since the last log (`trainer._metrics[mode]`), as numbers: their values still on the
        device are read in one transfer."""
        resolve_metrics(self._metrics[mode])
        return self._metrics[mode]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # DPOTrainer averages `self._metrics[mode]` here: read the values the steps kept on the device first
        self.metric_values("train" if self.model.training else "eval")
        super().log(logs, start_time)

    def _log_kl_metrics(self, metrics: dict, sequence_kl: torch.Tensor) -> None:
        """`kl/chosen`, `kl/rejected`, `kl/margin` from the `(2B,)` sequence KLs of the objective. Each sequence KL is
        logged clamped at 0: it is computed in float32 as a difference of log-sum-exps, so a KL of a few 1e-7 (a policy
        still at the reference) can come out slightly below 0, which a KL never is. The loss uses the values as
        computed."""
        chosen, rejected = losses.split_pairs(sequence_kl.detach().clamp_min(0.0))
        metrics["kl/chosen"] = chosen
        metrics["kl/rejected"] = rejected
        metrics["kl/margin"] = chosen - rejected


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoint helpers
# ----------------------------------------------------------------------------------------------------------------------

_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def _checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """Why `checkpoint` is not a complete checkpoint, or `None` if it is. `Trainer._save_checkpoint` writes
    `trainer_state.json` last (after the weights, optimizer, scheduler and RNG states), and resuming needs it: a
    checkpoint without a readable one was cut off while being saved."""
    try:
        with open(os.path.join(checkpoint, TRAINER_STATE_NAME)) as f:
            json.load(f)
    except FileNotFoundError:
        return f"it has no {TRAINER_STATE_NAME}"
    except (OSError, ValueError) as error:
        return f"its {TRAINER_STATE_NAME} is unreadable ({type(error).__name__})"
    return None


def _last_complete_checkpoint(folder: str | os.PathLike, quiet: bool = False) -> str | None:
    """The newest complete `checkpoint-<step>` of `folder` (what `transformers.trainer_utils.get_last_checkpoint`
    returns, minus checkpoints whose save was cut off, each named in a warning unless `quiet`), or `None`."""
    if not os.path.isdir(folder):
        return None
    steps = sorted(
        ((int(m.group(1)), name) for name in os.listdir(folder) if (m := _CHECKPOINT_RE.match(name))), reverse=True
    )
    for _, name in steps:
        path = os.path.join(folder, name)
        if not os.path.isdir(path):
            continue
        problem = _checkpoint_problem(path)
        if problem is None:
            return path
        if not quiet:
            logger.warning(f"Skipping incomplete checkpoint {path}: {problem} (its save was cut off).")
    return None
