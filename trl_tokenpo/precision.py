"""The defaults this package's configs resolve at construction: the precision (TRL's `bf16=True` where it works,
float32 on CPU), and two settings that would otherwise print a warning on every run (pinned memory without an
accelerator; the deprecated name of gradient checkpointing)."""

from __future__ import annotations

from transformers import TrainingArguments

from .compat import adopt_checkpointing_name


__all__ = ["BF16_HELP", "resolve_bf16_default", "resolve_defaults"]

BF16_HELP = (
    "Whether to use bf16 (mixed) precision instead of 32-bit. If not set: True on a bf16-capable accelerator (TRL's "
    "default there) unless fp16 or use_cpu is set, False (float32) on CPU."
)


def resolve_bf16_default(config: TrainingArguments) -> None:
    """Resolve an unset `bf16` of one of this package's configs, before `TrainingArguments.__post_init__` runs.

    TRL's configs turn an unset `bf16` into `True` (unless `fp16`), which transformers refuses on a machine without a
    bf16 accelerator, and which keeps bf16 autocast under `use_cpu=True`. Here an unset `bf16` becomes `True` exactly
    where that default works (a bf16-capable accelerator, `use_cpu` off, `fp16` off), and `False` (float32) elsewhere.
    A value the user sets is never changed: an explicit `bf16=True` without a bf16 device is an error that says what to
    do.
    """
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    device = is_torch_bf16_gpu_available() or is_torch_xla_available()
    if config.bf16 is None:
        config.bf16 = bool(not config.fp16 and not config.use_cpu and device)
    elif config.bf16 and not config.use_cpu and not device:
        raise ValueError(
            f"{type(config).__name__}(bf16=True) needs a bf16-capable accelerator, and this machine has none. Leave "
            "bf16 unset (or False) to train in float32, or also set use_cpu=True to train with bf16 autocast on CPU."
        )


def resolve_defaults(config: TrainingArguments) -> None:
    """Everything a config of this package resolves before `TrainingArguments.__post_init__` runs:

    - `bf16` (`resolve_bf16_default`);
    - `dataloader_pin_memory` is turned off where there is no accelerator (or with `use_cpu`): pinned memory only
      speeds up copies to an accelerator, and torch warns about it on every run otherwise;
    - with transformers >= 5.24, TRL's default `gradient_checkpointing=True` goes under its new name
      (`trl_tokenpo.compat.adopt_checkpointing_name`), without transformers' FutureWarning.
    """
    import torch

    resolve_bf16_default(config)
    accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    if config.use_cpu or not accelerator:
        config.dataloader_pin_memory = False
    adopt_checkpointing_name(config)
