"""Bad input, fuzzed (hypothesis, derandomized): every dataset either trains one step with a finite loss, or is refused
at construction (before any step) with a `ValueError` that names the row and the column. Nothing may fail in the
middle of training, and no row may disappear without a logged count.

Each example builds a fresh tiny policy / reference pair, constructs the trainer (TRL's tokenization, then our
checks) and, when construction succeeds, runs one optimizer step. The `@example`s are the regression cases of the
bugs this file found (see docs/robustness.md).
"""

import logging
import math
import re

import pytest
import torch
from conftest import WORDS, build_model, build_tokenizer, cpu_args
from datasets import Dataset
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from trl_tokenpo import TDPOConfig, TDPOTrainer, TISDPOConfig, TISDPOTrainer
from trl_tokenpo.data import tokenize_preference_dataset


# No shrinking: an example costs a trainer construction and a step, and a derandomized failure reproduces as printed
SETTINGS = dict(
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
TOKENIZER = build_tokenizer()

# Texts: vocabulary words, empty and whitespace-only strings, unicode (unknown to the word-level tokenizer: <unk>),
# and long rows
words = st.lists(st.sampled_from(WORDS + ["?", "."]), min_size=1, max_size=6).map(" ".join)
unicode_text = st.text(alphabet=st.characters(min_codepoint=0x00C0, max_codepoint=0x2FFF), min_size=1, max_size=8)
texts = st.one_of(
    words,
    st.sampled_from(["", " ", "   ", "\n", "\t \n"]),
    unicode_text,
    st.tuples(words, unicode_text).map(" ".join),
    words.map(lambda w: " ".join([w] * 12)),  # long
)
completions = texts.map(lambda t: " " + t if t and not t[0].isspace() else t)
truncation = st.tuples(st.sampled_from([None, 3, 6, 12]), st.sampled_from(["keep_start", "keep_end"]))
METHODS = ["tdpo", "tisdpo_none", "tisdpo_tdpo"]


def row(prompt="what is the sky ?", chosen=" the sky is blue .", rejected=" fire ."):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def with_weights(rows, kind="weights"):
    """Valid, non-uniform per-token columns aligned with TRL's (untruncated) tokenization."""
    ids = tokenize_preference_dataset(Dataset.from_list(rows), TOKENIZER)
    out = []
    for i, r in enumerate(rows):
        values = {
            f"{side}_{kind}": [0.25 + ((3 * i + 5 * t) % 7) / 4 for t in range(len(ids[i][f"{side}_ids"]))]
            for side in ("chosen", "rejected")
        }
        out.append({**r, **values})
    return out


def attempt(method, rows, tmp_path, **options):
    """Construct the trainer and, if that succeeds, run one step. Returns the construction error, or None after
    checking the step's loss. Any other failure propagates and fails the test."""
    dataset = Dataset.from_list(rows)
    policy, ref = build_model(TOKENIZER, seed=0), build_model(TOKENIZER, seed=0)
    common = dict(max_steps=1, per_device_train_batch_size=2, **options)
    try:
        if method == "tdpo":
            trainer = TDPOTrainer(
                model=policy, ref_model=ref, args=cpu_args(TDPOConfig, tmp_path, **common), train_dataset=dataset,
                processing_class=TOKENIZER,
            )  # fmt: skip
        else:
            args = cpu_args(TISDPOConfig, tmp_path, tis_kl_term=method.split("_")[1], **common)
            trainer = TISDPOTrainer(
                model=policy, ref_model=ref, args=args, train_dataset=dataset, processing_class=TOKENIZER
            )
    except ValueError as error:  # TokenColumnError is a ValueError
        return error
    trainer.train()  # must not fail: everything wrong with the data was refused above
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 1 and math.isfinite(logs[0]["loss"]), logs
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    return None


def assert_names(error, row, column):
    message = str(error)
    assert re.search(rf"\brow {row}\b", message), message
    assert f"`{column}`" in message, message


def dropped_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "were dropped because their prompt" in r.getMessage()]


# ----------------------------------------------------------------------------------------------------------------------
# Texts: empty, whitespace, unicode, long rows, identical chosen / rejected, under truncation
# ----------------------------------------------------------------------------------------------------------------------


