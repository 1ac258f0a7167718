"""The per-token data path: columns that travel next to TRL's `[chosen; rejected]` batch.

A per-token column holds, for every row, one float per token of TRL's tokenized completion (`chosen_ids` /
`rejected_ids`, so the EOS TRL appends to standard data, or the end-of-turn suffix of a chat template, is included).
The collator lays such columns out exactly like `completion_mask`: zeros on the prompt, the values on the completion,
the same `max_length` truncation slice, zeros on the padding.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from datasets import Dataset, IterableDataset
from trl.data_utils import common_prefix_length, extract_prompt, is_conversational
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import global_then_local_main_first, pad

from .errors import InputError


ESTIMATOR_HINT = (
    "`ContrastiveWeightEstimator.estimate(dataset)` produces `chosen_token_rewards` / `rejected_token_rewards` aligned "
    "with the trainer's tokenization."
)


FLOAT32_MAX = float(torch.finfo(torch.float32).max)

# The per-token columns of the package: rewards written by the estimator (the trainer turns them into weights), and
# the base model's per-token log-probabilities it can write next to them.
REWARD_COLUMNS = ("chosen_token_rewards", "rejected_token_rewards")
REF_LOGPS_COLUMNS = ("chosen_ref_logps", "rejected_ref_logps")
# Columns the preference tokenization reads besides prompt / chosen / rejected.
EXTRA_INPUT_COLUMNS = ("tools", "chat_template_kwargs")


class TokenColumnError(InputError):
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


# Batch key of the `BatchLayout` the collator adds
LAYOUT_KEY = "batch_layout"


@dataclass
class BatchLayout:
    """What the host knows about a collated `[chosen; rejected]` batch, computed once by the collator from its CPU
    tensors, so that the training step never has to read it back from the device.

    On CUDA, every read of tensor values by the host (`.item()`, `nonzero`, a boolean-mask index, ...) waits until the
    GPU has run everything queued before it, and the GPU then idles while the host launches what comes next. The scored
    positions and the padding of a batch are known on the host when the batch is built: they travel with it in this
    object, next to the tensors.

    Attributes:
        index (`torch.Tensor`): `[N]` int64, the scored positions, i.e. the flat indices `row * columns + t` of the
            shifted `(rows, columns)` layout where `completion_mask[:, 1:]` is 1 (position `t` predicts token `t + 1`),
            in row-major order. On the CPU as built; `.to(device)` returns a layout whose `index` lives on `device`.
        rows (`int`): `2B`, the rows of the batch.
        columns (`int`): `T - 1`, the shifted sequence length.
        num_chosen (`int`): how many of the `N` positions lie in the chosen half (the first `B` rows); they come
            first in `index`.
        padded (`bool`): whether any row has padding (`attention_mask` has a 0).
    """

    index: torch.Tensor
    rows: int
    columns: int
    num_chosen: int
    padded: bool

    @classmethod
    def from_batch(cls, batch: dict[str, torch.Tensor]) -> BatchLayout:
        """The layout of a collated batch (`completion_mask` and `attention_mask`, `(2B, T)`). On CPU tensors (the
        collator) this reads nothing from a device; on device tensors it reads the masks back once."""
        scored = batch["completion_mask"][:, 1:] != 0
        rows, columns = scored.shape
        index = scored.reshape(-1).nonzero().squeeze(1)
        num_chosen = int(scored[: rows // 2].sum())
        padded = not bool(batch["attention_mask"].all())
        return cls(index=index, rows=rows, columns=columns, num_chosen=num_chosen, padded=padded)

    @property
    def num_positions(self) -> int:
        return self.index.shape[0]

    def to(self, device, non_blocking: bool = False) -> BatchLayout:
        """The same layout with `index` on `device`. Called by accelerate when it moves the batch; the copy is always
        non-blocking (the index comes from host memory, pinned by the DataLoader when `dataloader_pin_memory`), so it
        never makes the host wait."""
        if self.index.device == torch.device(device):
            return self
        return dataclasses.replace(self, index=self.index.to(device, non_blocking=True))

    def pin_memory(self) -> BatchLayout:
        """Called by the DataLoader's pin-memory thread (`dataloader_pin_memory=True` on CUDA)."""
        return dataclasses.replace(self, index=self.index.pin_memory())

    def matches(self, input_ids: torch.Tensor) -> bool:
        """Whether this layout describes a batch of `input_ids`' shape (checked on shapes only, on the host)."""
        return (self.rows, self.columns + 1) == tuple(input_ids.shape)


