"""Tests of the token heat maps (trl_tokenpo/viz.py)."""

import html
import random
import re

import pytest
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from trl_tokenpo.viz import (
    auto_vmax,
    display_token,
    examples_from_dataset,
    render_token_heatmap_html,
    save_token_heatmap,
    value_color,
)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRICKY_TOKENS = ["ĠThe", "Ġ<b>", "&", 'Ġ"x"', "'", "Ċ", "▁word", "<0x0A>", "", "$x$", "</div>"]


def make_example(seed: int = 0, tokens=TRICKY_TOKENS) -> dict:
    rng = random.Random(seed)
    return {
        "prompt": "Is 2 < 3 & 'x' > \"y\"? <script>alert(1)</script>",
        "chosen_tokens": list(tokens),
        "chosen_values": [rng.uniform(-2, 2) for _ in tokens],
        "rejected_tokens": list(reversed(tokens)),
        "rejected_values": [rng.uniform(-2, 2) for _ in tokens],
    }


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here on a few sentences (GPT-2 style markers: Ġ for space, Ċ newline)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["the answer is four", "the answer is five & <b>", "What is 2 + 2?\nThink.", "user: hi\nassistant:"]
    backend.train_from_iterator(corpus * 10, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    return tok


def spans(page: str) -> list[tuple[str, str, str]]:
    """(background, title, text) of every token span."""
    pattern = r'<span class="tok" style="background:(#[0-9a-f]{6});[^"]*" title="([^"]*)">(.*?)</span>'
    return re.findall(pattern, page, flags=re.S)


# ----------------------------------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------------------------------


def test_html_escapes_every_token_and_the_prompt():
    example = make_example()
    page = render_token_heatmap_html([example], title="Rewards <of> tokens")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Rewards &lt;of&gt; tokens" in page
    found = spans(page)
    assert len(found) == 2 * len(TRICKY_TOKENS)
    shown = [text for _, _, text in found]
    expected = [html.escape(display_token(t)) for t in example["chosen_tokens"] + example["rejected_tokens"]]
    assert shown == expected
    for _, _, text in found:  # no raw markup inside a token
        assert "<" not in text and ">" not in text and '"' not in text


def test_html_tooltips_give_exact_values():
    example = make_example(seed=1)
    page = render_token_heatmap_html([example], value_name="weight")
    titles = [html.unescape(title) for _, title, _ in spans(page)]
    for title, token, value in zip(titles, example["chosen_tokens"], example["chosen_values"]):
        assert title == f"{token!r}  weight = {value!r}"
        assert float(title.rsplit("= ", 1)[1]) == value


def test_html_colors_are_diverging():
    example = {"prompt": "p", "chosen_tokens": ["up", "zero", "down"], "chosen_values": [1.5, 0.0, -1.5]}
    (up, _, _), (zero, _, _), (down, _, _) = spans(render_token_heatmap_html([example]))
    rgb = [tuple(int(c[i : i + 2], 16) for i in (1, 3, 5)) for c in (up, zero, down)]
    assert rgb[1] == (255, 255, 255)
    assert rgb[0][1] > rgb[0][0] and rgb[0][1] > rgb[0][2]  # green dominant
    assert rgb[2][0] > rgb[2][1] and rgb[2][0] > rgb[2][2]  # red dominant
    assert up != down


def test_center_for_weights():
    assert value_color(1.0, center=1.0, vmax=0.5) == (255, 255, 255)
    above, below = value_color(1.4, center=1.0, vmax=0.5), value_color(0.6, center=1.0, vmax=0.5)
    assert above[1] > above[0] and below[0] > below[1]
    assert value_color(float("nan")) == value_color(float("inf"))  # grey
    assert value_color(100.0, vmax=1.0) == value_color(2.0, vmax=1.0)  # clipped


def outlier_example(n: int = 200, outlier: float = -7.0) -> dict:
    """n rewards spread over [-1, 1] and one outlier token, as in a real map where one token scored -7."""
    rng = random.Random(0)
    values = [rng.uniform(-1, 1) for _ in range(n)] + [outlier]
    return {"prompt": "p", "chosen_tokens": [f"t{i}" for i in range(n + 1)], "chosen_values": values}


def test_default_scale_is_robust_to_one_outlier():
    """The default vmax is the 99th percentile of |r|, not the largest: the -7 outlier saturates alone, the other
    tokens keep readable colors; with the largest value as the scale (the old default) they are washed out."""
    numpy = pytest.importorskip("numpy")
    example = outlier_example()
    values = example["chosen_values"]
    vmax = auto_vmax([example])
    assert vmax == pytest.approx(float(numpy.percentile(numpy.abs(values), 99)))
    assert 0.9 < vmax < 1.01
    assert auto_vmax([example], percentile=100) == 7.0
    colors = [rgb for rgb, _, _ in spans(render_token_heatmap_html([example]))]
    assert colors[-1] == "#d73027"  # the outlier: full red, saturated
    strong = [v for v in values[:-1] if abs(v) > 0.8]
    assert len(strong) > 10
    for v in strong:  # strongly colored now (a channel below 100); near white with the largest |r| as the scale
        assert min(value_color(v, vmax=vmax)) < 100
        assert min(value_color(v, vmax=7.0)) > 200
    washed = [rgb for rgb, _, _ in spans(render_token_heatmap_html([example], vmax=7.0))]
    assert washed[-1] == "#d73027" and washed != colors  # an explicit vmax is used as given


def test_legend_marks_saturated_ends():
    page = render_token_heatmap_html([outlier_example()])
    legend = page[page.index('<div class="legend">') : page.index("</div>", page.index('<div class="legend">'))]
    assert "\u2264-" in legend  # the low end: values below it exist (the outlier)
    page = render_token_heatmap_html([outlier_example()], vmax=7.0)
    assert "\u2264" not in page[: page.index("<h2>")]


def test_auto_vmax_matches_numpy_percentile_and_validates():
    numpy = pytest.importorskip("numpy")
    examples = [make_example(seed) for seed in range(4)]
    deviations = [abs(v - 1.0) for e in examples for side in ("chosen", "rejected") for v in e[f"{side}_values"]]
    for q in (50, 90, 99, 100):
        assert auto_vmax(examples, center=1.0, percentile=q) == pytest.approx(float(numpy.percentile(deviations, q)))
    assert auto_vmax([{"prompt": "p", "chosen_tokens": ["a"], "chosen_values": [0.0]}]) == 1.0
    assert auto_vmax([{"prompt": "p", "chosen_tokens": ["a"], "chosen_values": [float("nan")]}]) == 1.0
    with pytest.raises(ValueError, match="percentile"):
        auto_vmax(examples, percentile=0)


def test_display_token_markers():
    assert display_token("Ġthe") == " the"
    assert display_token("▁the") == " the"
    assert display_token("Ċ") == "↵\n"
    assert display_token("<0x0A>") == "↵\n"
    assert display_token("Ġa Ġb", mark_spaces=True) == "·a··b"
    assert display_token("") == "∅"


def test_html_validation_errors():
    with pytest.raises(ValueError, match="2 tokens but 1 values"):
        render_token_heatmap_html([{"prompt": "p", "chosen_tokens": ["a", "b"], "chosen_values": [1.0]}])
    with pytest.raises(ValueError, match="neither"):
        render_token_heatmap_html([{"prompt": "p"}])


# ----------------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------------


def test_save_html(tmp_path):
    examples = [make_example(0), make_example(1)]
    path = save_token_heatmap(examples, tmp_path / "map.html", center=1.0, value_name="weight")
    assert path.read_text(encoding="utf-8") == render_token_heatmap_html(examples, center=1.0, value_name="weight")


def test_save_png(tmp_path):
    pytest.importorskip("matplotlib")
    long_tokens = [f"Ġtoken{i}" for i in range(120)] + ["Ċ"] + TRICKY_TOKENS
    examples = [make_example(0, tokens=long_tokens), make_example(1)]
    path = save_token_heatmap(examples, tmp_path / "map.png", title="Token rewards", dpi=80)
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR
    assert width == 800 and height > 200  # 10 in at 80 dpi; as tall as the wrapped content


def test_save_rejects_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match="unsupported heat map file type"):
        save_token_heatmap([make_example()], tmp_path / "map.jpg")


