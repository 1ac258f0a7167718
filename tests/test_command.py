"""The `trl-tokenpo` command (trl_tokenpo/cli.py, trl_tokenpo/scripts/): the fast `--help`, and every bad input a user
can give it ending the run with one line naming the file, the row (0-based), the field and the fix, before any model
is loaded. The messages are asserted verbatim: they are the interface. Most cases run `trl-tokenpo` in this process
(the same code path as the console script, up to the launch); the last-line cases run the real commands."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import preference_rows

from trl_tokenpo import cli
from trl_tokenpo.scripts import estimate, tdpo, tisdpo
from trl_tokenpo.scripts.help import COMMON_TRL_OPTIONS, estimator_flag_names, fast_help, own_options


ROOT = Path(__file__).resolve().parents[1]
MODULES = {"tdpo": tdpo, "tisdpo": tisdpo, "estimate": estimate}
FORMAT = (
    "Each row needs `chosen` and `rejected` (and `prompt`, or the prompt is their common beginning), all strings "
    '(standard) or all lists of messages like {"role": "user", "content": "..."} (conversational)'
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path.name


@pytest.fixture
def data(tmp_path, monkeypatch):
    """A working directory with data files: the messages name them as the user typed them."""
    monkeypatch.chdir(tmp_path)
    rows = preference_rows(8)
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    missing = [dict(r) for r in rows]
    del missing[4]["rejected"]
    write_jsonl(tmp_path / "missing_some.jsonl", missing)
    write_jsonl(tmp_path / "missing_all.jsonl", [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in rows])
    mistyped = [dict(r) for r in rows]
    mistyped[2]["chosen"] = 5
    write_jsonl(tmp_path / "wrong_type.jsonl", mistyped)
    empty = [dict(r) for r in rows]
    empty[3]["chosen"], empty[6]["chosen"] = "", "  "
    write_jsonl(tmp_path / "empty.jsonl", empty)
    (tmp_path / "broken.jsonl").write_text(json.dumps(rows[0]) + "\n" + '{"prompt": "a", "chosen": \n')
    (tmp_path / "pairs.txt").write_text("the sky is blue\n")
    (tmp_path / "not_a_model").mkdir()
    return tmp_path


def run_cli(capfd, *argv):
    """`trl-tokenpo *argv` in this process: (exit status, last line of stderr). It must stop before launching."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in argv])
    err = capfd.readouterr().err
    return exit_info.value.code, err.rstrip("\n").splitlines()[-1]


def expect(capfd, message, *argv):
    status, last = run_cli(capfd, *argv)
    assert (status, last) == (2, message)


def user_args(command, model, dataset, *more):
    return [command, "--model_name_or_path", model, "--dataset_name", dataset, "--output_dir", "out", *more]


# ----------------------------------------------------------------------------------------------------------------------
# --help
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", list(MODULES))
def test_help_imports_neither_torch_nor_trl(command):
    """`--help` answers without the heavy imports (they take seconds): see the README for the measured time."""
    code = (
        "import sys; from trl_tokenpo.cli import main; main([sys.argv[1], '--help']); "
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'datasets') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code, command], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: trl-tokenpo {command} [options]")


def test_help_starts_with_the_description_and_the_data_formats_then_the_own_options():
    text = fast_help(tisdpo, "trl-tokenpo tisdpo")
    paragraphs = text.split("\n\n")
    assert paragraphs[1].startswith("Train a causal language model on preference pairs with TIS-DPO")
    assert paragraphs[2].startswith("Data: each row is a preference pair") and ".jsonl" in paragraphs[2]
    order = [text.index(title) for title in ("Token weights:", "TIS-DPO (TISDPOConfig):", "Built-in task:", "TRL options")]
    assert order == sorted(order)
    dataset_name = " ".join(text[text.index("--dataset_name: The preference data") :].split())
    assert "one local data file: .json, .jsonl, .parquet or .csv" in dataset_name
    assert "[built-in task: 'sft']" in text  # the built-in task's --weights_method


