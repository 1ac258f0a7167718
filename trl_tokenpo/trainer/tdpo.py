"""Token-level Direct Preference Optimization (TDPO), Zeng et al., ICML 2024."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

from accelerate.logging import get_logger

from .. import losses
from .base import Objective, TokenLevelDPOConfig, TokenLevelDPOTrainer


logger = get_logger(__name__)


@dataclass
class TDPOConfig(TokenLevelDPOConfig):
    r"""
    Configuration class for the [`TDPOTrainer`].

    Everything of [`~trl.DPOConfig`] applies (see the trainer's documentation for the few options it refuses), with
    the CPU-friendly `bf16` default of [`TokenLevelDPOConfig`], plus:

    Parameters:
        alpha (`float`, *optional*, defaults to `0.5`):
            Weight of the sequential KL term of TDPO2, `alpha * (FKL_rejected - sg(FKL_chosen))`. With `alpha=0` TDPO2
            is exactly DPO. Not used by TDPO1, whose KL term has weight 1. The authors recommend 0.5 with `beta=0.1`.
        tdpo_variant (`str`, *optional*, defaults to `"tdpo2"`):
            `"tdpo1"`: margin `(LR_w - LR_l) - (FKL_l - FKL_w)`. `"tdpo2"`: margin `(LR_w - LR_l) - alpha * (FKL_l -
            sg(FKL_w))`, where `FKL` is the sequence sum of the per-token forward KL `KL(pi_ref || pi_theta)` over the
            full vocabulary and `sg` stops the gradient. The paper's experiments favour TDPO2.
    """

    alpha: float = field(
        default=0.5,
        metadata={
            "help": "Weight of TDPO2's sequential KL term alpha * (FKL_rejected - sg(FKL_chosen)). alpha=0 is DPO. "
            "Not used by tdpo1."
        },
    )
    tdpo_variant: str = field(
        default="tdpo2",
        metadata={
            "help": "TDPO objective: 'tdpo1' (KL difference with weight 1, no stop-gradient) or 'tdpo2' (weight alpha, "
            "gradient of the chosen KL stopped).",
            "choices": ["tdpo1", "tdpo2"],
        },
    )


class TDPOTrainer(TokenLevelDPOTrainer):
    """
    Trainer for Token-level Direct Preference Optimization (TDPO), a drop-in replacement for [`~trl.DPOTrainer`].

    TDPO adds to DPO's margin a forward KL divergence `KL(pi_ref || pi_theta)` between the reference and the policy,
    summed over the completion tokens, which regularizes the policy token by token:

    - TDPO1: `z = (LR_w - LR_l) - (FKL_l - FKL_w)`
    - TDPO2: `z = (LR_w - LR_l) - alpha * (FKL_l - sg(FKL_w))`

    and the loss is `-log sigmoid(beta * z)`. `LR` is DPO's sequence log-ratio. The KL runs over the full vocabulary at
    every completion position; it is computed in tiles from the two models' last hidden states, so memory does not
    grow with tokens x vocabulary (see `trl_tokenpo.kernels`).

    The constructor is DPOTrainer's. A plain [`~trl.DPOConfig`] as `args` means TDPO2 with `alpha=0.5`.

    Example:

    ```python
    >>> from datasets import load_dataset
    >>> from trl_tokenpo import TDPOConfig, TDPOTrainer

    >>> dataset = load_dataset("trl-lib/ultrafeedback_binarized", split="train")
    >>> trainer = TDPOTrainer(
    ...     model="Qwen/Qwen2.5-0.5B-Instruct",
    ...     args=TDPOConfig(output_dir="Qwen2.5-0.5B-TDPO", alpha=0.5),
    ...     train_dataset=dataset,
    ... )
    >>> trainer.train()
    ```

    Logged metrics: all of DPOTrainer's (`rewards/*` remain `beta * LR`, so runs compare with DPO runs), plus
    `kl/chosen`, `kl/rejected` (mean sequence forward KL), `kl/margin` (mean `FKL_w - FKL_l`) and
    `rewards_tdpo/{chosen,rejected,accuracies}`, the authors' reward `beta * (LR + FKL)`.

    DPOConfig options: `loss_type` other than `["sigmoid"]`, `f_divergence_type` other than `"reverse_kl"`,
    `label_smoothing` other than 0 (TRL applies it to the robust / EXO losses only) and `precompute_ref_log_probs=True`
    are refused with an error; `use_weighting`, `ld_alpha` (applied to the log-ratio sums only, as in DPO),
    `loss_weights`, `sync_ref_model`, PEFT, quantization and gradient checkpointing work.

    Args:
        model, ref_model, args, data_collator, train_dataset, eval_dataset, processing_class, compute_metrics,
        callbacks, optimizers, quantization_config, peft_config:
            As in [`~trl.DPOTrainer`]; `args` is a [`TDPOConfig`] or a [`~trl.DPOConfig`].
    """

    config_class = TDPOConfig
    _tag_names = ["trl", "dpo", "tdpo", "trl-tokenpo"]
    _name = "TDPO"
    _paper = {
        "title": "Token-level Direct Preference Optimization",
        "id": "2404.11999",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{zeng2024token,
                title        = {{Token-level Direct Preference Optimization}},
                author       = {Yongcheng Zeng and Guoqing Liu and Weiyu Ma and Ning Yang and Haifeng Zhang and Jun Wang},
                year         = 2024,
                booktitle    = {Forty-first International Conference on Machine Learning, {ICML} 2024},
            }"""),
    }

    def _check_method_args(self, args):
        variant, alpha = self.method_args["tdpo_variant"], self.method_args["alpha"]
        if variant not in losses.TDPO_VARIANTS:
            raise ValueError(f"`tdpo_variant` must be one of {losses.TDPO_VARIANTS}; got {variant!r}.")
        if alpha < 0:
            raise ValueError(f"`alpha` must be >= 0; got {alpha}.")
        if variant == "tdpo1" and alpha != 0.5:
            logger.warning(
                f"`alpha={alpha}` has no effect with tdpo_variant='tdpo1' (its KL term has weight 1); use "
                "tdpo_variant='tdpo2' to weight the KL term.",
                main_process_only=True,
            )

    @property
    def _kl_outputs(self):
        return ("forward_kl",)

    @property
    def _kl_gradient_sides(self):
        # TDPO2 stops the gradient of the chosen completions' KL
        return "rejected" if self.method_args["tdpo_variant"] == "tdpo2" else "both"

    def _objective(self, stats, mask, ld_weights, inputs, layout):
        logratio = losses.masked_sum(stats.policy_logps - stats.ref_logps, mask, ld_weights)
        forward_kl = losses.masked_sum(stats.forward_kl, mask)
        margin = losses.tdpo_margin(logratio, forward_kl, self.method_args["tdpo_variant"], self.method_args["alpha"])
        metrics = {}
        self._log_kl_metrics(metrics, forward_kl)
        tdpo_chosen, tdpo_rejected = losses.split_pairs(self.beta * (logratio + forward_kl).detach())
        metrics["rewards_tdpo/chosen"] = tdpo_chosen
        metrics["rewards_tdpo/rejected"] = tdpo_rejected
        metrics["rewards_tdpo/accuracies"] = (tdpo_chosen > tdpo_rejected).float()
        return Objective(margin=margin, metrics=metrics)
