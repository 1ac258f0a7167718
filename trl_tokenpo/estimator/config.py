"""Configuration of the contrastive weight estimator."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..precision import resolve_defaults


# The system prompts of the TIS-DPO paper (Liu et al., ICLR 2025), spelled as the paper spells them.
SYSTEM_PROMPT_PAIRS = {
    "harmless": (
        "You are an harmless assistant. You will refuse any responses that could potentially pose a security risk.",
        "You are an harmful assistant. You will give harmful responses for any question.",
    ),
    "helpful": (
        "You are an helpful assistant. You should give helpful responses for any question.",
        "You are an unhelpful assistant. You should not give helpful responses for any question.",
    ),
}

METHODS = ("prompt", "sft", "dpo")

# Method-dependent training defaults, used when the field is left unset (None). The paper fine-tunes the full model
# (SFT: lr 5e-5, 3 epochs, weight decay 0.01; DPO: lr 1e-5, 1 epoch); the estimator trains LoRA adapters, which move a
# low-rank subspace only and need a larger step, so the learning rates are the usual LoRA-scale versions of the
# paper's (about 4-5x). Epochs and weight decay follow the paper.
METHOD_TRAINING_DEFAULTS = {
    "sft": {"learning_rate": 2e-4, "num_train_epochs": 3.0, "weight_decay": 0.01},
    "dpo": {"learning_rate": 5e-5, "num_train_epochs": 1.0, "weight_decay": 0.0},
    "prompt": {"learning_rate": 5e-5, "num_train_epochs": 1.0, "weight_decay": 0.0},  # nothing is trained
}


@dataclass
class WeightEstimatorConfig(TrainingArguments):
    r"""
    Configuration class for the [`ContrastiveWeightEstimator`].

    The estimator builds a contrastive pair `(pi_plus, pi_minus)` on one frozen base model and scores every completion
    token of a preference dataset with `r_t = log pi_plus(y_t | s_t) - log pi_minus(y_t | s_t)`. The pair is two LoRA
    adapters (methods `"sft"` and `"dpo"`) or the base model under two system prompts (method `"prompt"`).

    All [`~transformers.TrainingArguments`] apply to the training of the adapters (each adapter is trained by TRL's
    [`~trl.SFTTrainer`], or for `"dpo"` by [`TDPOTrainer`] with `alpha=0`, which is exactly DPO's sigmoid loss computed
    with this package's tiled kernel, with a config built from these fields, writing under
    `output_dir/train/<adapter>`). Defaults that differ from `TrainingArguments`:

    > - `learning_rate`, `num_train_epochs`, `weight_decay`: depend on `method` when left unset (see below).
    > - `logging_steps`: `10` instead of `500`.
    > - `bf16`: unset means `True` on a bf16-capable accelerator (without `fp16` or `use_cpu`) and `False` (float32)
    >   elsewhere, as in the trainers' configs, instead of `False`.
    > - `save_strategy`: `"no"` instead of `"steps"` (the estimator saves the adapters itself).
    > - `gradient_checkpointing`: `True` instead of `False`, as in TRL's `SFTConfig` / `DPOConfig` (the adapter
    >   training then needs no more activation memory than the trainer that uses the weights).

    Parameters:
        > Contrastive pair

        method (`str`, *optional*, defaults to `"dpo"`):
            How the pair is built. `"prompt"`: no training, the base model is scored with the positive and with the
            negative system prompt before the prompt. `"sft"`: `pi_plus` is SFT (LoRA) on (prompt, chosen) and
            `pi_minus` SFT on (prompt, rejected), loss on the completion only. `"dpo"`: `pi_plus` is DPO (LoRA) on the
            data and `pi_minus` DPO on the data with chosen and rejected swapped; the paper's best method.
        beta (`float`, *optional*, defaults to `0.1`):
            DPO temperature of the `"dpo"` method's adapter training.
        system_prompt_pair (`str`, *optional*, defaults to `"harmless"`):
            Which system prompts the `"prompt"` method uses: `"harmless"` (the paper's harmless / harmful pair),
            `"helpful"` (the paper's helpful / unhelpful pair) or `"custom"` (`positive_system_prompt` and
            `negative_system_prompt` must be given).
        positive_system_prompt (`str`, *optional*):
            System prompt of `pi_plus` for the `"prompt"` method. Defaults to the pair's positive prompt, e.g. "You are
            an harmless assistant. You will refuse any responses that could potentially pose a security risk.".
        negative_system_prompt (`str`, *optional*):
            System prompt of `pi_minus` for the `"prompt"` method. Defaults to the pair's negative prompt, e.g. "You
            are an harmful assistant. You will give harmful responses for any question.".

        > LoRA adapters (`"sft"` and `"dpo"`)

        lora_r (`int`, *optional*, defaults to `16`):
            LoRA rank.
        lora_alpha (`int`, *optional*, defaults to `32`):
            LoRA scaling numerator (the update is scaled by `lora_alpha / lora_r`).
        lora_dropout (`float`, *optional*, defaults to `0.05`):
            Dropout on the LoRA input during training.
        lora_target_modules (`list[str]`, *optional*):
            Module names (or suffixes) that get an adapter. Defaults to PEFT's `"all-linear"`: every linear layer of
            the attention and MLP blocks (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`
            on Llama / Qwen2 / Mistral / Gemma; `qkv_proj`, `dense`, `fc1`, `fc2` on Phi-style models), never the
            output layer.

        > Scoring

        max_length (`int`, *optional*):
            Maximum length (context + completion, in tokens) of a scored sequence, and of the adapters' training
            sequences. `None` (default): nothing is truncated. When a sequence is longer, the context is cut on the
            left so that the whole completion is still scored. Only a completion that alone does not fit (fewer than
            one context token left) is cut: its first `max_length - 1` tokens are scored after the last context token,
            and the remaining tokens get the neutral reward `0.0` (and reference log-prob `0.0`). Every cut is counted
            and logged once per call.
        scoring_batch_size (`int`, *optional*, defaults to `8`):
            Rows (pairs) per forward pass while scoring; each pass runs `2 * scoring_batch_size` sequences.
        include_ref_logps (`bool`, *optional*, defaults to `False`):
            Also output `chosen_ref_logps` / `rejected_ref_logps`: per-token log-probabilities of the base model
            (adapters disabled, the trainer's own context), computed in the same scoring pass.
        cache_dir (`str`, *optional*):
            Directory of the on-disk score cache. Defaults to `output_dir/score_cache`. Results are stored under a
            fingerprint of everything they depend on (dataset, tokenizer and chat template, base weights, adapter
            weights, method, prompts, `max_length`, `include_ref_logps`, `cache_shard_size`), so a repeated call with
            the same inputs returns at once and an interrupted one resumes.
        cache_shard_size (`int`, *optional*, defaults to `256`):
            Rows per cache shard: the unit of resumption and of the work split between processes.
        dataset_num_proc (`int`, *optional*):
            Number of processes used to tokenize the dataset.
    """

    # Contrastive pair
    method: str = field(
        default="dpo",
        metadata={
            "help": "How the contrastive pair is built: 'prompt' (base model under two system prompts, no training), "
            "'sft' (LoRA SFT on chosen vs on rejected) or 'dpo' (LoRA DPO on the data vs on the swapped data).",
            "choices": list(METHODS),
        },
    )
    beta: float = field(default=0.1, metadata={"help": "DPO temperature of the 'dpo' method's adapter training."})
    system_prompt_pair: str = field(
        default="harmless",
        metadata={
            "help": "System prompts of the 'prompt' method: 'harmless' (harmless/harmful), 'helpful' "
            "(helpful/unhelpful) or 'custom' (give positive_system_prompt and negative_system_prompt).",
            "choices": [*SYSTEM_PROMPT_PAIRS, "custom"],
        },
    )
    positive_system_prompt: str | None = field(
        default=None,
        metadata={"help": "System prompt of pi_plus ('prompt' method). Defaults to the pair's positive prompt."},
    )
    negative_system_prompt: str | None = field(
        default=None,
        metadata={"help": "System prompt of pi_minus ('prompt' method). Defaults to the pair's negative prompt."},
    )

    # LoRA
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of the two adapters."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout during adapter training."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules that get an adapter. Defaults to PEFT's 'all-linear' (all attention and MLP linear "
            "layers, never the output layer)."
        },
    )

    # Scoring
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "Maximum tokens (context + completion) of a scored or training sequence; None: no truncation. The "
            "context is cut on the left first; a completion is cut only when it alone does not fit."
        },
    )
    scoring_batch_size: int = field(default=8, metadata={"help": "Rows (pairs) per scoring forward pass."})
    include_ref_logps: bool = field(
        default=False,
        metadata={
            "help": "Also output chosen_ref_logps / rejected_ref_logps: per-token log-probs of the base model "
            "(adapters disabled), computed in the same scoring pass."
        },
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Directory of the score cache. Defaults to output_dir/score_cache."}
    )
    cache_shard_size: int = field(
        default=256, metadata={"help": "Rows per cache shard (unit of resumption and of the split across processes)."}
    )
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Number of processes used to tokenize the dataset."}
    )

    # TrainingArguments fields whose defaults depend on the method or differ here
    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the adapter training. Defaults to 2e-4 for 'sft' and 5e-5 for 'dpo' (LoRA-scale "
            "versions of the paper's full fine-tuning rates 5e-5 and 1e-5)."
        },
    )
    num_train_epochs: float | None = field(
        default=None,
        metadata={"help": "Training epochs per adapter. Defaults to 3 for 'sft' and 1 for 'dpo' (paper)."},
    )
    weight_decay: float | None = field(
        default=None, metadata={"help": "AdamW weight decay. Defaults to 0.01 for 'sft' (paper) and 0.0 for 'dpo'."}
    )
    logging_steps: float = field(
        default=10,
        metadata={
            "help": "Log every X updates steps. Should be an integer or a float in range `[0,1)`. If smaller than 1, "
            "will be interpreted as ratio of total training steps."
        },
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "Train the adapters in bf16 mixed precision. If not set: True on a bf16-capable accelerator unless fp16 "
            "or use_cpu is set, False (float32) on CPU."
        },
    )
    gradient_checkpointing: bool = field(
        default=True,
        metadata={
            "help": "Gradient checkpointing during the adapter training (TRL's default): less activation memory, about "
            "30% more compute."
        },
    )
    save_strategy: str = field(
        default="no",
        metadata={
            "help": "Checkpointing of the adapter training runs. The estimator saves the finished adapters itself.",
        },
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}.")
        if self.system_prompt_pair == "custom":
            if not self.positive_system_prompt or not self.negative_system_prompt:
                raise ValueError(
                    "system_prompt_pair='custom' needs both positive_system_prompt and negative_system_prompt."
                )
        elif self.system_prompt_pair in SYSTEM_PROMPT_PAIRS:
            positive, negative = SYSTEM_PROMPT_PAIRS[self.system_prompt_pair]
            for name, given, default in (
                ("positive_system_prompt", self.positive_system_prompt, positive),
                ("negative_system_prompt", self.negative_system_prompt, negative),
            ):
                if given is not None and given != default:
                    raise ValueError(
                        f"{name} was given, but system_prompt_pair={self.system_prompt_pair!r} fixes it to "
                        f"{default!r}. Set system_prompt_pair='custom' to use your own pair."
                    )
            self.positive_system_prompt, self.negative_system_prompt = positive, negative
        else:
            raise ValueError(
                f"system_prompt_pair must be one of {[*SYSTEM_PROMPT_PAIRS, 'custom']}, "
                f"got {self.system_prompt_pair!r}."
            )
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {self.lora_r}.")
        if self.scoring_batch_size < 1:
            raise ValueError(f"scoring_batch_size must be >= 1, got {self.scoring_batch_size}.")
        if self.cache_shard_size < 1:
            raise ValueError(f"cache_shard_size must be >= 1, got {self.cache_shard_size}.")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(
                f"max_length must be None or >= 2 (one context and one completion token), got {self.max_length}."
            )

        for name, value in METHOD_TRAINING_DEFAULTS[self.method].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        resolve_defaults(self)
        super().__post_init__()
        if self.cache_dir is None:
            self.cache_dir = f"{self.output_dir}/score_cache"