@settings(max_examples=8, **SETTINGS)
@given(
    method=st.sampled_from(METHODS),
    rows=st.lists(st.builds(row, texts, completions, completions), min_size=2, max_size=4),
    identical=st.booleans(),
    limits=truncation,
)
@example(method="tdpo", rows=[row(" ".join(["what"] * 8))] * 2, identical=False, limits=(6, "keep_start"))  # all dropped
@example(method="tisdpo_none", rows=[row(chosen=""), row(chosen="  ", rejected="")], identical=True, limits=(None, "keep_start"))  # refused
def test_texts_train_or_are_refused_before_the_first_step(tmp_path, caplog, method, rows, identical, limits):
    caplog.clear()
    if identical:
        rows = [dict(r, rejected=r["chosen"]) for r in rows]
    if method != "tdpo":
        rows = with_weights(rows)
    max_length, mode = limits
    prompt_lengths = [len(x) for x in tokenize_preference_dataset(Dataset.from_list(rows), TOKENIZER)["prompt_ids"]]
    dropped = sum(n >= max_length for n in prompt_lengths) if max_length and mode == "keep_start" else 0

    with caplog.at_level(logging.WARNING):
        error = attempt(method, rows, tmp_path, max_length=max_length, truncation_mode=mode)
    blank = [(i, side) for i, r in enumerate(rows) for side in ("chosen", "rejected") if not r[side].strip()]
    if blank:  # refused before TRL's tokenization, with the first such row
        assert error is not None and "the completion is empty" in str(error), error
        assert_names(error, blank[0][0], blank[0][1])
        return
    if dropped == len(rows):
        assert error is not None and f"All {len(rows)} rows of the train dataset were dropped" in str(error)
        return
    assert error is None, error
    warnings = dropped_warnings(caplog)
    if dropped:  # TRL drops them; the count is logged, with the rows
        assert len(warnings) == 1 and f"{dropped} of {len(rows)} rows of the train dataset" in warnings[0], warnings
    else:
        assert warnings == []


# ----------------------------------------------------------------------------------------------------------------------
# Columns: missing or extra
# ----------------------------------------------------------------------------------------------------------------------

extra_values = st.sampled_from([3, None, "x", [1.0, 2.0], {"a": 1}])


@settings(max_examples=8, **SETTINGS)
@given(
    method=st.sampled_from(METHODS),
    drop=st.sets(st.sampled_from(["prompt", "chosen", "rejected"]), max_size=2),
    extra=st.dictionaries(st.sampled_from(["foo", "score", "chosen_ids_x", "id"]), extra_values, max_size=2),
)
@example(method="tdpo", drop={"chosen"}, extra={})  # a KeyError from TRL before the fix
def test_missing_or_extra_columns(tmp_path, method, drop, extra):
    rows = [row(), row("why is the cat rude ?", " the cat is not rude .", " i")]
    if "prompt" in drop:  # implicit prompt: the shared prefix
        rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
    if method != "tdpo":
        rows = with_weights(rows)
    rows = [{k: v for k, v in r.items() if k not in drop} for r in rows]
    rows = [{**r, **extra} for r in rows]
    error = attempt(method, rows, tmp_path)
    missing = sorted({"chosen", "rejected"} & drop)
    if not missing:
        assert error is None, error
        return
    assert error is not None
    for column in missing:
        assert f"`{column}`" in str(error), error
    assert "train dataset" in str(error)


# ----------------------------------------------------------------------------------------------------------------------
# Wrong types in the text columns
# ----------------------------------------------------------------------------------------------------------------------


@settings(max_examples=8, **SETTINGS)
@given(
    method=st.sampled_from(METHODS),
    column=st.sampled_from(["prompt", "chosen", "rejected"]),
    bad=st.sampled_from(["none", "int", "float", "list_of_str"]),
    bad_row=st.integers(0, 2),
)
@example(method="tdpo", column="chosen", bad="none", bad_row=1)  # an AttributeError on None from TRL before the fix
def test_wrong_text_types_name_row_and_column(tmp_path, method, column, bad, bad_row):
    rows = [row(), row("how are you ?", " very good thanks .", " no ."), row("who runs quickly ?", " the cat runs .")]
    if method != "tdpo":
        rows = with_weights(rows)
    if bad == "none":  # one cell (Arrow allows nulls in a string column)
        rows[bad_row][column] = None
    else:  # the whole column (Arrow cannot mix types): row 0 is the first bad one
        value = {"int": 7, "float": 1.5, "list_of_str": ["the", "sky"]}[bad]
        for r in rows:
            r[column] = value
        bad_row = 0
    error = attempt(method, rows, tmp_path)
    assert error is not None
    assert_names(error, bad_row, column)


# ----------------------------------------------------------------------------------------------------------------------
# Per-token columns: NaN / inf / negative / wrong lengths / wrong types
# ----------------------------------------------------------------------------------------------------------------------

