"""Gradient checkpointing across the transformers rename (5.24: `activation_checkpointing`).

transformers >= 5.24 calls it activation checkpointing; the old names (`is_gradient_checkpointing`,
`gradient_checkpointing_enable/disable`) still work and print a FutureWarning. This package uses the new names where
they exist (`checkpointing_enabled`, `disable_checkpointing`), and silences the warning where a library it calls
(TRL's trainers, peft's `get_peft_model`) still reads the old name (`quiet_checkpointing_rename`): the user cannot act
on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings


__all__ = [
    "adopt_checkpointing_name",
    "checkpointing_enabled",
    "checkpointing_name",
    "disable_checkpointing",
    "quiet_checkpointing_rename",
    "set_checkpointing",
]

_RENAMED = r"`(is_gradient_checkpointing|gradient_checkpointing_enable|gradient_checkpointing_disable)` is deprecated"


def checkpointing_name() -> str:
    """transformers' name of the `TrainingArguments` field: `activation_checkpointing` from 5.24 on (where
    `gradient_checkpointing` is its deprecated alias), else `gradient_checkpointing`. Read from the installed version,
    without importing transformers."""
    from importlib.metadata import version

    major, minor = (int(part) for part in version("transformers").split(".")[:2])
    return "activation_checkpointing" if (major, minor) >= (5, 24) else "gradient_checkpointing"


def adopt_checkpointing_name(config) -> None:
    """Before `TrainingArguments.__post_init__`: move TRL's `gradient_checkpointing` (and its kwargs) to the new names
    where those are unset, as transformers would, but without its FutureWarning about a name the user did not choose
    (TRL's configs set it by default). `gradient_checkpointing` still mirrors the new name afterwards."""
    names = {f.name for f in dataclasses.fields(config)}
    for old, new in (
        ("gradient_checkpointing", "activation_checkpointing"),
        ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
    ):
        if new in names and getattr(config, new) is None and getattr(config, old) is not None:
            setattr(config, new, getattr(config, old))


def checkpointing_enabled(model) -> bool:
    """Whether (gradient / activation) checkpointing is on for `model`; `False` for a model without it."""
    if hasattr(model, "activation_checkpointing_enable"):
        return bool(getattr(model, "is_activation_checkpointing", False))
    return bool(getattr(model, "is_gradient_checkpointing", False))


def set_checkpointing(model, enabled: bool, kwargs: dict | None = None) -> None:
    """Turn checkpointing on (with `kwargs`, TrainingArguments' `gradient_checkpointing_kwargs`) or off."""
    new = hasattr(model, "activation_checkpointing_enable")
    if not enabled:
        (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()
    elif new:
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(kwargs)


@contextlib.contextmanager
def disable_checkpointing(model, kwargs: dict | None = None):
    """TRL's `disable_gradient_checkpointing` (off for the block, then restored with `kwargs`), with the new names."""
    enabled = checkpointing_enabled(model)
    if enabled:
        set_checkpointing(model, False)
    try:
        yield
    finally:
        if enabled:
            set_checkpointing(model, True, kwargs)


@contextlib.contextmanager
def quiet_checkpointing_rename():
    """No FutureWarning about the old checkpointing names inside the block (raised by library code we call)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_RENAMED, category=FutureWarning)
        yield
