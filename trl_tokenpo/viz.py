"""Token heat maps: what the weight estimator found, token by token.

An *example* is a dict with the prompt and, per side, the completion tokens and one value per token::

    {
        "prompt": "What is 2 + 2?",
        "chosen_tokens": ["ĠThe", "Ġanswer", "Ġis", "Ġ4", "<eos>"],
        "chosen_values": [0.1, 0.0, 0.05, 1.7, 0.0],
        "rejected_tokens": ["ĠThe", "Ġanswer", "Ġis", "Ġ5", "<eos>"],
        "rejected_values": [0.1, 0.0, 0.02, -2.1, 0.0],
    }

Values are token rewards ``r_t`` (centered on 0) or importance weights ``w_t`` (centered on 1: pass ``center=1.0``).
A side may be left out. :func:`examples_from_dataset` builds examples from a scored dataset,
:func:`render_token_heatmap_html` renders them as a self-contained HTML page and :func:`save_token_heatmap` writes
HTML or an image (PNG/SVG/PDF through matplotlib, for docs).

Colors: a diverging scale around ``center``, green above and red below, white at the center, saturated at
``center +/- vmax``. All examples of a figure share one scale. By default ``vmax`` is the 99th percentile of
``|value - center|`` over all shown tokens (:func:`auto_vmax`): a single outlier token then saturates alone instead of
washing out every other color, and the legend marks the ends as ``<=`` / ``>=`` when some values lie beyond. Pass a
number to fix the scale (the same one for several figures, e.g. ``auto_vmax(all_examples)``), or
``vmax=auto_vmax(examples, percentile=100)`` for the largest value. Tooltips always give exact values. Non-finite
values are shown grey.
"""

from __future__ import annotations

import html
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


__all__ = ["auto_vmax", "examples_from_dataset", "render_token_heatmap_html", "save_token_heatmap"]

SIDES = ("chosen", "rejected")

_WHITE = (255, 255, 255)
_GREEN = (26, 152, 80)
_RED = (215, 48, 39)
_GREY = (200, 200, 200)

# Markers that tokenizers use for whitespace, shown readably. Byte-level BPE (GPT-2, Llama 3, Qwen): "Ġ" is a space,
# "Ċ" a newline, "ĉ" a tab. SentencePiece (Llama 2, Gemma, T5): "▁" is a space, "<0x0A>" a newline byte.
_NEWLINE = "\u21b5"  # ↵, followed by a real line break
_TAB = "\u21e5"  # ⇥
_EMPTY = "\u2205"  # ∅, for a token that renders as nothing
_MIDDLE_DOT = "\u00b7"
_MARKERS = {"\u0120": " ", "\u2581": " ", "\u010a": _NEWLINE + "\n", "\u0109": _TAB, "\n": _NEWLINE + "\n", "\t": _TAB}
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_BYTE_NAMES = {0x0A: _NEWLINE + "\n", 0x09: _TAB, 0x0D: "\u240d", 0x20: " "}


def display_token(token: str, mark_spaces: bool = False) -> str:
    """The readable form of a token string as returned by ``convert_ids_to_tokens``.

    Whitespace markers become the whitespace they stand for ("Ġ"/"▁" -> space; "Ċ", "<0x0A>", "\\n" -> "↵" and a
    line break; tabs -> "⇥"); with ``mark_spaces`` spaces are shown as middle dots. An empty token is shown as "∅".
    """
    text = "".join(_MARKERS.get(ch, ch) for ch in token)
    text = _BYTE_TOKEN.sub(lambda m: _BYTE_NAMES.get(int(m.group(1), 16), m.group(0)), text)
    if mark_spaces:
        text = text.replace(" ", _MIDDLE_DOT)
    return text if text else _EMPTY


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))  # type: ignore[return-value]