CORRUPTIONS = ["nan", "inf", "-inf", "negative", "longer", "shorter", "empty", "none", "none_value", "nested",
               "float32_overflow", "ints", "strings", "large_finite", "zeros"]  # fmt: skip
VALID = {"ints", "large_finite", "zeros"}  # accepted as they are


def corrupt(values, corruption):
    n = len(values)
    return {
        "nan": values[:-1] + [float("nan")],
        "inf": [float("inf")] + values[1:],
        "-inf": values[:-1] + [float("-inf")],
        "negative": [-0.5] + values[1:],
        "longer": values + [1.0],
        "shorter": values[:-1],
        "empty": [],
        "none": None,
        "none_value": [None] + values[1:],
        "nested": [[v] for v in values],
        "float32_overflow": [1e39] + values[1:],
        "large_finite": [1e30] * n,
        "zeros": [0.0] * n,
    }[corruption]


@settings(max_examples=16, **SETTINGS)
@given(
    kind=st.sampled_from(["weights", "token_rewards"]),
    kl_term=st.sampled_from(["none", "tdpo"]),
    side=st.sampled_from(["chosen", "rejected"]),
    bad_row=st.integers(0, 3),
    corruption=st.sampled_from(CORRUPTIONS),
    # long enough for every prompt here: no row is dropped (dropped rows: the last tests)
    limits=st.tuples(st.sampled_from([None, 12]), st.sampled_from(["keep_start", "keep_end"])),
)
@example(kind="weights", kl_term="none", side="chosen", bad_row=1, corruption="float32_overflow", limits=(None, "keep_start"))
@example(kind="token_rewards", kl_term="tdpo", side="rejected", bad_row=3, corruption="float32_overflow", limits=(12, "keep_end"))
def test_per_token_columns_are_checked_before_the_first_step(tmp_path, kind, kl_term, side, bad_row, corruption, limits):
    rows = with_weights(
        [row(), row("how are you ?", " very good thanks ."), row("who runs quickly ?", " the cat runs ."), row()], kind
    )
    column = f"{side}_{kind}"
    if corruption == "ints":  # Arrow types the whole column: all rows get integers
        for r in rows:
            r[column] = [int(v * 4) for v in r[column]]
    elif corruption == "strings":
        for r in rows:
            r[column] = [str(v) for v in r[column]]
        bad_row = 0
    elif corruption == "nested":
        for r in rows:
            r[column] = [[v] for v in r[column]]
        bad_row = 0
    else:
        rows[bad_row][column] = corrupt(rows[bad_row][column], corruption)
    max_length, mode = limits
    error = attempt(f"tisdpo_{kl_term}", rows, tmp_path, max_length=max_length, truncation_mode=mode)
    negative_ok = corruption == "negative" and kind == "token_rewards"  # rewards may be negative, weights not
    if corruption in VALID or negative_ok:
        assert error is None, error
    else:
        assert error is not None, f"{corruption} in {column} was accepted"
        assert_names(error, bad_row, column)


def test_errors_name_the_users_row_after_rows_were_dropped(tmp_path, caplog):
    """Rows 0 and 1 are dropped by TRL (prompt longer than max_length, keep_start): an error in row 3 must still
    say row 3, not row 1 of the filtered dataset; the warning lists the dropped rows."""
    long_prompt = " ".join(["what"] * 10)
    rows = with_weights([row(long_prompt), row(long_prompt), row(), row("how are you ?", " no .")])
    rows[3]["rejected_weights"] = rows[3]["rejected_weights"] + [1.0]
    with caplog.at_level(logging.WARNING):
        error = attempt("tisdpo_none", rows, tmp_path, max_length=8)
    assert_names(error, 3, "rejected_weights")
    assert "row 1," not in str(error)
    warnings = dropped_warnings(caplog)
    assert len(warnings) == 1 and "2 of 4 rows of the train dataset" in warnings[0] and "Dropped rows (0-based): 0, 1." in warnings[0]


@pytest.mark.parametrize("method", METHODS)
def test_some_rows_dropped_trains_and_logs_the_count(tmp_path, caplog, method):
    long_prompt = " ".join(["what"] * 10)
    rows = [row(long_prompt), row(), row("how are you ?", " no ."), row(long_prompt)]
    if method != "tdpo":
        rows = with_weights(rows)
    with caplog.at_level(logging.WARNING):
        assert attempt(method, rows, tmp_path, max_length=8) is None
    warnings = dropped_warnings(caplog)
    assert len(warnings) == 1 and "2 of 4 rows of the train dataset" in warnings[0] and "Dropped rows (0-based): 0, 3." in warnings[0]
