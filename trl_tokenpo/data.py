"""The per-token data path: columns that travel next to TRL's `[chosen; rejected]` batch.

A per-token column holds, for every row, one float per token of TRL's tokenized completion (`chosen_ids` /
`rejected_ids`, so the EOS TRL appends to standard data, or the end-of-turn suffix of a chat template, is included).
The collator lays such columns out exactly like `completion_mask`: zeros on the prompt, the values on the completion,
the same `max_length` truncation slice, zeros on the padding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer
from trl.trainer.utils import pad


ESTIMATOR_HINT = (
    "`ContrastiveWeightEstimator.estimate(dataset)` produces `chosen_token_rewards` / `rejected_token_rewards` aligned "
    "with the trainer's tokenization."
)


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class TokenColumnError(ValueError):
    """A per-token column is missing, misaligned with the tokenized completion, or holds invalid values."""


@dataclass
class TokenColumn:
    """One per-token quantity carried into the batch.

    Args:
        key (`str`): name of the `(2B, T)` tensor in the batch.
        chosen (`str`): dataset column with the chosen completion's values.
        rejected (`str`): dataset column with the rejected completion's values.
        transform (`Callable`, *optional*): `transform(values, side) -> values` applied to each completion's values (a
            1-D float tensor of its full, untruncated length) before the layout, e.g. rewards to weights.
        allow_negative (`bool`, *optional*, defaults to `True`): whether negative input values are valid.
    """

    key: str
    chosen: str
    rejected: str
    transform: Callable[[torch.Tensor, str], torch.Tensor] | None = None
    allow_negative: bool = True


@dataclass
class DataCollatorForTokenPreference(DataCollatorForPreference):
    """[`~trl.trainer.dpo_trainer.DataCollatorForPreference`] that also lays out per-token columns.

    Each [`TokenColumn`] becomes a float32 `(2B, T)` tensor under its `key`, aligned position by position with
    `input_ids` and `completion_mask`: zeros on the prompt and the padding, the column's values on the completion,
    truncated with the same `max_length` / `truncation_mode` slice as the ids.

    Examples:
    ```python
    >>> collator = DataCollatorForTokenPreference(pad_token_id=0, token_columns=[TokenColumn("w", "cw", "rw")])
    >>> batch = collator([{"prompt_ids": [1, 2], "chosen_ids": [3, 4], "rejected_ids": [5], "cw": [0.5, 2.0], "rw": [3.0]}])
    >>> batch["w"]
    tensor([[0.0000, 0.0000, 0.5000, 2.0000],
            [0.0000, 0.0000, 3.0000, 0.0000]])
    ```
    """

    token_columns: Sequence[TokenColumn] = field(default_factory=tuple)

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        for column in self.token_columns:
            rows = []
            for side, name in (("chosen", column.chosen), ("rejected", column.rejected)):
                for index, example in enumerate(examples):
                    values = example.get(name)
                    if values is None:
                        raise TokenColumnError(
                            f"A batch example has no `{name}` column (example {index} of the batch). {ESTIMATOR_HINT}"
                        )
                    values = torch.as_tensor(values, dtype=torch.float32)
                    ids = example[f"{side}_ids"]
                    if values.numel() != len(ids):
                        raise TokenColumnError(
                            f"Column `{name}` has {values.numel()} values but the tokenized completion has {len(ids)} "
                            f"tokens (example {index} of the batch). The values were probably computed with another "
                            "tokenizer or chat template."
                        )
                    if not torch.isfinite(values).all():
                        raise TokenColumnError(f"Column `{name}` holds NaN or inf values (example {index} of the batch).")
                    if not column.allow_negative and (values < 0).any():
                        raise TokenColumnError(
                            f"Column `{name}` holds negative weights (example {index} of the batch); importance "
                            "weights must be >= 0."
                        )
                    if column.transform is not None:
                        values = column.transform(values, side)
                    rows.append(torch.cat([values.new_zeros(len(example["prompt_ids"])), values]))
            if self.max_length is not None:
                rows = [row[: self.max_length] if self.truncation_mode == "keep_start" else row[-self.max_length :] for row in rows]
            output[column.key] = pad(
                rows, padding_value=0.0, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of
            )
        return output


def validate_token_columns(
    dataset: Dataset | IterableDataset,
    dataset_name: str,
    chosen_column: str,
    rejected_column: str,
    allow_negative: bool,
    hint: str = ESTIMATOR_HINT,
    source_rows: Sequence[int] | None = None,
) -> None:
    """Check every row's per-token columns against TRL's tokenized completions, before any training step.

    Raises a [`TokenColumnError`] naming the dataset, the row and the column when a column is missing, when a row's
    list length differs from `len(chosen_ids)` / `len(rejected_ids)`, when a value is NaN or infinite, or (with
    `allow_negative=False`, i.e. for ready weights) when a value is negative. An `IterableDataset` cannot be checked
    up front; the collator checks each batch instead.

    Args:
        dataset: the dataset after TRL's tokenization (it has `chosen_ids` and `rejected_ids`).
        dataset_name (`str`): name used in messages (`"train"`, `"eval"`, ...).
        chosen_column, rejected_column (`str`): the per-token columns.
        allow_negative (`bool`): whether negative values are valid (rewards: yes; weights: no).
        hint (`str`): what to tell the user when the columns are missing.
        source_rows (`Sequence[int]`, *optional*): the row of the dataset as given of each row of `dataset`, when
            rows were dropped by the tokenization; messages name those rows.
    """
    if isinstance(dataset, IterableDataset):
        return
    missing = [c for c in (chosen_column, rejected_column) if c not in dataset.column_names]
    if missing:
        raise TokenColumnError(
            f"The {dataset_name} dataset has no column {', '.join(f'`{c}`' for c in missing)} (its columns: "
            f"{dataset.column_names}). {hint}"
        )
    columns = ["chosen_ids", "rejected_ids", chosen_column, rejected_column]
    row = 0
    for batch in dataset.select_columns(columns).iter(batch_size=1024):
        for i in range(len(batch["chosen_ids"])):
            for side, name in (("chosen", chosen_column), ("rejected", rejected_column)):
                source_row = source_rows[row + i] if source_rows is not None else row + i
                _check_row(batch[name][i], batch[f"{side}_ids"][i], dataset_name, source_row, name, side, allow_negative)
        row += len(batch["chosen_ids"])


def _check_row(values, ids, dataset_name, row, name, side, allow_negative):
    where = f"{dataset_name} dataset, row {row}, column `{name}`"
    if values is None:
        raise TokenColumnError(f"{where}: the value is missing (None). {ESTIMATOR_HINT}")
    if not isinstance(values, (list, tuple)):
        raise TokenColumnError(f"{where}: expected a list of floats, one per completion token; got {type(values).__name__}.")
    if len(values) != len(ids):
        raise TokenColumnError(
            f"{where}: {len(values)} values, but the tokenized {side} completion has {len(ids)} tokens "
            f"(`{side}_ids`, EOS / end-of-turn included). The values were probably computed with another tokenizer or "
            "chat template, or without the EOS token TRL appends. Recompute them from the same processing class, "
            "e.g. with `ContrastiveWeightEstimator.estimate`."
        )
    for position, value in enumerate(values):
        if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TokenColumnError(f"{where}, token {position}: expected a float, got {value!r}.")
        if not math.isfinite(value):
            raise TokenColumnError(f"{where}, token {position}: value {value} is not finite. Fix or drop this row.")
        if abs(value) > FLOAT32_MAX:
            raise TokenColumnError(
                f"{where}, token {position}: value {value} does not fit in float32 (the trainer's dtype for per-token "
                "values; it would become infinite). Fix or drop this row."
            )
        if not allow_negative and value < 0:
            raise TokenColumnError(
                f"{where}, token {position}: weight {value} is negative; importance weights must be >= 0. If these are "
                "token rewards, put them in `chosen_token_rewards` / `rejected_token_rewards` instead."
            )


class _TokenizerHolder:
    """The one attribute `DPOTrainer._prepare_dataset` reads from `self`."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer


def tokenize_preference_dataset(
    dataset: Dataset | IterableDataset,
    processing_class,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    num_proc: int | None = None,
    dataset_name: str = "train",
) -> Dataset | IterableDataset:
    """Tokenize a preference dataset exactly as `trl.DPOTrainer` does (prompt extraction, EOS for standard data, chat
    template for conversational data), adding `prompt_ids`, `chosen_ids` and `rejected_ids`.

    This calls TRL's own (private) `DPOTrainer._prepare_dataset`, so the ids are the trainer's ids by construction;
    `tests/test_trl_contract.py` checks that the method still behaves as expected. With `max_length=None` (the default)
    no row is dropped; with a `max_length` and `truncation_mode="keep_start"` TRL drops the rows whose prompt alone
    fills `max_length`, as the trainer would.

    Args:
        dataset: any TRL preference dataset (standard or conversational, explicit or implicit prompt).
        processing_class: the tokenizer (its `pad_token` is set to `eos_token` if missing, as TRL does).
        max_length, truncation_mode, num_proc: as `DPOConfig.max_length`, `.truncation_mode`, `.dataset_num_proc`.
        dataset_name (`str`): used in progress bars.
    """
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    args = SimpleNamespace(max_length=max_length, truncation_mode=truncation_mode, dataset_num_proc=num_proc)
    return DPOTrainer._prepare_dataset(_TokenizerHolder(tokenizer), dataset, processing_class, args, dataset_name)