@pytest.mark.parametrize("command", list(MODULES))
def test_help_shows_the_parser_own_options_as_the_parser_does(command):
    """`--help` reads this package's options from the source; they must be the parser's (flag, default, help)."""
    module = MODULES[command]
    parser = module.make_parser()
    actions = {option: action for action in parser._actions for option in action.option_strings}
    builtin = (("", "scripts/utils.py", "BuiltinTaskArguments"),) if command != "estimate" else ()
    for _, path, class_name in module.OWN_OPTIONS + builtin:
        for option in own_options(path, class_name):
            action = actions[option.flag]
            assert option.default == action.default or (command == "estimate" and option.default is None), option
            assert option.help is None or option.help == action.help, option
            assert option.choices is None or list(option.choices) == list(action.choices), option
    if command == "tisdpo":
        flags = [a.option_strings[0] for a in parser._actions if a.dest.startswith("estimator_") and a.dest != "estimator_config"]
        assert estimator_flag_names(tisdpo) == flags
    trl_flags = [f for section, flags in COMMON_TRL_OPTIONS.items() for f in flags if command != "estimate" or section != "Training"]
    missing = [flag for flag in trl_flags if flag not in actions and flag != "--config"]
    assert missing == [] or command == "estimate" and set(missing) <= {"--dataset_test_split", "--use_peft", "--lora_r",
                                                                         "--lora_alpha", "--lora_target_modules"}  # fmt: skip