# ----------------------------------------------------------------------------------------------------------------------
# From a dataset
# ----------------------------------------------------------------------------------------------------------------------


def test_examples_from_dataset_with_ids(tokenizer):
    rows = {"prompt": [], "chosen": [], "rejected": [], "chosen_ids": [], "rejected_ids": []}
    for prompt, chosen, rejected in [("What is 2 + 2?", " four", " five"), ("the answer", " is <b>four", " & five")]:
        rows["prompt"].append(prompt)
        rows["chosen"].append(chosen)
        rows["rejected"].append(rejected)
        rows["chosen_ids"].append(tokenizer(text=chosen + "<eos>")["input_ids"])
        rows["rejected_ids"].append(tokenizer(text=rejected + "<eos>")["input_ids"])
    # Each value encodes its token id, so alignment can be checked exactly.
    for side in ("chosen", "rejected"):
        rows[f"{side}_weights"] = [[float(i) + 0.5 for i in ids] for ids in rows[f"{side}_ids"]]
    dataset = Dataset.from_dict(rows)

    examples = examples_from_dataset(dataset, tokenizer, column_prefix="weights", num_examples=5)
    assert len(examples) == 2
    for example, row in zip(examples, dataset):
        assert example["prompt"] == row["prompt"]
        for side in ("chosen", "rejected"):
            ids = row[f"{side}_ids"]
            assert example[f"{side}_tokens"] == [tokenizer.convert_ids_to_tokens(i) for i in ids]
            assert [tokenizer.convert_tokens_to_ids(t) for t in example[f"{side}_tokens"]] == [
                int(v) for v in example[f"{side}_values"]
            ]
    assert examples[0]["chosen_tokens"][-1] == "<eos>"
    assert examples_from_dataset(dataset, tokenizer, "weights", indices=[1])[0]["prompt"] == "the answer"

    broken = dataset.map(lambda row: {"chosen_weights": row["chosen_weights"][:-1]})
    with pytest.raises(ValueError, match="but chosen_ids has"):
        examples_from_dataset(broken, tokenizer, "weights")
    with pytest.raises(KeyError, match="chosen_token_rewards"):
        examples_from_dataset(dataset, tokenizer)


