"""Keep the docs true: every script command in README.md and docs/*.md parses with that script's own parser, every
file a command names exists, every relative link and image points at a file (and heading) that exists, the Python
snippets marked as tested run (on a tiny local model), and the README's first code block holds exactly the two
commands CI relies on."""

import importlib
import importlib.util
import math
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
    """(launcher words, script, arguments) of every documented command that runs a script or a `trl-tokenpo` command;
    the script of `trl-tokenpo X` / `-m trl_tokenpo.scripts.X` is `trl_tokenpo/scripts/X.py`."""
    for path in DOCS:
        for block in bash_blocks(path):
            for command in commands(block):
                for part in command.split("&&"):
                    words = shlex.split(part)
                    for i, word in enumerate(words):
                        if re.fullmatch(r"scripts/\w+\.py", word):
                            script, start = word, i + 1
                        elif word.endswith("trl-tokenpo") and i + 1 < len(words) and not words[i + 1].startswith("-"):
                            script, start = f"trl_tokenpo/scripts/{words[i + 1]}.py", i + 2
                        elif word.startswith("trl_tokenpo.scripts.") and i > 0 and words[i - 1] in ("-m", "--module"):
                            script, start = f"trl_tokenpo/scripts/{word.rsplit('.', 1)[1]}.py", i + 1
                        else:
                            continue
                        yield pytest.param(words[:i], script, words[start:], id=f"{path.name}:{script}:{len(words)}")
                        break


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
    if hasattr(module, "run") and not hasattr(module, "parse"):  # a thin wrapper of a trl-tokenpo command
        module = importlib.import_module(module.run.__module__)
    if not hasattr(module, "make_parser"):  # the benchmarks: plain argparse behind `parse_args(argv)`
        module.parse_args(args)  # exits (SystemExit) on an unknown flag or a bad value
        return
    # parse only: the flags must exist with valid values (InputError otherwise); nothing is loaded or trained
    from trl_tokenpo.cli import launcher_options

    if "--output_dir" not in args:
        args += ["--output_dir", str(tmp_path)]
    module.parse(args + ["--use_cpu", "true", "--bf16", "false"], launcher_options=launcher_options())


# ----------------------------------------------------------------------------------------------------------------------
# Links and images
# ----------------------------------------------------------------------------------------------------------------------


def heading_anchors(path):
    """GitHub's anchors of a markdown file's headings: lower case, punctuation but `-` and `_` dropped, spaces to `-`."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


def relative_links():
    for path in DOCS:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if not re.match(r"[a-z]+:", target):
                yield pytest.param(path, target, id=f"{path.name}:{target}")


@pytest.mark.parametrize("path, target", list(relative_links()))
def test_relative_link_exists(path, target):
    file, _, anchor = target.partition("#")
    linked = (path.parent / file).resolve() if file else path
    assert linked.exists(), f"{path.name} links to {target}, which does not exist"
    if anchor and linked.suffix == ".md":
        assert anchor in heading_anchors(linked), f"{path.name} links to {target}: no such heading"


def test_link_check_sees_images():
    """The check above covers images: the estimator page's heat map is one of its targets."""
    targets = [param.values[1] for param in relative_links() if param.values[0].name == "estimator.md"]
    assert "images/estimator_heatmap.png" in targets


# ----------------------------------------------------------------------------------------------------------------------
# Python snippets
# ----------------------------------------------------------------------------------------------------------------------

TESTED_MARK = "<!-- tested: tests/test_docs.py"
# What a tested snippet downloads, and its offline stand-in here
SNIPPET_MODEL = '"HuggingFaceTB/SmolLM2-135M-Instruct"'
SNIPPET_DATASET = 'load_dataset("trl-lib/ultrafeedback_binarized", split="train[:32]")'


def marked_snippets(path):
    return re.findall(re.escape(TESTED_MARK) + r"[^\n]*-->\n```python\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_and_quickstart_show_a_tested_cpu_snippet():
    for path in (ROOT / "README.md", ROOT / "docs" / "quickstart.md"):
        assert marked_snippets(path), f"{path.name} has no Python snippet marked {TESTED_MARK!r}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "snippet", sorted({s for path in DOCS for s in marked_snippets(path)}), ids=lambda s: f"snippet{len(s)}"
)
def test_tested_snippet_runs_on_cpu(snippet, tiny_model_dir, tmp_path, monkeypatch, one_thread):
    """The snippet as printed, with the hub model and dataset swapped for a tiny local model and 8 conversational
    pairs; it must train: every step run with a finite loss, the LoRA adapters moved, rewards estimated per token."""
    from conftest import preference_rows
    from datasets import Dataset
    from transformers.utils import is_torch_bf16_gpu_available

    assert snippet.count(SNIPPET_MODEL) == 1 and snippet.count(SNIPPET_DATASET) == 1, "update the substitutions"
    rows = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
            "rejected": [{"role": "assistant", "content": r["rejected"].strip()}],
        }
        for r in preference_rows(8)
    ]
    code = snippet.replace(SNIPPET_MODEL, repr(tiny_model_dir)).replace(SNIPPET_DATASET, "Dataset.from_list(rows)")
    monkeypatch.chdir(tmp_path)
    namespace = {"Dataset": Dataset, "rows": rows}
    exec(compile(code, "snippet", "exec"), namespace)

    trainer, weighted = namespace["trainer"], namespace["weighted"]
    assert trainer.state.global_step == trainer.args.max_steps > 0
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert trainer.args.bf16 is is_torch_bf16_gpu_available()  # float32 here, as the docs say, without a setting
    lora_b = [p for name, p in trainer.model.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # initialised at 0: non-zero means trained
    assert len(weighted) == 8 and all(len(r) > 0 for r in weighted["chosen_token_rewards"])