def test_help_all_lists_the_own_options_first(capsys):
    assert cli.main(["tisdpo", "--help_all"]) == 0
    text = capsys.readouterr().out
    titles = [line[:-1] for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert titles[:4] == ["Token weights", "TIS-DPO (TISDPOConfig)", "Built-in task", "TRL and transformers options (those of `trl dpo`)"]
    assert "--estimator_lora_r" in text.split("TIS-DPO (TISDPOConfig):")[0]
    assert "one local data file: .json, .jsonl, .parquet or .csv" in " ".join(text.split())


def test_the_command_without_a_subcommand_lists_the_commands(capsys):
    assert cli.main([]) == 0
    assert "commands:" in capsys.readouterr().out
    assert cli.main(["tdp"]) == 2
    assert capsys.readouterr().err == "trl-tokenpo: error: unknown command 'tdp' (did you mean tdpo?); the commands: tdpo, tisdpo, estimate.\n"


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: one line, before any model is loaded
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_launch(monkeypatch):
    """Nothing may be launched (or loaded): every case below must be refused by the checks."""
    monkeypatch.setattr(cli, "launch", lambda *args: pytest.fail("launched despite bad input"))


@pytest.mark.parametrize("command", list(MODULES))
def test_a_field_missing_in_some_rows(command, data, tiny_model_dir, capfd, no_launch):
    expect(
        capfd,
        f"trl-tokenpo {command}: error: missing_some.jsonl, row 4 (0-based), field `rejected`: missing or null (1 of 8 "
        f"rows: 4). {FORMAT}: fill it in, or drop these rows.",
        *user_args(command, tiny_model_dir, "missing_some.jsonl"),
    )


def test_a_field_missing_in_every_row(data, tiny_model_dir, capfd, no_launch):
    expect(
        capfd,
        "trl-tokenpo tisdpo: error: missing_all.jsonl: no row has a `rejected` field (its fields: prompt, chosen). "
        f"{FORMAT}: add the field, or rename the one that holds it.",
        *user_args("tisdpo", tiny_model_dir, "missing_all.jsonl"),
    )


def test_a_field_of_the_wrong_type(data, tiny_model_dir, capfd, no_launch):
    expect(
        capfd,
        "trl-tokenpo tdpo: error: wrong_type.jsonl, row 2 (0-based), field `chosen`: expected a string or a list of "
        'messages (dicts with a "role" and a "content"), got int (5) (1 of 8 rows: 2). Convert the field to text, or '
        "fix these rows.",
        *user_args("tdpo", tiny_model_dir, "wrong_type.jsonl"),
    )


def test_an_empty_completion(data, tiny_model_dir, capfd, no_launch):
    expect(
        capfd,
        "trl-tokenpo tisdpo: error: empty.jsonl, row 3 (0-based), field `chosen`: the completion is empty (2 of 8 rows: "
        "3, 6). An empty completion gives the pair no signal on that side (only the end-of-sequence token would be "
        "scored): write the completion, or drop these rows.",
        *user_args("tisdpo", tiny_model_dir, "empty.jsonl"),
    )


def test_an_unreadable_data_file(data, tiny_model_dir, capfd, no_launch):
    expect(
        capfd,
        "trl-tokenpo tdpo: error: --dataset_name broken.jsonl: cannot be read (line 2: not valid JSON (Expecting value "
        "at column 26)). A .jsonl file holds one JSON object per line; a .json file, a list of objects (or JSON lines).",
        *user_args("tdpo", tiny_model_dir, "broken.jsonl"),
    )


def test_a_data_file_of_unknown_format(data, tiny_model_dir, capfd, no_launch):
    expect(
        capfd,
        "trl-tokenpo tdpo: error: --dataset_name pairs.txt: unknown data file format '.txt'. Use a .json, .jsonl, "
        ".parquet or .csv file (optionally .gz/.bz2/.xz/.zst compressed), a dataset directory, or a hub dataset id.",
        *user_args("tdpo", tiny_model_dir, "pairs.txt"),
    )


def test_a_data_file_that_does_not_exist(data, tiny_model_dir, capfd, no_launch):
    expect(
        capfd,
        "trl-tokenpo estimate: error: --dataset_name nosuch.jsonl: no such file. A data file must exist locally (.json, "
        ".jsonl, .parquet, .csv, optionally compressed); otherwise pass a hub dataset id or a dataset directory.",
        *user_args("estimate", tiny_model_dir, "nosuch.jsonl"),
    )


def test_a_model_path_that_does_not_exist(data, capfd, no_launch):
    expect(
        capfd,
        "trl-tokenpo tisdpo: error: --model_name_or_path /home/me/no-such-model: no such file or directory. Pass an "
        "existing model directory, or a Hugging Face Hub model id (namespace/name).",
        *user_args("tisdpo", "/home/me/no-such-model", "pairs.jsonl"),
    )
    expect(
        capfd,
        "trl-tokenpo tdpo: error: --model_name_or_path not_a_model: the directory holds no saved model (no "
        "config.json). Pass the directory that `model.save_pretrained(...)` wrote, or a Hugging Face Hub model id.",
        *user_args("tdpo", "not_a_model", "pairs.jsonl"),
    )


def test_a_hub_model_offline(data, capfd, no_launch, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    expect(
        capfd,
        "trl-tokenpo tdpo: error: --model_name_or_path trl-tokenpo-tests/no-such-model: not a local model directory, and "
        f"not in the Hugging Face cache ({constants.HF_HUB_CACHE}), which is all HF_HUB_OFFLINE=1 allows. Download it "
        "once with network access (`hf download trl-tokenpo-tests/no-such-model`), or pass a local model directory.",
        *user_args("tdpo", "trl-tokenpo-tests/no-such-model", "pairs.jsonl"),
    )


@pytest.mark.parametrize(
    "command, flag, closest",
    [("tisdpo", "--estimator_method", "--weights_method"), ("tdpo", "--learning_rat", "--learning_rate"),
     ("estimate", "--weights_method", "--method"), ("tdpo", "--num_proceses", "--num_processes")],
)  # fmt: skip
def test_an_unknown_flag_names_the_closest(command, flag, closest, data, tiny_model_dir, capfd, no_launch):
    expect(
        capfd,
        f"trl-tokenpo {command}: error: unknown option {flag} (did you mean {closest}?). `trl-tokenpo {command} --help` "
        "lists the options.",
        *user_args(command, tiny_model_dir, "pairs.jsonl", flag, "1"),
    )


def test_unknown_keys_of_the_config_files(data, tiny_model_dir, capfd, no_launch):
    (data / "run.yaml").write_text("learning_rte: 1.0e-4\n")
    expect(
        capfd,
        "trl-tokenpo tdpo: error: --config: unknown keys: learning_rte (did you mean learning_rate?). `trl-tokenpo tdpo "
        "--help` lists the options.",
        *user_args("tdpo", tiny_model_dir, "pairs.jsonl", "--config", "run.yaml"),
    )
    (data / "estimator.yaml").write_text("lora_alpah: 8\n")
    expect(
        capfd,
        "trl-tokenpo tisdpo: error: --estimator_config estimator.yaml: ['lora_alpah'] are not WeightEstimatorConfig "
        "fields: lora_alpah (did you mean lora_alpha?).",
        *user_args("tisdpo", tiny_model_dir, "pairs.jsonl", "--estimator_config", "estimator.yaml"),
    )


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="bf16 may be available")
def test_a_value_a_config_refuses(data, tiny_model_dir, capfd, no_launch):
    """A config's own check (its __post_init__, run by the parser) is bad input too."""
    expect(
        capfd,
        "trl-tokenpo tdpo: error: TDPOConfig(bf16=True) needs a bf16-capable accelerator, and this machine has none. "
        "Leave bf16 unset (or False) to train in float32, or also set use_cpu=True to train with bf16 autocast on CPU.",
        *user_args("tdpo", tiny_model_dir, "pairs.jsonl", "--bf16", "true"),
    )


# ----------------------------------------------------------------------------------------------------------------------
# The last line of the real commands
# ----------------------------------------------------------------------------------------------------------------------


def run(command, cwd, **env):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1",
                   "OMP_NUM_THREADS": "1", **env}  # fmt: skip
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)
    output = (result.stdout + result.stderr).rstrip("\n")  # the error line is written last, after stdout is flushed
    return result.returncode, output.splitlines()[-1], output