@dataclass
class DataCollatorForTokenPreference(DataCollatorForPreference):
    """[`~trl.trainer.dpo_trainer.DataCollatorForPreference`] that also lays out per-token columns.

    Each [`TokenColumn`] becomes a float32 `(2B, T)` tensor under its `key`, aligned position by position with
    `input_ids` and `completion_mask`: zeros on the prompt and the padding, the column's values on the completion,
    truncated with the same `max_length` / `truncation_mode` slice as the ids.

    With `batch_layout=True` (the default) the batch also carries a [`BatchLayout`] under `"batch_layout"`: the scored
    positions and the padding, computed here on the host, so that the trainers' steps never read them back from the
    device. The model never sees it (the trainers strip it from the model's inputs).

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
    batch_layout: bool = True

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        if self.batch_layout:
            output[LAYOUT_KEY] = BatchLayout.from_batch(output)
        for column in self.token_columns:
            rows = []
            for side, name in (("chosen", column.chosen), ("rejected", column.rejected)):
                for index, example in enumerate(examples):
                    where = f"Column `{name}` (example {index} of the batch)"
                    values = check_token_values(example.get(name), len(example[f"{side}_ids"]), where, side,
                                                column.allow_negative)  # fmt: skip
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
                where = f"{dataset_name} dataset, row {source_row} (0-based), column `{name}`"
                check_token_values(batch[name][i], len(batch[f"{side}_ids"][i]), where, side, allow_negative)
        row += len(batch["chosen_ids"])


def check_token_values(values, num_tokens: int, where: str, side: str, allow_negative: bool) -> torch.Tensor:
    """`values` (one number per token of a tokenized completion of `num_tokens` tokens) as a float32 tensor, after
    checking them: a [`TokenColumnError`] starting with `where` names the problem and the token."""
    if values is None:
        raise TokenColumnError(f"{where}: the value is missing (None). {ESTIMATOR_HINT}")
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, (list, tuple, np.ndarray)):
        raise TokenColumnError(f"{where}: expected a list of floats, one per completion token; got {type(values).__name__}.")
    if len(values) != num_tokens:
        raise TokenColumnError(
            f"{where}: {len(values)} values, but the tokenized {side} completion has {num_tokens} tokens "
            f"(`{side}_ids`, EOS / end-of-turn included). The values were probably computed with another tokenizer or "
            "chat template, or without the EOS token TRL appends. Recompute them from the same processing class, "
            "e.g. with `ContrastiveWeightEstimator.estimate`."
        )
    try:
        array = np.asarray(values)
    except ValueError:  # ragged nesting
        array = np.asarray([], dtype=object)
    numeric = array.ndim == 1 and array.dtype.kind in "fi" and not any(isinstance(v, (bool, np.bool_)) for v in values)
    if numeric:
        array = array.astype(np.float64)
        if np.isfinite(array).all() and (np.abs(array) <= FLOAT32_MAX).all() and (allow_negative or (array >= 0).all()):
            return torch.from_numpy(array).to(torch.float32)
    for position, value in enumerate(values):  # find the first bad value for the message
        if value is None or not isinstance(value, (int, float, np.floating, np.integer)) or isinstance(value, bool):
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
    raise TokenColumnError(f"{where}: expected a flat list of floats.")  # pragma: no cover - caught above


TEXT_COLUMNS = ("prompt", "chosen", "rejected")
PREFERENCE_FORMAT = (
    "Each row needs `chosen` and `rejected` (and `prompt`, or the prompt is their common beginning), all strings "
    '(standard) or all lists of messages like {"role": "user", "content": "..."} (conversational)'
)


def _rows(numbers: list[int], total: int) -> str:
    """How many rows have a problem and the first ten of them, e.g. "(3 of 10 rows: 4, 5, 9)"."""
    shown = ", ".join(map(str, numbers[:10])) + (", ..." if len(numbers) > 10 else "")
    return f"({len(numbers)} of {total} rows: {shown})"


def _text_kind(value) -> str | None:
    """"text" or "messages" for a valid prompt / completion value, `None` for anything else."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
        return "messages"
    return None


