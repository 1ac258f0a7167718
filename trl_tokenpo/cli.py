"""The `trl-tokenpo` command (also `python -m trl_tokenpo`): `trl-tokenpo tdpo|tisdpo|estimate [options]`.

Like TRL's `trl dpo`, a command parses its options, then runs its script (`trl_tokenpo/scripts/<command>.py`) under
`accelerate launch`: the options `accelerate launch` knows (`--num_processes`, `--config_file`, ...) go to it, the
others to the script, and `--accelerate_config NAME` picks one of the configs TRL ships. Before anything is launched,
the command checks what it can (flags, the model path, every row of the data): bad input ends the run with one line,
`trl-tokenpo <command>: error: <what, where, fix>`, and exit status 2, never with a traceback (`TRL_TOKENPO_DEBUG=1`
shows it). A failure of the launched processes ends the command with their exit status and nothing more: what they
printed last (their own error line) stays the last line.
"""

from __future__ import annotations

import importlib
import sys


COMMANDS = {
    "tdpo": "Train with TDPO (token-level KL in DPO's margin).",
    "tisdpo": "Estimate token weights with a contrastive LoRA pair, then train with TIS-DPO.",
    "estimate": "Estimate TIS-DPO token rewards for a dataset and save it (then: tisdpo --weights_method given).",
}


def usage() -> str:
    from . import __version__

    lines = [
        f"usage: trl-tokenpo {{{','.join(COMMANDS)}}} [options]      (trl-tokenpo {__version__})",
        "",
        "Token-level preference optimization for TRL: TDPO and TIS-DPO trainers, drop-in replacements for",
        "`trl dpo`, and TIS-DPO's contrastive token-weight estimator. Each command accepts every option of",
        "`trl dpo` and of `accelerate launch`; `trl-tokenpo <command> --help` describes it.",
        "",
        "commands:",
    ]
    lines += [f"  {name:10s}{text}" for name, text in COMMANDS.items()]
    return "\n".join(lines) + "\n"


def launcher_options() -> dict:
    """Each option string of `accelerate launch`, with the number of values it takes (0, 1 or "?"); and TRL's
    `--accelerate_config`."""
    from accelerate.commands.launch import launch_command_parser

    options = {"--accelerate_config": 1}
    for action in launch_command_parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        count = 0 if action.nargs == 0 else "?" if action.nargs == "?" else 1
        options.update(dict.fromkeys(action.option_strings, count))
    return options


def _without(tokens: list[str], removed: list[str]) -> list[str]:
    """`tokens` without the ordered subsequence `removed`."""
    rest, pending = [], iter(removed)
    current = next(pending, None)
    for token in tokens:
        if current is not None and token == current:
            current = next(pending, None)
        else:
            rest.append(token)
    return rest


def explicit_defaults(launch_args: list[str]) -> list[str]:
    """`launch_args` plus, when no accelerate config applies (no `--config_file`, no `accelerate config` file), the
    values `accelerate launch` would pick itself for a machine without an accelerator (one process, one machine, no
    mixed precision, no dynamo), so that it does not print a notice listing them on every run. Anything given (or on
    a machine with an accelerator, where the number of processes matters) is left to accelerate."""
    import os

    import torch
    from accelerate.commands.config.config_args import default_config_file

    if "--config_file" in launch_args or os.path.isfile(default_config_file):
        return launch_args
    accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    given = {token.split("=", 1)[0] for token in launch_args}
    defaults = {"--num_machines": "1", "--mixed_precision": "no", "--dynamo_backend": "no"}
    if not accelerator:
        defaults["--num_processes"] = "1"
    return [*launch_args, *(item for flag, value in defaults.items() if flag not in given for item in (flag, value))]


def launch(command: str, launch_args: list[str], script_args: list[str]) -> int:
    """Run `python -m trl_tokenpo.scripts.<command> <script_args>` under `accelerate launch <launch_args>` and return
    its exit status. Failed processes have printed why: no launcher traceback follows. With several processes,
    torch.distributed's launcher logs each failure after their own lines, so the error line a process wrote on bad
    input (to the file `ERROR_FILE_ENV` names) is printed again, last."""
    import os
    import subprocess
    import tempfile

    from accelerate.commands.launch import launch_command, launch_command_parser

    from .scripts.utils import ERROR_FILE_ENV

    launch_args = list(launch_args)
    if "--accelerate_config" in launch_args:
        from trl.cli.accelerate_config import resolve_accelerate_config_argument

        launch_args = resolve_accelerate_config_argument(launch_args)
    script = ["--module", f"trl_tokenpo.scripts.{command}"]
    args = launch_command_parser().parse_args([*explicit_defaults(launch_args), *script, *script_args])
    with tempfile.TemporaryDirectory(prefix="trl-tokenpo-") as folder:
        os.environ[ERROR_FILE_ENV] = os.path.join(folder, "error")
        try:
            launch_command(args)
            return 0
        except subprocess.CalledProcessError as error:  # one process (accelerate's simple launcher)
            return error.returncode or 1
        except Exception as error:  # several processes: torch.distributed's ChildFailedError
            if type(error).__name__ != "ChildFailedError":
                raise
            written = sorted(os.listdir(folder))
            if not written:
                return 1
            with open(os.path.join(folder, written[0]), encoding="utf-8") as f:
                print(f.read(), end="", file=sys.stderr)
            return 2
        finally:
            os.environ.pop(ERROR_FILE_ENV, None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"trl-tokenpo {__version__}")
        return 0
    command, argv = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(f"trl-tokenpo: error: unknown command {command!r}{hint}; the commands: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    from .scripts.utils import exit_on_user_error, print_help

    module = importlib.import_module(f".scripts.{command}", __package__)
    prog = f"trl-tokenpo {command}"
    if print_help(module, argv, prog):
        return 0
    try:
        args, launch_args = module.parse(argv, prog, launcher_options=launcher_options())
        module.check_inputs(*args)  # before any process starts: flags, the model path, every row of the data
    except Exception as error:
        exit_on_user_error(prog, error)
        raise
    return launch(command, launch_args, _without(argv, launch_args))


if __name__ == "__main__":
    raise SystemExit(main())
