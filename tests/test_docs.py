"""Keep the docs true: every script command in README.md and docs/*.md parses with that script's own parser, every
file a command names exists, and the README's first code block holds exactly the two commands CI relies on."""

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def bash_blocks(path):
    return re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S)


def commands(block):
    """Shell commands of a block, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    for line in joined.splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            yield line


def script_commands():
    for path in DOCS:
        for block in bash_blocks(path):
            for command in commands(block):
                for part in command.split("&&"):
                    words = shlex.split(part)
                    scripts = [i for i, w in enumerate(words) if re.fullmatch(r"scripts/\w+\.py", w)]
                    if scripts:
                        i = scripts[0]
                        yield pytest.param(words[:i], words[i], words[i + 1 :], id=f"{path.name}:{words[i]}:{len(words)}")


def load_script(name):
    spec = importlib.util.spec_from_file_location(Path(name).stem, ROOT / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    first = bash_blocks(ROOT / "README.md")[0]
    lines = [line for line in first.splitlines() if line.strip()]
    assert len(lines) == 2
    assert "scripts/train_tisdpo.py" in lines[0]
    assert lines[1] in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("launcher, script, args", list(script_commands()))
def test_documented_command_parses(launcher, script, args, tmp_path):
    assert (ROOT / script).exists(), script
    for i, word in enumerate(launcher):
        if word == "--config_file":
            assert (ROOT / launcher[i + 1]).exists(), launcher[i + 1]
    args = [a for a in args if a != "..."]
    module = load_script(script)
    if not hasattr(module, "make_parser"):  # the benchmarks: plain argparse behind `parse_args(argv)`
        module.parse_args(args)  # exits (SystemExit) on an unknown flag or a bad value
        return
    parser = module.make_parser()
    # parse only: the flags must exist with valid values; nothing is loaded or trained
    if "--output_dir" not in args:
        args += ["--output_dir", str(tmp_path)]
    parsed = parser.parse_args_into_dataclasses(args=args + ["--use_cpu", "true", "--bf16", "false"], return_remaining_strings=True)
    assert parsed[-1] == [], f"unknown flags in the docs: {parsed[-1]}"
