"""TIS-DPO: token-level importance sampling for DPO with estimated weights, Liu et al., ICLR 2025."""

from __future__ import annotations

import dataclasses
import math
import textwrap
from dataclasses import dataclass, field

import torch
from accelerate.logging import get_logger
from accelerate.utils import is_peft_model
from datasets import Dataset

from .. import losses
from ..data import (
    REF_LOGPS_COLUMNS,
    REWARD_COLUMNS,
    DataCollatorForTokenPreference,
    TokenColumn,
    TokenColumnError,
    validate_token_columns,
)
from ..fingerprint import fingerprint, jsonable, reference_fingerprint
from ..weights import REWARD_DENOISERS, WEIGHT_TRANSFORMS, WeightTransform
from .base import Objective, TokenLevelDPOConfig, TokenLevelDPOTrainer
from .sync_free import DeviceValue, value_if_positive


logger = get_logger(__name__)

WEIGHT_COLUMNS = ("chosen_weights", "rejected_weights")
# TISDPOConfig fields of the rewards-to-weights transform
TRANSFORM_FIELDS = (
    "weight_transform", "weight_mu", "weight_k", "weight_clamp", "rank_range", "scale_range", "scale_threshold",
    "normalize_weights", "reward_denoise", "reward_denoise_threshold",
)  # fmt: skip