def value_color(value: float, center: float = 0.0, vmax: float = 1.0) -> tuple[int, int, int]:
    """RGB color of ``value`` on the diverging scale: white at ``center``, full green at ``center + vmax``, full
    red at ``center - vmax`` (clipped beyond); grey for NaN/inf."""
    if value is None or not math.isfinite(value):
        return _GREY
    t = 0.0 if vmax <= 0 else max(-1.0, min(1.0, (value - center) / vmax))
    return _mix(_WHITE, _GREEN if t >= 0 else _RED, abs(t))


def _text_color(rgb: tuple[int, int, int]) -> str:
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return "#ffffff" if luminance < 140 else "#111111"


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _format_value(value: float) -> str:
    return repr(float(value))


def _prompt_text(prompt: Any) -> str:
    """A prompt as plain text: strings as is, conversations as ``role: content`` lines."""
    if prompt is None:
        return ""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and all(isinstance(m, Mapping) for m in prompt):
        return "\n".join(f"{m.get('role', '?')}: {_content_text(m.get('content', ''))}" for m in prompt)
    return str(prompt)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):  # multimodal content blocks
        return " ".join(
            str(b.get("text", f"<{b.get('type', '?')}>")) if isinstance(b, Mapping) else str(b) for b in content
        )
    return str(content)


def _sides(example: Mapping[str, Any], index: int) -> list[tuple[str, list[str], list[float]]]:
    """The (side, tokens, values) present in ``example``, validated."""
    sides = []
    for side in SIDES:
        tokens, values = example.get(f"{side}_tokens"), example.get(f"{side}_values")
        if tokens is None and values is None:
            continue
        if tokens is None or values is None:
            raise ValueError(f"example {index}: {side}_tokens and {side}_values must be given together")
        tokens, values = [str(t) for t in tokens], [float(v) for v in values]
        if len(tokens) != len(values):
            raise ValueError(
                f"example {index}: {side} has {len(tokens)} tokens but {len(values)} values; they must be parallel"
            )
        sides.append((side, tokens, values))
    if not sides:
        raise ValueError(
            f"example {index} has neither chosen_tokens/chosen_values nor rejected_tokens/rejected_values "
            f"(keys: {sorted(example)})"
        )
    return sides


def _deviations(examples: Sequence[Mapping[str, Any]], center: float) -> list[float]:
    return [
        abs(v - center)
        for i, example in enumerate(examples)
        for _, _, values in _sides(example, i)
        for v in values
        if math.isfinite(v)
    ]


def auto_vmax(examples: Sequence[Mapping[str, Any]], center: float = 0.0, percentile: float = 99.0) -> float:
    """The default color scale of a heat map: the ``percentile``-th percentile (linear interpolation, as
    ``numpy.percentile``) of ``|value - center|`` over the finite values of all ``examples``; ``percentile=100`` is the
    largest. Values further from ``center`` saturate. ``1.0`` when there is no non-zero deviation."""
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    deviations = sorted(_deviations(examples, center))
    if not deviations:
        return 1.0
    position = (len(deviations) - 1) * percentile / 100.0
    low = math.floor(position)
    high = min(low + 1, len(deviations) - 1)
    vmax = deviations[low] + (deviations[high] - deviations[low]) * (position - low)
    return vmax if vmax > 0 else 1.0