def _is_blank(value) -> bool:
    """A completion with nothing in it: an empty or whitespace-only string, no message, or only blank contents."""
    if isinstance(value, str):
        return not value.strip()
    return all(isinstance(m.get("content"), str) and not m["content"].strip() for m in value)


def check_preference_rows(dataset: Dataset | IterableDataset, source: str, noun: str = "column") -> None:
    """Refuse, before any tokenization or model, what a preference dataset cannot hold, with one message that names
    `source` (a file name, or "train dataset"), the first bad row (0-based), the column and the fix:

    - a missing `chosen` / `rejected` column, or a row where it (or an existing `prompt`) is missing / null;
    - a value that is neither a string nor a list of messages (dicts with a "role"), or a row that mixes the two;
    - an empty (or whitespace-only) completion, or a conversational completion whose messages are all blank: it would
      train on the end-of-sequence token alone, a signal nobody meant to give. (An empty prompt is valid.)

    The message counts the rows with the same problem and lists the first ten. `noun` is what a column is called in
    `source` ("field" for a JSON file). An `IterableDataset` is not checked here (TRL checks each row as it streams).
    """
    if not isinstance(dataset, Dataset):
        return
    missing = [c for c in ("chosen", "rejected") if c not in dataset.column_names]
    if missing:
        names = " or ".join(f"`{c}`" for c in missing)
        absent = f"no row has a {names} field" if noun == "field" else f"no {names} {noun}"
        raise InputError(
            f"{source}: {absent} (its {noun}s: {', '.join(dataset.column_names) or 'none'}). {PREFERENCE_FORMAT}: "
            f"add the {noun}, or rename the one that holds it."
        )
    columns = [c for c in TEXT_COLUMNS if c in dataset.column_names]
    problems: dict[tuple[str, str], list[int]] = {}  # (kind, column) -> rows, in the order found
    examples: dict[tuple[str, str], object] = {}
    row = 0
    for batch in dataset.select_columns(columns).iter(batch_size=4096):
        for i in range(len(batch[columns[0]])):
            kinds = {}
            for column in columns:
                value = batch[column][i]
                if value is None:
                    problem = "missing"
                elif _text_kind(value) is None:
                    problem = "type"
                elif column != "prompt" and _is_blank(value):
                    problem = "empty"
                else:
                    kinds[column] = _text_kind(value)
                    continue
                problems.setdefault((problem, column), []).append(row + i)
                examples.setdefault((problem, column), value)
            if len(set(kinds.values())) > 1:
                problems.setdefault(("mixed", "+".join(kinds)), []).append(row + i)
                examples.setdefault(("mixed", "+".join(kinds)), kinds)
        row += len(batch[columns[0]])
    if not problems:
        return
    # the first problem of the first bad row; missing values first: they also explain an odd type in other tools
    (problem, column), rows = min(problems.items(), key=lambda item: (item[1][0], item[0][0] != "missing"))
    where = f"{source}, row {rows[0]} (0-based), {noun} `{column}`"
    count = _rows(rows, len(dataset))
    if problem == "missing":
        raise InputError(
            f"{where}: missing or null {count}. {PREFERENCE_FORMAT}: fill it in, or drop these rows."
        )
    if problem == "type":
        value = examples[(problem, column)]
        raise InputError(
            f"{where}: expected a string or a list of messages (dicts with a \"role\" and a \"content\"), got "
            f"{type(value).__name__} ({value!r:.60}) {count}. Convert the {noun} to text, or fix these rows."
        )
    if problem == "mixed":
        kinds = examples[(problem, column)]
        texts = ", ".join(f"`{c}`" for c, k in kinds.items() if k == "text")
        messages = ", ".join(f"`{c}`" for c, k in kinds.items() if k == "messages")
        raise InputError(
            f"{source}, row {rows[0]} (0-based): mixes text ({texts}) and lists of messages ({messages}) {count}. Use "
            "one format per row: all strings (standard) or all lists of messages (conversational)."
        )
    raise InputError(
        f"{where}: the completion is empty {count}. An empty completion gives the pair no signal on that side (only "
        "the end-of-sequence token would be scored): write the completion, or drop these rows."
    )