@dataclass
class TISDPOConfig(TokenLevelDPOConfig):
    r"""
    Configuration class for the [`TISDPOTrainer`].

    All [`~trl.DPOConfig`] options apply but the few the trainer refuses (see its documentation), and `bf16` defaults
    as in [`TokenLevelDPOConfig`] (float32 on CPU). The TIS-DPO fields:

    Parameters:
        tis_kl_term (`str`, *optional*, defaults to `"none"`):
            The KL term `eta` subtracted from the weighted margin. `"none"`: no term (the released code's default and
            the paper's "w.o. eta" ablation; costs exactly what DPO costs). `"reverse"`: `alpha * (RKLw_w - RKLw_l)`,
            the paper's Eq. 16 with the token-weighted reverse KL `KL(pi_theta || pi_ref)`. `"tdpo"`: `alpha *
            (FKLw_l - sg(FKLw_w))`, TDPO2's forward-KL term with token weights.
        alpha (`float`, *optional*, defaults to `0.5`):
            Weight of the KL term; not used with `tis_kl_term="none"`.
        weight_transform (`str`, *optional*, defaults to `"exp"`):
            How token rewards `r_t` (columns `chosen_token_rewards` / `rejected_token_rewards`) become importance
            weights. `"exp"`: the paper's Eq. 19, `w = k * exp(mu * clamp(r, L, U))` with `+mu` on chosen and `-mu` on
            rejected tokens. `"rank"`: per completion, rank the signed reward (`+r` chosen, `-r` rejected) and map ranks
            linearly onto `rank_range` (mean 1). `"threshold_scale"`: clamp the signed reward to `[-scale_threshold,
            scale_threshold]` and map it linearly onto `scale_range`. Ready weights (columns `chosen_weights` /
            `rejected_weights`) are used as given and ignore these settings.
        weight_mu (`float`, *optional*, defaults to `1.0`):
            `mu` of the exp transform (the sign is `+` on chosen and `-` on rejected tokens).
        weight_k (`float`, *optional*, defaults to `1.0`):
            `k` of the exp transform.
        weight_clamp (`list[float]`, *optional*, defaults to `[-0.5, 1.5]`):
            `(L, U)` bounds of the reward in the exp transform.
        rank_range (`list[float]`, *optional*, defaults to `[0.7, 1.3]`):
            Weights of the lowest and highest rank of the rank transform.
        scale_range (`list[float]`, *optional*, defaults to `[0.7, 1.3]`):
            Weights at `-scale_threshold` and `+scale_threshold` of the threshold_scale transform.
        scale_threshold (`float`, *optional*, defaults to `1.5`):
            Clamp bound of the signed reward in the threshold_scale transform.
        normalize_weights (`bool`, *optional*, defaults to `False`):
            Rescale each completion's weights to mean 1 after the transform, keeping the effective `beta` comparable
            with DPO. Applies to rewards-derived weights only.
        reward_denoise (`str`, *optional*, defaults to `"none"`):
            Applied to each completion's token rewards before `weight_transform`. `"none"`: rewards as estimated.
            `"center"`: subtract the completion's median reward. `"soft_threshold"`: center, then shrink every reward
            toward 0 by `reward_denoise_threshold` robust standard deviations (1.4826 x the median absolute deviation
            of the completion's centered rewards), so that tokens within that band get reward 0 (weight `weight_k`
            under `exp`). Meant for estimates that are noisy on tokens without preference (DPO-based ones); see
            docs/tisdpo.md for when it helps.
        reward_denoise_threshold (`float`, *optional*, defaults to `2.0`):
            Half-width of the zero band of `reward_denoise="soft_threshold"`, in robust standard deviations.
    """

    tis_kl_term: str = field(
        default="none",
        metadata={
            "help": "KL term subtracted from the weighted margin: 'none' (DPO's cost), 'reverse' (paper Eq. 16, "
            "weighted reverse KL) or 'tdpo' (TDPO2's weighted forward KL).",
            "choices": ["none", "reverse", "tdpo"],
        },
    )
    alpha: float = field(default=0.5, metadata={"help": "Weight of the KL term; unused with tis_kl_term='none'."})
    weight_transform: str = field(
        default="exp",
        metadata={
            "help": "Token rewards to weights: 'exp' (paper Eq. 19), 'rank' (released code) or 'threshold_scale'.",
            "choices": list(WEIGHT_TRANSFORMS),
        },
    )
    weight_mu: float = field(
        default=1.0, metadata={"help": "mu of the exp transform: +mu on chosen tokens, -mu on rejected tokens."}
    )
    weight_k: float = field(default=1.0, metadata={"help": "k of the exp transform w = k * exp(mu * clamp(r, L, U))."})
    weight_clamp: list[float] = field(
        default_factory=lambda: [-0.5, 1.5], metadata={"help": "(L, U) reward clamp of the exp transform."}
    )
    rank_range: list[float] = field(
        default_factory=lambda: [0.7, 1.3], metadata={"help": "Weights of the lowest and highest rank ('rank')."}
    )
    scale_range: list[float] = field(
        default_factory=lambda: [0.7, 1.3],
        metadata={"help": "Weights at -scale_threshold and +scale_threshold ('threshold_scale')."},
    )
    scale_threshold: float = field(
        default=1.5, metadata={"help": "Clamp bound of the signed reward ('threshold_scale')."}
    )
    normalize_weights: bool = field(
        default=False, metadata={"help": "Rescale each completion's rewards-derived weights to mean 1."}
    )
    reward_denoise: str = field(
        default="none",
        metadata={
            "help": "Per completion, before the transform: 'none', 'center' (subtract the median reward) or "
            "'soft_threshold' (center, then shrink toward 0 by reward_denoise_threshold robust standard deviations).",
            "choices": list(REWARD_DENOISERS),
        },
    )
    reward_denoise_threshold: float = field(
        default=2.0, metadata={"help": "Zero band of reward_denoise='soft_threshold', in robust standard deviations."}
    )