def _scale_labels(examples: Sequence[Mapping[str, Any]], center: float, scale: float) -> tuple[str, str]:
    """Legend labels of the two ends of the scale, marked ``<=`` / ``>=`` when some value lies beyond."""
    values = [v for i, e in enumerate(examples) for _, _, vs in _sides(e, i) for v in vs if math.isfinite(v)]
    low, high = _fmt_short(center - scale), _fmt_short(center + scale)
    if any(v < center - scale for v in values):
        low = "\u2264" + low
    if any(v > center + scale for v in values):
        high = "\u2265" + high
    return low, high


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em; color: #111; max-width: 70em; }
h1 { font-size: 1.4em; }
h2 { font-size: 1.1em; margin-top: 2em; border-bottom: 1px solid #ddd; }
.prompt { background: #f6f6f6; border-left: 3px solid #bbb; padding: .5em .8em; white-space: pre-wrap;
  font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .9em; }
.side { margin: .8em 0; }
.side-label { font-weight: 600; margin-bottom: .2em; }
.side-label .stats { font-weight: normal; color: #666; font-size: .85em; }
.tokens { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .9em; line-height: 1.9; white-space: pre-wrap; }
.tok { padding: .1em .05em; margin: 0 1px; border-radius: 3px; border: 1px solid rgba(0,0,0,.08); }
.legend { display: flex; align-items: center; gap: .6em; font-size: .85em; margin: 1em 0; }
.legend .bar { width: 16em; height: 1em; border: 1px solid #ccc;
  background: linear-gradient(to right, %(red)s, #ffffff, %(green)s); }
"""


def render_token_heatmap_html(
    examples: Sequence[Mapping[str, Any]],
    title: str | None = None,
    value_name: str = "reward",
    center: float = 0.0,
    *,
    vmax: float | None = None,
    mark_spaces: bool = False,
) -> str:
    """A self-contained HTML page (inline CSS, no script, no external resource) with one heat map per example.

    Args:
        examples: dicts with ``"prompt"`` (a string or a list of chat messages, shown as plain text) and, per side
            ``"chosen"``/``"rejected"``, ``"<side>_tokens"`` (token strings) and ``"<side>_values"`` (one float per
            token). See the module docstring.
        title: page title and heading.
        value_name: what the values are ("reward", "weight"), used in the legend and the tooltips.
        center: the neutral value, drawn white (0 for rewards, 1 for weights).
        vmax: distance from ``center`` at which colors saturate. Default: :func:`auto_vmax`, the 99th percentile of
            the distances of the values shown, so that one outlier does not wash out the others.
        mark_spaces: show spaces inside tokens as middle dots.

    Each token is a ``<span>`` whose ``title`` (tooltip) gives the raw token and the exact value (``repr`` of the
    float). Everything is HTML-escaped.

    Raises:
        ValueError: an example has no side, or a side's tokens and values differ in length.
    """
    examples = list(examples)
    scale = float(vmax) if vmax is not None else auto_vmax(examples, center)
    low_label, high_label = _scale_labels(examples, center, scale)
    esc = html.escape
    page_title = title or f"Token {value_name}s"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(page_title)}</title>",
        f"<style>{_CSS % {'red': _hex(_RED), 'green': _hex(_GREEN)}}</style>",
        "</head><body>",
        f"<h1>{esc(page_title)}</h1>",
        '<div class="legend">',
        f"<span>{esc(low_label)}</span>",
        '<span class="bar"></span>',
        f"<span>{esc(high_label)}</span>",
        f"<span>{esc(value_name)}: red below {esc(_fmt_short(center))}, white at {esc(_fmt_short(center))}, green "
        "above; grey: not finite. Hover a token for its exact value.</span>",
        "</div>",
    ]
    for index, example in enumerate(examples):
        sides = _sides(example, index)
        parts.append(f"<h2>Example {index}</h2>")
        parts.append(f'<div class="prompt">{esc(_prompt_text(example.get("prompt")))}</div>')
        for side, tokens, values in sides:
            finite = [v for v in values if math.isfinite(v)]
            stats = f"{len(tokens)} tokens"
            if finite:
                stats += f", mean {value_name} {_fmt_short(sum(finite) / len(finite))}"
            parts.append('<div class="side">')
            parts.append(f'<div class="side-label">{esc(side)} <span class="stats">({esc(stats)})</span></div>')
            spans = []
            for token, value in zip(tokens, values):
                rgb = value_color(value, center, scale)
                tooltip = f"{token!r}  {value_name} = {_format_value(value)}"
                spans.append(
                    f'<span class="tok" style="background:{_hex(rgb)};color:{_text_color(rgb)}" '
                    f'title="{esc(tooltip, quote=True)}">{esc(display_token(token, mark_spaces))}</span>'
                )
            parts.append(f'<div class="tokens">{"".join(spans)}</div>')
            parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _fmt_short(value: float) -> str:
    return f"{value:.3g}"


# ----------------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------------

_IMAGE_FORMATS = {".png", ".svg", ".pdf"}


def save_token_heatmap(
    examples: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    title: str | None = None,
    value_name: str = "reward",
    center: float = 0.0,
    *,
    vmax: float | None = None,
    mark_spaces: bool = False,
    width_inches: float = 10.0,
    dpi: int = 150,
    font_size: float = 9.0,
) -> Path:
    """Write the heat map of ``examples`` to ``path``; the format follows the extension.

    ``.html``/``.htm``: the page of :func:`render_token_heatmap_html`. ``.png``/``.svg``/``.pdf``: an image drawn with
    matplotlib (Agg, no display needed; install the ``viz`` extra): the title and a color bar, then per example the
    prompt and one block per side with the tokens as colored boxes, wrapped to ``width_inches``; the figure is as
    tall as its content. ``dpi`` applies to PNG. The arguments shared with the HTML renderer mean the same there.

    Returns the path written. Raises ``ValueError`` for another extension.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".html", ".htm"):
        text = render_token_heatmap_html(
            examples, title=title, value_name=value_name, center=center, vmax=vmax, mark_spaces=mark_spaces
        )
        path.write_text(text, encoding="utf-8")
        return path
    if suffix not in _IMAGE_FORMATS:
        raise ValueError(f"unsupported heat map file type {path.suffix!r}: use .html, .htm, .png, .svg or .pdf")
    _save_image(
        list(examples),
        path,
        title=title,
        value_name=value_name,
        center=center,
        vmax=vmax,
        mark_spaces=mark_spaces,
        width_inches=width_inches,
        dpi=dpi,
        font_size=font_size,
    )
    return path


def _save_image(
    examples: list[Mapping[str, Any]],
    path: Path,
    *,
    title: str | None,
    value_name: str,
    center: float,
    vmax: float | None,
    mark_spaces: bool,
    width_inches: float,
    dpi: int,
    font_size: float,
) -> None:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("saving a heat map image needs matplotlib: pip install 'trl-tokenpo[viz]'") from exc
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties
    from matplotlib.patches import Rectangle
    from matplotlib.textpath import TextToPath

    del matplotlib  # only imported to give a clear error; Figure() needs no pyplot and no display
    scale = float(vmax) if vmax is not None else auto_vmax(examples, center)
    low_label, high_label = _scale_labels(examples, center, scale)

    # Layout in points (1/72 inch), y growing downwards; every drawing operation is recorded, then drawn at once.
    mono = FontProperties(family="DejaVu Sans Mono", size=font_size)
    sans = FontProperties(family="DejaVu Sans", size=font_size)
    bold = FontProperties(family="DejaVu Sans", size=font_size * 1.1, weight="bold")
    measurer = TextToPath()
    widths: dict[tuple[str, int], float] = {}

    def text_width(text: str, prop: FontProperties) -> float:
        cache_key = (text, id(prop))
        if cache_key not in widths:
            width, _, _ = measurer.get_text_width_height_descent(text, prop, ismath=False)
            widths[cache_key] = width
        return widths[cache_key]

    margin, width = 24.0, width_inches * 72.0
    right = width - margin
    line_height = font_size * 1.75
    pad, gap = 1.5, 1.5
    ops: list[tuple] = []  # ("text", x, y, s, prop, color) | ("box", x, y, w, h, rgb)
    y = margin

    def wrap_plain(text: str, prop: FontProperties, x0: float) -> list[str]:
        lines = []
        for raw_line in text.split("\n"):
            current = ""
            for word in re.split(r"(\s+)", raw_line):
                candidate = current + word
                if current and text_width(candidate, prop) > right - x0:
                    lines.append(current.rstrip())
                    current = word.lstrip()
                else:
                    current = candidate
            lines.append(current)
        return lines

    heading = title or f"Token {value_name}s"
    ops.append(
        (
            "text",
            margin,
            y + font_size * 1.4,
            heading,
            FontProperties(family="DejaVu Sans", size=font_size * 1.5, weight="bold"),
            "#111111",
        )
    )
    y += font_size * 2.6
    # Color bar legend.
    bar_w, bar_h = 160.0, font_size * 1.1
    ops.append(("text", margin, y + bar_h * 0.8, low_label, sans, "#111111"))
    bar_x = margin + text_width(low_label, sans) + 6
    ops.append(("bar", bar_x, y, bar_w, bar_h))
    legend = f"{high_label}   {value_name} (white = {_fmt_short(center)}, grey = not finite)"
    ops.append(("text", bar_x + bar_w + 6, y + bar_h * 0.8, legend, sans, "#111111"))
    y += bar_h + font_size * 1.5

    for index, example in enumerate(examples):
        sides = _sides(example, index)
        ops.append(("text", margin, y + font_size, f"Example {index}", bold, "#111111"))
        y += line_height * 1.1
        prompt = _prompt_text(example.get("prompt"))
        prompt_lines = wrap_plain(prompt, mono, margin + 8) if prompt else []
        if prompt_lines:
            top = y
            for line in prompt_lines:
                ops.append(("text", margin + 8, y + font_size * 1.1, line, mono, "#333333"))
                y += line_height * 0.85
            ops.append(("rule", margin + 2, top, y - top))
            y += font_size * 0.6
        for side, tokens, values in sides:
            ops.append(("text", margin, y + font_size, side, bold, "#111111"))
            y += line_height
            x = margin + 8
            for token, value in zip(tokens, values):
                rgb = value_color(value, center, scale)
                pieces = display_token(token, mark_spaces).split("\n")
                for k, piece in enumerate(pieces):
                    if k > 0:  # the token contained a newline: continue on the next line
                        x, y = margin + 8, y + line_height
                    if not piece:
                        continue
                    w = text_width(piece, mono) + 2 * pad
                    if x + w > right and x > margin + 8:
                        x, y = margin + 8, y + line_height
                    ops.append(("box", x, y, w, line_height - 3, rgb))
                    ops.append(("text", x + pad, y + (line_height - 3) * 0.72, piece, mono, _text_color(rgb)))
                    x += w + gap
            y += line_height + font_size * 0.6
        y += font_size
    height = y + margin

    fig = Figure(figsize=(width_inches, height / 72.0), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    for op in ops:
        kind = op[0]
        if kind == "text":
            _, x0, y0, s, prop, color = op
            ax.text(
                x0, y0, s, fontproperties=prop, color=color, va="baseline", ha="left", usetex=False, parse_math=False
            )
        elif kind == "box":
            _, x0, y0, w, h, rgb = op
            ax.add_patch(Rectangle((x0, y0), w, h, facecolor=_hex(rgb), edgecolor="#00000018", linewidth=0.4))
        elif kind == "rule":
            _, x0, y0, h = op
            ax.add_patch(Rectangle((x0, y0), 2.0, h, facecolor="#bbbbbb", edgecolor="none"))
        elif kind == "bar":
            _, x0, y0, w, h = op
            steps = 64
            for k in range(steps):
                value = center + scale * (2 * (k + 0.5) / steps - 1)
                ax.add_patch(
                    Rectangle(
                        (x0 + w * k / steps, y0),
                        w / steps + 0.2,
                        h,
                        facecolor=_hex(value_color(value, center, scale)),
                        edgecolor="none",
                    )
                )
            ax.add_patch(Rectangle((x0, y0), w, h, facecolor="none", edgecolor="#999999", linewidth=0.5))
    fig.savefig(path, dpi=dpi, format=path.suffix.lower().lstrip("."), facecolor="white")


# ----------------------------------------------------------------------------------------------------------------------
# From a scored dataset
# ----------------------------------------------------------------------------------------------------------------------


def examples_from_dataset(
    dataset: Any,
    tokenizer: Any,
    column_prefix: str = "token_rewards",
    num_examples: int = 3,
    *,
    indices: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Heat-map examples from a scored preference dataset.

    The dataset has ``prompt``/``chosen``/``rejected`` and per-token float lists ``chosen_<column_prefix>`` and
    ``rejected_<column_prefix>`` (e.g. ``chosen_token_rewards`` from the estimator, or ``chosen_weights``), aligned
    1:1 with TRL's tokenized completions. Each token is decoded on its own with ``tokenizer.convert_ids_to_tokens``.

    Alignment: exact when the dataset has TRL's ``chosen_ids``/``rejected_ids`` columns (a dataset tokenized by
    ``DPOTrainer`` or by the estimator). Otherwise the completions are re-tokenized the way ``DPOTrainer`` does it
    (EOS appended to text completions, prompt+completion tokenized together and the completion taken after the
    common prefix with the tokenized prompt; chat template for conversational data), without truncation; a
    length mismatch with the values then raises ``ValueError`` -- pass the ids to avoid guessing.

    Args:
        dataset: a ``datasets.Dataset`` or a list of row dicts.
        tokenizer: the tokenizer the values were computed with.
        column_prefix: the per-token columns are ``chosen_<column_prefix>`` and ``rejected_<column_prefix>``.
        num_examples: how many rows, from the start (ignored when ``indices`` is given).
        indices: which rows to show.
    """
    num_rows = len(dataset)
    rows = list(indices) if indices is not None else list(range(min(num_examples, num_rows)))
    examples = []
    for row_index in rows:
        row = dataset[int(row_index)]
        example: dict[str, Any] = {"prompt": row.get("prompt")}
        retokenized = None
        for side in SIDES:
            column = f"{side}_{column_prefix}"
            if column not in row:
                raise KeyError(f"dataset has no column {column!r} (columns: {sorted(row)})")
            values = [float(v) for v in row[column]]
            ids = row.get(f"{side}_ids")
            if ids is None:
                if retokenized is None:
                    retokenized = _completion_ids(row, tokenizer)
                ids = retokenized[side]
                if len(ids) != len(values):
                    raise ValueError(
                        f"row {row_index}: {column} has {len(values)} values but re-tokenizing the {side} completion "
                        f"gives {len(ids)} tokens; pass a dataset with TRL's {side}_ids column for exact alignment"
                    )
            elif len(ids) != len(values):
                raise ValueError(
                    f"row {row_index}: {column} has {len(values)} values but {side}_ids has {len(ids)} ids"
                )
            example[f"{side}_tokens"] = tokenizer.convert_ids_to_tokens([int(i) for i in ids])
            example[f"{side}_values"] = values
        examples.append(example)
    return examples


def _completion_ids(row: Mapping[str, Any], tokenizer: Any) -> dict[str, list[int]]:
    """Completion ids of both sides, tokenized as TRL's DPOTrainer does (without truncation)."""
    prompt = row.get("prompt")
    if prompt is None:
        raise ValueError("cannot re-tokenize a row without a 'prompt' column; pass chosen_ids/rejected_ids")
    conversational = isinstance(prompt, list)

    def tokenize(content: Any, **kwargs: Any) -> list[int]:
        if conversational:
            out = tokenizer.apply_chat_template(content, tokenize=True, return_dict=True, **kwargs)
            return list(out["input_ids"])
        return list(tokenizer(text=content)["input_ids"])

    if conversational:
        prompt_ids = tokenize(prompt, add_generation_prompt=True)
        full = {side: tokenize(prompt + list(row[side])) for side in SIDES}
    else:
        eos = tokenizer.eos_token or ""
        prompt_ids = tokenize(prompt)
        full = {}
        for side in SIDES:
            completion = row[side]
            if eos and not completion.endswith(eos):
                completion += eos
            full[side] = tokenize(prompt + completion)
    prompt_len = min(_common_prefix(prompt_ids, ids) for ids in full.values())
    return {side: ids[prompt_len:] for side, ids in full.items()}


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