def test_examples_from_dataset_retokenizes_like_trl(tokenizer):
    """Without ids the completions are tokenized as DPOTrainer does: prompt + completion + EOS, minus the prompt."""
    prompt, chosen, rejected = "What is 2 + 2?", " The answer is four", " five"
    expected = {}
    prompt_ids = tokenizer(text=prompt)["input_ids"]
    for side, completion in (("chosen", chosen), ("rejected", rejected)):
        full = tokenizer(text=prompt + completion + "<eos>")["input_ids"]
        assert full[: len(prompt_ids)] == prompt_ids
        expected[side] = full[len(prompt_ids) :]
    row = {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "chosen_token_rewards": [float(i) for i in expected["chosen"]],
        "rejected_token_rewards": [float(i) for i in expected["rejected"]],
    }
    (example,) = examples_from_dataset([row], tokenizer)
    for side in ("chosen", "rejected"):
        assert example[f"{side}_tokens"] == tokenizer.convert_ids_to_tokens(expected[side])
    with pytest.raises(ValueError, match="pass a dataset with TRL's chosen_ids"):
        examples_from_dataset([{**row, "chosen_token_rewards": [0.0]}], tokenizer)


def test_examples_from_conversational_dataset(tokenizer):
    prompt = [{"role": "user", "content": "What is 2 + 2?"}]
    chosen = [{"role": "assistant", "content": "four"}]
    rejected = [{"role": "assistant", "content": "five"}]
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    full = {
        side: tokenizer.apply_chat_template(prompt + c, tokenize=True, return_dict=True)["input_ids"]
        for side, c in (("chosen", chosen), ("rejected", rejected))
    }
    start = min(
        next((k for k, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), len(prompt_ids)) for ids in full.values()
    )
    row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    for side in ("chosen", "rejected"):
        row[f"{side}_token_rewards"] = [0.25] * (len(full[side]) - start)
    (example,) = examples_from_dataset([row], tokenizer)
    assert example["chosen_tokens"] == tokenizer.convert_ids_to_tokens(full["chosen"][start:])
    page = render_token_heatmap_html([example])
    assert "user: What is 2 + 2?" in page  # the conversation is shown as plain text