class TISDPOTrainer(TokenLevelDPOTrainer):
    """
    Trainer for TIS-DPO (token-level importance sampling DPO), a drop-in replacement for [`~trl.DPOTrainer`].

    Every completion token carries a fixed importance weight `w_t`, and the margin uses weighted sums of the token
    log-ratios, `z = sum_t w_t lr_t (chosen) - sum_t w_t lr_t (rejected) - eta`, with the loss `-log sigmoid(beta z)`.
    `eta` is the optional KL term of `tis_kl_term`.

    The dataset carries, per row, EITHER `chosen_token_rewards` + `rejected_token_rewards` (token rewards, e.g. from
    [`ContrastiveWeightEstimator.estimate`], turned into weights by `weight_transform`) OR `chosen_weights` +
    `rejected_weights` (ready weights, used as given). Each list has exactly one float per token of the tokenized
    completion (`chosen_ids` / `rejected_ids`, EOS or end-of-turn included). Rows are checked before training: a
    missing column, a wrong length, a NaN/inf or a negative weight raises an error naming the dataset, row and column.

    With every weight 1 and `tis_kl_term="none"` this is DPO; with every weight 1 and `tis_kl_term="tdpo"` it is TDPO2.
    With `tis_kl_term="none"` it costs what DPO costs: only gathered label log-probabilities are computed.

    Example:

    ```python
    >>> from trl_tokenpo import ContrastiveWeightEstimator, TISDPOConfig, TISDPOTrainer, WeightEstimatorConfig

    >>> estimator = ContrastiveWeightEstimator("Qwen/Qwen2.5-0.5B-Instruct", args=WeightEstimatorConfig("weights"))
    >>> weighted = estimator.estimate(dataset)
    >>> trainer = TISDPOTrainer(
    ...     model="Qwen/Qwen2.5-0.5B-Instruct", args=TISDPOConfig("Qwen2.5-0.5B-TISDPO"), train_dataset=weighted
    ... )
    >>> trainer.train()
    ```

    Logged metrics: all of DPOTrainer's (`rewards/*` remain the unweighted `beta * LR`), plus `weights/chosen_mean`,
    `weights/rejected_mean`, `weights/chosen_max`, `weights/rejected_min` over the batch's completion tokens, and with a
    KL term `kl/chosen`, `kl/rejected`, `kl/margin` (unweighted sequence KL of the term's kind).

    DPOConfig options: as for [`TDPOTrainer`], except `precompute_ref_log_probs=True`, which works with
    `tis_kl_term="none"`: the reference's token-weighted sums are computed once before training (respecting the weight
    transform, LD-DPO and TRL's truncation), and the reference model is released as DPOTrainer does.

    Args:
        model, ref_model, args, data_collator, train_dataset, eval_dataset, processing_class, compute_metrics,
        callbacks, optimizers, quantization_config, peft_config:
            As in [`~trl.DPOTrainer`]; `args` is a [`TISDPOConfig`] or a [`~trl.DPOConfig`]. A custom `data_collator`
            must be a [`DataCollatorForTokenPreference`] producing `token_weights`.
    """

    config_class = TISDPOConfig
    _tag_names = ["trl", "dpo", "tis-dpo", "trl-tokenpo"]
    _name = "TISDPO"
    _paper = {
        "title": "TIS-DPO: Token-level Importance Sampling for Direct Preference Optimization With Estimated Weights",
        "id": "2410.04350",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{liu2025tisdpo,
                title        = {{TIS-DPO: Token-level Importance Sampling for Direct Preference Optimization With Estimated Weights}},
                author       = {Aiwei Liu and Haoping Bai and Zhiyun Lu and Yanchao Sun and Xiang Kong and Simon Wang and Jiulong Shan and Albin Madappally Jose and Xiaojiang Liu and Lijie Wen and Philip S. Yu and Meng Cao},
                year         = 2025,
                booktitle    = {The Thirteenth International Conference on Learning Representations, {ICLR} 2025},
            }"""),
    }

    def __init__(self, model, ref_model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, compute_metrics=None, callbacks=None, optimizers=(None, None),
                 quantization_config=None, peft_config=None):  # fmt: skip
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        self._token_source = self._detect_token_source(train_dataset, "train")
        for name, dataset in self._named_eval_datasets(eval_dataset):
            source = self._detect_token_source(dataset, name)
            if source != self._token_source:
                raise TokenColumnError(
                    f"The train dataset carries `{self._token_source[0]}` but the {name} dataset carries "
                    f"`{source[0]}`: use the same kind of per-token column (rewards or ready weights) in both."
                )
        if data_collator is not None and not isinstance(data_collator, DataCollatorForTokenPreference):
            raise TypeError(
                "TISDPOTrainer needs a collator that lays out the per-token weights: pass a "
                f"`trl_tokenpo.DataCollatorForTokenPreference` (or None); got {type(data_collator).__name__}."
            )
        super().__init__(model, ref_model, args, data_collator, train_dataset, eval_dataset, processing_class,
                         compute_metrics, callbacks, optimizers, quantization_config, peft_config)  # fmt: skip

    # Configuration ----------------------------------------------------------------------------------------------

    def _check_method_args(self, args):
        kl_term = self.method_args["tis_kl_term"]
        if kl_term not in losses.TIS_KL_TERMS:
            raise ValueError(f"`tis_kl_term` must be one of {losses.TIS_KL_TERMS}; got {kl_term!r}.")
        if self.method_args["alpha"] < 0:
            raise ValueError(f"`alpha` must be >= 0; got {self.method_args['alpha']}.")
        for name in ("weight_clamp", "rank_range", "scale_range"):
            if len(self.method_args[name]) != 2:
                raise ValueError(f"`{name}` must hold two numbers (low, high); got {self.method_args[name]}.")
        self.weight_transform = WeightTransform(
            transform=self.method_args["weight_transform"],
            mu=self.method_args["weight_mu"],
            k=self.method_args["weight_k"],
            clamp=tuple(self.method_args["weight_clamp"]),
            rank_range=tuple(self.method_args["rank_range"]),
            scale_range=tuple(self.method_args["scale_range"]),
            scale_threshold=self.method_args["scale_threshold"],
            normalize=self.method_args["normalize_weights"],
            denoise=self.method_args["reward_denoise"],
            denoise_threshold=self.method_args["reward_denoise_threshold"],
        )
        # Settings that the chosen options leave unused: said, not silently dropped
        unused = []
        if kl_term == "none" and self.method_args["alpha"] != 0.5:
            unused.append("`alpha` (no KL term with tis_kl_term='none')")
        if self._token_source == WEIGHT_COLUMNS:
            defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                        for f in dataclasses.fields(TISDPOConfig)}  # fmt: skip
            changed = [name for name in TRANSFORM_FIELDS if self.method_args[name] != defaults[name]]
            if changed:
                unused.append(f"{', '.join(f'`{n}`' for n in changed)} (the dataset carries ready weights, used as given)")
        for item in unused:
            logger.warning(f"TISDPOTrainer ignores {item}.", main_process_only=True)

    @property
    def _kl_outputs(self):
        return {"none": (), "reverse": ("reverse_kl",), "tdpo": ("forward_kl",)}[self.method_args["tis_kl_term"]]

    def _precompute_refusal(self, args):
        kl_term = self.method_args["tis_kl_term"]
        if kl_term != "none":
            return (
                f"`precompute_ref_log_probs=True` is not supported with `tis_kl_term={kl_term!r}`: the KL term needs "
                "the reference distribution at every position, while precomputation stores one summed log-probability "
                "per completion. Use tis_kl_term='none' or precompute_ref_log_probs=False."
            )
        return None  # supported: `compute_ref_log_probs` stores the token-weighted sums

    def _precompute_ref_logps(self, dataset, name, batch_size):
        self._ensure_token_collator()
        if isinstance(dataset, Dataset) and all(c in dataset.column_names for c in REF_LOGPS_COLUMNS):
            return self._ref_sums_from_columns(dataset, name, batch_size)
        # DPOTrainer caches the precomputed values under a hash of (dataset, model): the weighted sums also depend on
        # the weight transform and LD-DPO, so they join the hash once
        if not getattr(self, "_weighted_hash_applied", False):
            self._precompute_model_hash = fingerprint(
                self._precompute_model_hash, "tisdpo-weighted-sums-v1", jsonable(dataclasses.asdict(self.weight_transform)),
                list(self._token_source), self.ld_alpha,
            )  # fmt: skip
            self._weighted_hash_applied = True
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _ref_sums_from_columns(self, dataset, name, batch_size):
        """The reference sums from the per-token reference log-probabilities the estimator wrote
        (`include_ref_logps=True`), with no reference forward pass. Refused unless the estimator's base model and
        tokenizer are exactly this trainer's reference and tokenizer."""
        self._check_ref_logps_source(dataset, name)
        validate_token_columns(dataset, name, *REF_LOGPS_COLUMNS, allow_negative=True, hint="")
        collator = dataclasses.replace(
            self.data_collator, token_columns=[self._token_column(), TokenColumn("ref_token_logps", *REF_LOGPS_COLUMNS)]
        )
        columns = ["prompt_ids", "chosen_ids", "rejected_ids", *self._token_source, *REF_LOGPS_COLUMNS]
        chosen, rejected = [], []
        for start in range(0, len(dataset), batch_size):
            batch = collator(dataset.select_columns(columns).select(range(start, min(start + batch_size, len(dataset)))))
            c, r = self._reference_sums(batch["ref_token_logps"][:, 1:], batch)
            chosen.extend(c.tolist())
            rejected.extend(r.tolist())
        return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)

    def _check_ref_logps_source(self, dataset, name):
        if "ref_logps_fingerprint" not in dataset.column_names:
            raise TokenColumnError(
                f"The {name} dataset has `chosen_ref_logps` / `rejected_ref_logps` but no `ref_logps_fingerprint` "
                "column saying which model computed them, so they cannot be checked against this trainer's reference. "
                "Recompute them with `ContrastiveWeightEstimator` (include_ref_logps=True), or drop the columns."
            )
        unwrapped = self.accelerator.unwrap_model(self.ref_model if self.ref_model is not None else self.model)
        if self.ref_model is None and is_peft_model(unwrapped) and "ref" in unwrapped.peft_config:
            raise ValueError(
                "The reference of this run is a copy of your pre-trained PEFT adapter, not the base model the "
                "estimator scored with adapters disabled: its per-token reference log-probs do not apply. Drop the "
                "`chosen_ref_logps` / `rejected_ref_logps` columns to compute the reference here."
            )
        expected = reference_fingerprint(unwrapped, self.processing_class)
        found = set(dataset.unique("ref_logps_fingerprint"))
        if found != {expected}:
            raise ValueError(
                f"The per-token reference log-probs of the {name} dataset were computed by another model or tokenizer "
                f"(fingerprint {sorted(found)[0][:12]}...) than this trainer's reference ({expected[:12]}...). Using them "
                "would train against a stale reference. Recompute them with the estimator on this model, or drop the "
                "`chosen_ref_logps` / `rejected_ref_logps` columns."
            )

    def compute_ref_log_probs(self, model, inputs):
        """Reference sums of one padded batch for `precompute_ref_log_probs`: per completion, `[unweighted, weighted]`
        (the unweighted sum keeps DPOTrainer's `rewards/*` metrics; the weighted one enters the TIS-DPO margin)."""
        model_kwargs, labels = self._model_inputs(inputs)
        return self._reference_sums(self._reference_token_logps(model, model_kwargs, labels), inputs)

    def _reference_sums(self, token_logps, batch):
        """`(chosen, rejected)` reference sums `[unweighted, weighted]` per completion, `(B, 2)` each, from `(2B, T-1)`
        per-token reference log-probs of a collated batch (its weights, LD-DPO and truncation applied)."""
        mask = batch["completion_mask"][:, 1:].to(torch.float32)
        ld_weights = self._ld_weights(mask)
        weights = batch["token_weights"][:, 1:].to(torch.float32)
        sums = torch.stack(
            [losses.masked_sum(token_logps, mask, ld_weights), losses.masked_sum(token_logps, mask, weights * ld_weights)],
            dim=-1,
        )
        return sums.chunk(2, dim=0)

    # Data -------------------------------------------------------------------------------------------------------

    @staticmethod
    def _named_eval_datasets(eval_dataset):
        if eval_dataset is None:
            return []
        if isinstance(eval_dataset, dict):
            return list(eval_dataset.items())
        return [("eval", eval_dataset)]

    @staticmethod
    def _detect_token_source(dataset, name) -> tuple[str, str]:
        columns = dataset.column_names if isinstance(dataset, Dataset) else list(next(iter(dataset)).keys())
        has_rewards = [c for c in REWARD_COLUMNS if c in columns]
        has_weights = [c for c in WEIGHT_COLUMNS if c in columns]
        if has_rewards and has_weights:
            raise TokenColumnError(
                f"The {name} dataset has both token rewards ({has_rewards}) and ready weights ({has_weights}); keep "
                "one kind: rewards are turned into weights by `weight_transform`, weights are used as given."
            )
        if len(has_rewards) == 2:
            return REWARD_COLUMNS
        if len(has_weights) == 2:
            return WEIGHT_COLUMNS
        found = has_rewards or has_weights
        raise TokenColumnError(
            f"The {name} dataset needs per-token columns for TIS-DPO: either `chosen_token_rewards` + "
            f"`rejected_token_rewards` or `chosen_weights` + `rejected_weights`"
            + (f" (it has only {found})" if found else f" (its columns: {columns})")
            + ". `ContrastiveWeightEstimator.estimate(dataset)` produces the token rewards."
        )

    def _token_columns(self):
        return [self._token_column()]

    def _token_column(self) -> TokenColumn:
        chosen, rejected = self._token_source
        is_rewards = self._token_source == REWARD_COLUMNS
        return TokenColumn(
            key="token_weights",
            chosen=chosen,
            rejected=rejected,
            transform=self.weight_transform if is_rewards else None,
            allow_negative=is_rewards,
        )

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if isinstance(dataset, Dataset) and all(c in dataset.column_names for c in REF_LOGPS_COLUMNS):
            if not args.precompute_ref_log_probs:
                logger.warning(
                    f"The {dataset_name} dataset carries per-token reference log-probs (`chosen_ref_logps` / "
                    "`rejected_ref_logps`), which this run does not use: they replace the reference model only with "
                    "`precompute_ref_log_probs=True` (and tis_kl_term='none'). The reference runs live instead.",
                    main_process_only=True,
                )
        chosen, rejected = self._token_source
        validate_token_columns(
            dataset, dataset_name, chosen, rejected, allow_negative=self._token_source == REWARD_COLUMNS,
            source_rows=self._source_rows.get(dataset_name),
        )  # fmt: skip
        return dataset

    def _extra_signature_columns(self):
        return list(self._token_source)

    # Loss -------------------------------------------------------------------------------------------------------

    @property
    def _kl_gradient_sides(self):
        # The "tdpo" term stops the gradient of the chosen completions' KL, as TDPO2 does
        return "rejected" if self.method_args["tis_kl_term"] == "tdpo" else "both"

    def _objective(self, stats, mask, ld_weights, inputs, layout):
        if "token_weights" not in inputs:
            raise KeyError("The batch has no `token_weights`: the collator must be a DataCollatorForTokenPreference.")
        weights = inputs["token_weights"][:, 1:].to(torch.float32)
        kl_term, alpha = self.method_args["tis_kl_term"], self.method_args["alpha"]
        if stats.ref_logps is None:  # precomputed: column 1 holds the weighted reference sums
            ref_weighted = self._precomputed_ref_sums(inputs)[:, 1].to(torch.float32)
            weighted_logratio = losses.masked_sum(stats.policy_logps, mask, weights * ld_weights) - ref_weighted
        else:
            weighted_logratio = losses.masked_sum(stats.policy_logps - stats.ref_logps, mask, weights * ld_weights)
        forward_kl = losses.masked_sum(stats.forward_kl, mask, weights) if kl_term == "tdpo" else None
        reverse_kl = losses.masked_sum(stats.reverse_kl, mask, weights) if kl_term == "reverse" else None
        margin = losses.tisdpo_margin(weighted_logratio, kl_term, alpha, forward_kl, reverse_kl)

        metrics = {}
        if kl_term != "none":
            per_token_kl = stats.forward_kl if kl_term == "tdpo" else stats.reverse_kl
            self._log_kl_metrics(metrics, losses.masked_sum(per_token_kl, mask))
        metrics.update(self._weight_metrics(weights, mask, layout))
        return Objective(margin=margin, metrics=metrics)

    def _weight_metrics(self, weights, mask, layout):
        """`weights/*` over the batch's completion tokens (gathered across processes), as `DeviceValue`s. The scored
        tokens are picked by the layout's host-known index (chosen ones first), not by a boolean mask."""
        gather = self.accelerator.gather_for_metrics
        scored = weights.detach().reshape(-1).index_select(0, layout.index)  # [N]
        sides = {"chosen": scored[: layout.num_chosen], "rejected": scored[layout.num_chosen :]}
        chosen_m, rejected_m = losses.split_pairs(mask)
        metrics = {}
        for side, side_mask in (("chosen", chosen_m), ("rejected", rejected_m)):
            total = gather(sides[side].sum()).sum()
            count = gather(side_mask.sum()).sum()
            metrics[f"weights/{side}_mean"] = value_if_positive(total / count, count)
        # An empty side (every completion cut off by truncation) contributes -inf / +inf, as max / min of nothing
        chosen, rejected = sides["chosen"], sides["rejected"]
        chosen_max = chosen.max() if chosen.numel() else torch.full((), -math.inf, device=weights.device)
        rejected_min = rejected.min() if rejected.numel() else torch.full((), math.inf, device=weights.device)
        metrics["weights/chosen_max"] = DeviceValue(gather(chosen_max).max())
        metrics["weights/rejected_min"] = DeviceValue(gather(rejected_min).min())
        return metrics