def tokenize_preference_dataset(
    dataset: Dataset | IterableDataset,
    processing_class,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    num_proc: int | None = None,
    dataset_name: str = "train",
) -> Dataset | IterableDataset:
    """Tokenize a preference dataset as `trl.DPOTrainer` does, adding `prompt_ids`, `chosen_ids` and `rejected_ids`:
    implicit prompts are extracted, standard data gets the EOS text appended to both completions, conversational data
    goes through the chat template (with the row's `tools` and `chat_template_kwargs`), and a completion starts where
    the tokenized prompt and prompt + completion diverge. With a `max_length` and `truncation_mode="keep_start"` the
    rows whose prompt alone fills `max_length` are dropped, as the trainer drops them; otherwise no row is dropped.

    Written with TRL's public data utilities; `tests/test_trl_contract.py` checks that the ids equal those of a
    `DPOTrainer` on standard, conversational and implicit-prompt data.

    Args:
        dataset: any TRL preference dataset (standard or conversational, explicit or implicit prompt).
        processing_class: the tokenizer (its `pad_token` is set to `eos_token` if missing, as TRL does).
        max_length, truncation_mode, num_proc: as `DPOConfig.max_length`, `.truncation_mode`, `.dataset_num_proc`.
        dataset_name (`str`): used in progress bars.
    """
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    map_kwargs = {"num_proc": num_proc, "desc": f"Tokenizing the {dataset_name} dataset"} if isinstance(dataset, Dataset) else {}
    with global_then_local_main_first():
        dataset = dataset.map(tokenize_preference_example, fn_kwargs={"processing_class": processing_class}, **map_kwargs)
        if max_length is not None and truncation_mode == "keep_start":
            map_kwargs.pop("desc", None)
            dataset = dataset.filter(lambda example: len(example["prompt_ids"]) < max_length, **map_kwargs)
    return dataset


def tokenize_preference_example(example: dict, processing_class) -> dict:
    """One row of [`tokenize_preference_dataset`]: `prompt` / `chosen` / `rejected` as the trainer sees them (prompt
    extracted, EOS text appended to standard completions) and their `prompt_ids` / `chosen_ids` / `rejected_ids`."""
    if "prompt" not in example:
        example = {**example, **extract_prompt(example)}
    if not is_conversational(example):
        eos = getattr(processing_class, "tokenizer", processing_class).eos_token
        example = dict(example)
        for side in ("chosen", "rejected"):
            if not example[side].endswith(eos):
                example[side] += eos
    return {key: example[key] for key in ("prompt", "chosen", "rejected")} | _tokenize_pair(example, processing_class)


def _token_ids(processing_class, value, **chat_template_kwargs) -> list[int]:
    if isinstance(value, list):  # conversational
        result = processing_class.apply_chat_template(value, tokenize=True, return_dict=True, **chat_template_kwargs)
    else:
        result = processing_class(text=value)
    ids = result["input_ids"]
    return ids[0] if ids and isinstance(ids[0], list) else ids  # processors keep a batch dimension


def _tokenize_pair(example: dict, processing_class) -> dict:
    tools = example.get("tools")
    kwargs = {}
    if is_conversational(example):
        tools = json.loads(tools) if isinstance(tools, str) else tools
        kwargs = {"tools": tools, **(example.get("chat_template_kwargs") or {})}
        prompt_ids = _token_ids(processing_class, example["prompt"], add_generation_prompt=True, **kwargs)
    else:
        prompt_ids = _token_ids(processing_class, example["prompt"])
    full = {side: _token_ids(processing_class, example["prompt"] + example[side], **kwargs) for side in ("chosen", "rejected")}
    prompt_length = min(common_prefix_length(prompt_ids, ids) for ids in full.values())
    return {
        "prompt_ids": prompt_ids[:prompt_length],
        "chosen_ids": full["chosen"][prompt_length:],
        "rejected_ids": full["rejected"][prompt_length:],
    }
