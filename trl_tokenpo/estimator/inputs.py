"""What the estimator scores: the dataset checked, tokenized as the trainer tokenizes it, and the context of every
pass (the trainer's prompt ids, or the prompt after a system prompt for the "prompt" method)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from datasets import Dataset, DatasetDict, IterableDataset
from trl.data_utils import is_conversational

from ..data import EXTRA_INPUT_COLUMNS, tokenize_preference_dataset


logger = logging.getLogger(__name__)

__all__ = ["ScoringInputs", "scoring_inputs", "validate_dataset"]

SIDES = ("chosen", "rejected")


def validate_dataset(dataset) -> None:
    """Refuse, with the fix, anything that is not a non-empty `datasets.Dataset` with `chosen` and `rejected`."""
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
    missing = [c for c in SIDES if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The dataset lacks the column(s) {missing}; it has {dataset.column_names}. The estimator needs a TRL "
            "preference dataset: 'prompt' (optional: implicit prompts are extracted), 'chosen', 'rejected'."
        )
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: there is nothing to estimate.")


@dataclass
class ScoringInputs:
    """Token ids of every row: `completions[side][row]` (the trainer's `chosen_ids` / `rejected_ids`) and
    `contexts[name][row]` for each context a pass uses (`"prompt_ids"`, and `"positive_ids"` / `"negative_ids"` for
    the prompt method)."""

    completions: dict[str, list[list[int]]]
    contexts: dict[str, list[list[int]]]


def _column(dataset: Dataset, name: str) -> list[list[int]]:
    """A column as plain lists, converted once (indexing a Dataset row by row goes through Arrow on every access)."""
    return dataset.select_columns([name]).to_dict()[name]


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


def system_context_ids(tokenized: Dataset, system_prompt: str, processing_class, num_proc) -> list[list[int]]:
    """Context ids of every prompt after `system_prompt`, cut where TRL cuts the prompt (where prompt and prompt +
    completion tokenizations diverge). A chat template that refuses system messages gets the prompt in the first
    user message instead (with a warning)."""
    keep = ["prompt", "chosen", "rejected"] + [c for c in EXTRA_INPUT_COLUMNS if c in tokenized.column_names]
    data = tokenized.select_columns(keep)
    for mode in ("system", "user"):
        prompted = data.map(add_system_prompt, fn_kwargs={"system_prompt": system_prompt, "mode": mode})
        try:
            return _column(tokenize_preference_dataset(prompted, processing_class, num_proc=num_proc), "prompt_ids")
        except Exception as exc:  # a chat template that refuses the system role
            if mode == "user" or not is_conversational(data[0]):
                raise
            logger.warning(
                f"The chat template refused a system message ({type(exc).__name__}: {exc}); the system prompt is put "
                "at the start of the first user message instead."
            )
    raise AssertionError("unreachable")


def scoring_inputs(tokenized: Dataset, args, processing_class) -> ScoringInputs:
    """The ids every pass needs, from the trainer-tokenized dataset (`tokenize_preference_dataset`)."""
    contexts = {"prompt_ids": _column(tokenized, "prompt_ids")}
    if args.method == "prompt":
        for name, prompt in (("positive_ids", args.positive_system_prompt), ("negative_ids", args.negative_system_prompt)):
            contexts[name] = system_context_ids(tokenized, prompt, processing_class, args.dataset_num_proc)
    return ScoringInputs({side: _column(tokenized, f"{side}_ids") for side in SIDES}, contexts)
