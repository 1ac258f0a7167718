"""The commands' options (trl_tokenpo/scripts/*.py, also scripts/train_*.py): what `--help_all` shows, data files as
`--dataset_name`, and the estimator settings of `trl-tokenpo tisdpo`. In-process, no training. (The console command,
the fast `--help` and the error messages: tests/test_command.py.)"""

import contextlib
import dataclasses
import io
import json
import re
from pathlib import Path

import pytest
from conftest import preference_rows
from datasets import Dataset, DatasetDict
from test_scripts import run_main
from trl import ScriptArguments

from trl_tokenpo.errors import InputError
from trl_tokenpo.scripts import tisdpo as tisdpo_command
from trl_tokenpo.scripts.utils import BUILTIN_TRAINING_DEFAULTS, apply_parser_defaults, load_user_datasets


@pytest.fixture(scope="module")
def tisdpo():
    return tisdpo_command


def parse(module, argv, builtin_defaults=None):
    parser = module.make_parser()
    builtin = apply_parser_defaults(parser, argv, builtin_defaults=builtin_defaults)
    return builtin, parser.parse_args_and_config(argv)


def main_help(script) -> str:
    """`python scripts/<script> --help_all` as a user runs it (the script's __main__ block), captured."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_main(script, "--help_all") == 0
    return " ".join(out.getvalue().split())  # argparse wraps lines: compare on single spaces


def option_help(text, flag) -> str:
    """The help of one option: from its flag to the next option's."""
    start = text.index(f"{flag} ")
    following = re.compile(r" --[a-z0-9_]+(?: [A-Z{\[]|,)").search(text, start + len(flag) + 1)
    return text[start : following.start() if following else len(text)]


# ----------------------------------------------------------------------------------------------------------------------
# --help_all (issue 16, item 3)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["train_tisdpo.py", "train_tdpo.py"])
def test_help_shows_the_defaults_of_a_user_run_and_notes_the_builtin_ones(script):
    text = main_help(script)
    learning_rate = option_help(text, "--learning_rate LEARNING_RATE,")
    assert "(default: 1e-06)" in learning_rate and "[built-in task: 0.001]" in learning_rate
    batch = option_help(text, "--per_device_train_batch_size PER_DEVICE_TRAIN_BATCH_SIZE,")
    assert "(default: 8)" in batch and "[built-in task: 16]" in batch
    assert "(default: None)" in option_help(text, "--output_dir OUTPUT_DIR,")
    assert "the built-in task, which changes these defaults: output_dir='outputs/builtin'" in text
    if script == "train_tisdpo.py":
        method = option_help(text, "--weights_method {dpo,sft,prompt,given},")
        assert "(default: dpo)" in method and "[built-in task: 'sft']" in method
        estimator_lr = option_help(text, "--estimator_learning_rate ESTIMATOR_LEARNING_RATE,")
        assert "[built-in task: 0.003]" in estimator_lr and "(default:" not in estimator_lr
        assert "Unset: the trainer's --max_length." in option_help(text, "--estimator_max_length ESTIMATOR_MAX_LENGTH,")
        assert "Unset: 16." in option_help(text, "--estimator_lora_r ESTIMATOR_LORA_R,")


def test_builtin_defaults_apply_only_to_a_run_without_model_and_data(tisdpo, tmp_path):
    builtin, args = parse(tisdpo, [], tisdpo.BUILTIN_SCRIPT_DEFAULTS)
    training_args, est_args = args[1], args[5]
    assert builtin and training_args.learning_rate == BUILTIN_TRAINING_DEFAULTS["learning_rate"]
    assert est_args.weights_method == "sft"
    user = ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", str(tmp_path)]
    builtin, args = parse(tisdpo, user, tisdpo.BUILTIN_SCRIPT_DEFAULTS)
    assert not builtin and args[1].learning_rate == 1e-6 and args[1].per_device_train_batch_size == 8
    assert args[5].weights_method == "dpo"
    # an explicit flag wins on the built-in task too
    assert parse(tisdpo, ["--learning_rate", "5e-4"])[1][1].learning_rate == 5e-4


# ----------------------------------------------------------------------------------------------------------------------
# Estimator settings of train_tisdpo.py (issue 16, item 7)
# ----------------------------------------------------------------------------------------------------------------------

USER = ["--model_name_or_path", "m", "--dataset_name", "d"]


def estimator_config(tisdpo, tmp_path, *argv):
    builtin, args = parse(tisdpo, [*argv, "--output_dir", str(tmp_path / "out")], tisdpo.BUILTIN_SCRIPT_DEFAULTS)
    return tisdpo.estimator_config(args[5], args[1], builtin)


def test_estimator_inherits_the_trainer_settings(tisdpo, tmp_path):
    config = estimator_config(
        tisdpo, tmp_path, *USER, "--max_length", "256", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "4", "--seed", "7", "--gradient_checkpointing", "false",
    )  # fmt: skip
    assert config.method == "dpo"
    assert (config.max_length, config.per_device_train_batch_size, config.gradient_accumulation_steps) == (256, 2, 4)
    assert config.seed == 7 and config.gradient_checkpointing is False and config.bf16 is False
    assert config.output_dir == str(tmp_path / "out" / "estimator") and config.report_to == []
    assert (config.learning_rate, config.lora_r, config.lora_alpha) == (5e-5, 16, 32)  # WeightEstimatorConfig's
    assert estimator_config(tisdpo, tmp_path, *USER).max_length == 1024  # DPOConfig's max_length
    builtin = estimator_config(tisdpo, tmp_path)
    assert (builtin.method, builtin.learning_rate, builtin.num_train_epochs, builtin.max_length) == ("sft", 3e-3, 3, 64)


