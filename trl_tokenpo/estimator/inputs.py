"""What the estimator scores: the dataset checked, tokenized as the trainer tokenizes it, and the context of every
pass (the trainer's prompt ids, or the prompt after a system prompt for the "prompt" method)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from datasets import Dataset, DatasetDict, IterableDataset
from trl.data_utils import is_conversational

from ..data import EXTRA_INPUT_COLUMNS, check_preference_rows, tokenize_preference_example
from ..errors import InputError


logger = logging.getLogger(__name__)

__all__ = ["ScoringInputs", "scoring_inputs", "validate_dataset"]

SIDES = ("chosen", "rejected")


def validate_dataset(dataset, source: str = "dataset") -> None:
    """Refuse, with the fix, anything that is not a non-empty `datasets.Dataset` of valid preference rows (the
    trainer's checks, `check_preference_rows`: a missing or empty completion is named with its row, before any
    model runs). `source` names the dataset in messages."""
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
    if len(dataset) == 0:
        raise InputError("The dataset is empty: there is nothing to estimate.")
    check_preference_rows(dataset, source)


@dataclass
class ScoringInputs:
    """Token ids of every row: `completions[side][row]` (the trainer's `chosen_ids` / `rejected_ids`) and
    `contexts[name][row]` for each context a pass uses (`"prompt_ids"`, and `"positive_ids"` / `"negative_ids"` for
    the prompt method)."""

    completions: dict[str, list[list[int]]]
    contexts: dict[str, list[list[int]]]


def add_system_prompt(example: dict, system_prompt: str, mode: str) -> dict:
    """The example's prompt after `system_prompt`: a text prefix for standard data; for conversational data a system
    message (merged into an existing one) with `mode="system"`, a prefix of the first user message with `"user"`."""
    prompt = example["prompt"]
    if not is_conversational(example):
        return {"prompt": f"{system_prompt}\n\n{prompt}"}
    messages = [dict(m) for m in prompt]
    if mode == "system":
        if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
            messages[0]["content"] = f"{system_prompt}\n\n{messages[0]['content']}"
        else:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return {"prompt": messages}
    for message in messages:
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            message["content"] = f"{system_prompt}\n\n{message['content']}"
            return {"prompt": messages}
    raise ValueError("The conversational prompt has no text user message to put the system prompt in.")


def system_context_ids(rows: list[dict], system_prompt: str, processing_class) -> list[list[int]]:
    """Context ids of every (trainer-normalized) row's prompt after `system_prompt`, cut where TRL cuts the prompt
    (where prompt and prompt + completion tokenizations diverge). A chat template that refuses system messages gets
    the prompt in the first user message instead (with a warning)."""
    for mode in ("system", "user"):
        try:
            return [
                tokenize_preference_example({**row, **add_system_prompt(row, system_prompt, mode)}, processing_class)[
                    "prompt_ids"
                ]
                for row in rows
            ]
        except Exception as exc:  # a chat template that refuses the system role
            if mode == "user" or not is_conversational(rows[0]):
                raise
            logger.warning(
                f"The chat template refused a system message ({type(exc).__name__}: {exc}); the system prompt is put "
                "at the start of the first user message instead."
            )
    raise AssertionError("unreachable")


def scoring_inputs(dataset: Dataset, args, processing_class) -> ScoringInputs:
    """The ids every pass needs: the trainer's tokenization of every row (`tokenize_preference_example`, row by row:
    no `datasets` map, whose per-call cost dominated small datasets) and the system-prompted contexts."""
    keep = [c for c in ("prompt", "chosen", "rejected", *EXTRA_INPUT_COLUMNS) if c in dataset.column_names]
    rows = [{**row, **tokenize_preference_example(row, processing_class)} for row in dataset.select_columns(keep).to_list()]
    contexts = {"prompt_ids": [row["prompt_ids"] for row in rows]}
    if args.method == "prompt":
        for name, prompt in (("positive_ids", args.positive_system_prompt), ("negative_ids", args.negative_system_prompt)):
            contexts[name] = system_context_ids(rows, prompt, processing_class)
    return ScoringInputs({side: [row[f"{side}_ids"] for row in rows] for side in SIDES}, contexts)