def console_command():
    path = shutil.which("trl-tokenpo", path=str(Path(sys.executable).parent))
    assert path, "the console command is not installed: pip install -e ."
    return path


def test_the_console_command_ends_with_the_message(data, tiny_model_dir):
    status, last, output = run([console_command(), *user_args("tisdpo", tiny_model_dir, "missing_some.jsonl")], data)
    assert status == 2, output
    assert last.startswith("trl-tokenpo tisdpo: error: missing_some.jsonl, row 4 (0-based), field `rejected`: missing")
    assert "Traceback" not in output


def test_a_script_under_python_ends_with_the_message(data, tiny_model_dir):
    """`python scripts/train_tisdpo.py`: the estimator runs first, and still the rows are checked before it."""
    command = [sys.executable, str(ROOT / "scripts" / "train_tisdpo.py"), *user_args("tisdpo", tiny_model_dir, "empty.jsonl")[1:]]
    status, last, output = run(command, data)
    assert status == 2 and "Traceback" not in output, output
    assert last.startswith("train_tisdpo.py: error: empty.jsonl, row 3 (0-based), field `chosen`: the completion is empty")


def test_a_hub_model_without_network_fails_at_once(data):
    """No HF_HUB_OFFLINE, and the Hub unreachable (here: a closed local port): one line, not minutes of retries."""
    command = [sys.executable, "-m", "trl_tokenpo", *user_args("tdpo", "trl-tokenpo-tests/no-such-model", "pairs.jsonl")]
    status, last, output = run(command, data, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")
    assert status == 2, output
    assert last.startswith(
        "trl-tokenpo tdpo: error: --model_name_or_path trl-tokenpo-tests/no-such-model: not a local model directory, "
        "and the Hugging Face Hub (http://127.0.0.1:9) cannot be reached ("
    ), last  # then the HTTP client's error (httpx's ConnectError, or requests' ConnectionError with older hubs)
    assert last.endswith("It is not in the Hugging Face cache either: pass a local model directory, or run where the Hub is reachable.")


@pytest.mark.slow
def test_a_failure_in_the_launched_process_ends_with_its_message(data, tiny_model_dir):
    """A check only the training process can make (TRL's tokenization drops every row): `trl-tokenpo` launches it
    with `accelerate launch` and ends with its line and its exit status, without the launcher's traceback."""
    command = [console_command(), *user_args("tdpo", tiny_model_dir, "pairs.jsonl", "--max_length", "2", "--report_to", "none")]
    status, last, output = run(command, data)
    assert status == 2 and "Traceback" not in output, output
    assert last == (
        "trl-tokenpo tdpo: error: All 8 rows of the train dataset were dropped because their prompt alone fills "
        "`max_length=2` (with truncation_mode='keep_start' no completion token would remain). Increase `max_length` "
        "or use truncation_mode='keep_end'."
    )


@pytest.mark.slow
def test_accelerate_launch_quiet_ends_with_the_message(data, tiny_model_dir):
    """`accelerate launch` itself adds its own traceback after a failed process unless `--quiet` (its documented
    switch): with it, the message is the last line."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    command = [accelerate, "launch", "--quiet", "--num_processes", "1", "-m", "trl_tokenpo.scripts.tdpo",
               *user_args("tdpo", tiny_model_dir, "wrong_type.jsonl")[1:]]  # fmt: skip
    status, last, output = run(command, data)
    assert status != 0 and "Traceback" not in output, output
    assert last.startswith("trl-tokenpo tdpo: error: wrong_type.jsonl, row 2 (0-based), field `chosen`: expected a string")


@pytest.mark.slow
def test_several_processes_end_with_the_message(data, tiny_model_dir):
    """Two CPU processes (torch.distributed's launcher, which logs each failure after the processes' own output):
    `trl-tokenpo` prints the processes' error line again, last."""
    command = [console_command(), "tdpo", "--multi_gpu", "--num_processes", "2",
               *user_args("tdpo", tiny_model_dir, "pairs.jsonl", "--max_length", "2", "--report_to", "none")[1:]]  # fmt: skip
    status, last, output = run(command, data)
    assert status == 2, output
    assert last.startswith("trl-tokenpo tdpo: error: All 8 rows of the train dataset were dropped"), output[-3000:]