def test_estimator_flags_and_file(tisdpo, tmp_path):
    """Precedence, lowest first: trainer, the built-in task's settings, the --estimator_config file, the flags."""
    path = tmp_path / "estimator.yaml"
    path.write_text("max_length: 128\nlora_r: 4\nscoring_batch_size: 3\nlearning_rate: 1.0e-4\noptim: adamw_torch\n")
    config = estimator_config(
        tisdpo, tmp_path, *USER, "--max_length", "256", "--estimator_config", str(path), "--estimator_lora_r", "8",
        "--estimator_lora_target_modules", "q_proj", "v_proj", "--estimator_include_ref_logps", "true",
        "--estimator_output_dir", str(tmp_path / "adapters"),
    )  # fmt: skip
    assert config.max_length == 128 and config.scoring_batch_size == 3 and config.optim == "adamw_torch"
    assert config.lora_r == 8 and config.lora_target_modules == ["q_proj", "v_proj"] and config.include_ref_logps
    assert config.learning_rate == 1e-4 and config.output_dir == str(tmp_path / "adapters")
    # on the built-in task too, the file beats the task's own estimator settings
    assert estimator_config(tisdpo, tmp_path, "--estimator_config", str(path)).learning_rate == 1e-4

    path.write_text("method: dpo\n")
    with pytest.raises(ValueError, match="choose the method with --weights_method"):
        estimator_config(tisdpo, tmp_path, *USER, "--weights_method", "sft", "--estimator_config", str(path))
    path.write_text("max_lenght: 128\n")
    with pytest.raises(ValueError, match=r"\['max_lenght'\] are not WeightEstimatorConfig fields"):
        estimator_config(tisdpo, tmp_path, *USER, "--estimator_config", str(path))


def test_estimator_flags_cover_weight_estimator_config(tisdpo):
    """Every field WeightEstimatorConfig adds to TrainingArguments has a flag (but `method`: --weights_method)."""
    from transformers import TrainingArguments

    from trl_tokenpo import WeightEstimatorConfig

    own = {f.name for f in dataclasses.fields(WeightEstimatorConfig)} - {f.name for f in dataclasses.fields(TrainingArguments)}
    flags = {f.name for f in dataclasses.fields(tisdpo.estimator_arguments_class())}
    assert {f"estimator_{name}" for name in own - {"method"}} <= flags


def test_a_dataset_without_a_model_is_refused(tisdpo, tmp_path):
    builtin, args = parse(tisdpo, ["--dataset_name", "pairs.jsonl", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--model_name_or_path` is required with `--dataset_name"):
        tisdpo.main(*args[:6], builtin=builtin)


def test_estimator_flags_with_given_weights_are_refused(tisdpo, tmp_path):
    builtin, args = parse(tisdpo, [*USER, "--weights_method", "given", "--estimator_max_length", "64", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--estimator_max_length configure the estimator, which --weights_method given"):
        tisdpo.main(*args[:6], builtin=builtin)


# ----------------------------------------------------------------------------------------------------------------------
# Data files as --dataset_name (issue 16, item 8)
# ----------------------------------------------------------------------------------------------------------------------


def write(path, rows):
    path = Path(path)
    dataset = Dataset.from_list(rows)
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        import gzip

        with (gzip.open if path.suffix == ".gz" else open)(path, "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        dataset.to_json(path, lines=False)
    elif path.suffix == ".parquet":
        dataset.to_parquet(path)
    else:
        dataset.to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize("name", ["train.jsonl", "train.json", "train.parquet", "train.csv", "train.jsonl.gz"])
def test_a_data_file_as_dataset_name(tmp_path, name):
    rows = preference_rows(6)
    args = ScriptArguments(dataset_name=write(tmp_path / name, rows))
    train, evaluation = load_user_datasets(args, None, with_eval=False)
    assert train.to_list() == rows and evaluation is None


def test_a_data_file_with_evaluation(tmp_path):
    rows = preference_rows(6)
    train_file = write(tmp_path / "train.jsonl", rows)
    with pytest.raises(ValueError, match="single file: it has no 'test' split.*--dataset_test_split path/to/eval.jsonl"):
        load_user_datasets(ScriptArguments(dataset_name=train_file), None, with_eval=True)
    eval_file = write(tmp_path / "eval.parquet", rows[:2])
    args = ScriptArguments(dataset_name=train_file, dataset_test_split=eval_file)
    train, evaluation = load_user_datasets(args, None, with_eval=True)
    assert len(train) == 6 and evaluation.to_list() == rows[:2]
    with pytest.raises(InputError, match="--dataset_name .*missing.jsonl: no such file"):
        load_user_datasets(ScriptArguments(dataset_name=str(tmp_path / "missing.jsonl")), None, with_eval=False)


def test_dataset_directories_and_missing_splits(tmp_path):
    rows = preference_rows(6)
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder / "train.jsonl", rows)
    train, evaluation = load_user_datasets(ScriptArguments(dataset_name=str(folder)), None, with_eval=False)
    assert len(train) == 6 and evaluation is None
    with pytest.raises(ValueError, match=r"has no 'test' split to evaluate on \(it has \['train'\]\)"):
        load_user_datasets(ScriptArguments(dataset_name=str(folder)), None, with_eval=True)
    write(folder / "test.jsonl", rows[:2])
    train, evaluation = load_user_datasets(ScriptArguments(dataset_name=str(folder)), None, with_eval=True)
    assert (len(train), len(evaluation)) == (6, 2)
    saved = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(saved))
    with pytest.raises(ValueError, match="has no 'training' split"):
        load_user_datasets(ScriptArguments(dataset_name=str(saved), dataset_train_split="training"), None, False)
