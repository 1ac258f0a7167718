"""Build offline stand-ins for the Hugging Face Hub repositories used by TRL's DPO test suite.

The stand-ins are written under ``<out_dir>/<hub id>`` (for example ``<out_dir>/trl-internal-testing/zen``), so that a
process whose working directory is ``<out_dir>`` resolves ``from_pretrained("trl-internal-testing/...")`` and
``load_dataset("trl-internal-testing/zen", "standard_preference")`` to local directories, with the Hub switched off
(``HF_HUB_OFFLINE=1``).

Everything is generated here: random-init tiny models built from configs, byte-level BPE tokenizers trained on the
generated text, chat templates written for this harness, and short English preference data. Nothing is downloaded.

Usage::

    python scripts/trl_compat/make_fixtures.py OUT_DIR [--only ID [ID ...]]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path


ORG = "trl-internal-testing"

# ----------------------------------------------------------------------------------------------------------------------
# Text data (written for this harness)
# ----------------------------------------------------------------------------------------------------------------------

# (prompt, chosen continuation, rejected continuation), 19 rows like the Hub datasets (17 train / 2 test).
_PAIRS = [
    ("A warm kitchen is better than", " a cold one.", " a flying teapot."),
    ("Fresh bread smells", " wonderful in the morning.", " like old socks on fire."),
    ("Water the garden", " before the sun gets hot.", " with orange juice."),
    ("A sharp knife is", " safer than a dull one.", " a kind of soup."),
    ("Read the recipe", " before you start cooking.", " after the cake burns."),
    ("Tidy desks help", " people find their tools.", " clouds sing louder."),
    ("Slow walks by the river", " calm a busy mind.", " turn shoes into fish."),
    ("Label every jar", " so nobody guesses.", " with invisible ink."),
    ("Plant tomatoes", " where they get sunlight.", " inside the freezer."),
    ("Rest is", " part of good work.", " a purple bicycle."),
    ("Wash your hands", " before you eat.", " only on Tuesdays."),
    ("Small steps", " still move you forward.", " are made of cheese."),
    ("Ask for help", " when the task is too big.", " from the microwave."),
    ("Write notes", " so you remember later.", " on melting ice."),
    ("Clear instructions", " save everyone time.", " taste like lemons."),
    ("Keep the door closed", " to hold in the heat.", " so the moon can sleep."),
    ("Measure twice", " and cut once.", " and then forget why."),
    ("Good tea needs", " hot water and patience.", " a loud trumpet."),
    ("Kind words", " make a hard day lighter.", " are sold by the kilo."),
]

_QUESTIONS = [
    ("What makes a kitchen pleasant?", "Warmth and order.", "A flying teapot."),
    ("When does bread smell best?", "In the morning.", "Never at all."),
    ("When should I water the garden?", "Before the heat of the day.", "With orange juice."),
    ("Which knife is safer?", "A sharp one.", "The one made of soup."),
    ("What should I do before cooking?", "Read the recipe.", "Burn the cake."),
    ("Why keep a tidy desk?", "To find tools quickly.", "So clouds sing."),
    ("What calms a busy mind?", "A slow walk.", "Shoes that swim."),
    ("Why label jars?", "So nobody has to guess.", "For the invisible ink."),
    ("Where do tomatoes grow well?", "In the sunlight.", "Inside the freezer."),
    ("Is rest useful?", "Yes, it is part of good work.", "It is a purple bicycle."),
    ("When should I wash my hands?", "Before eating.", "Only on Tuesdays."),
    ("Do small steps matter?", "Yes, they still move you forward.", "They are cheese."),
    ("When should I ask for help?", "When the task is too big.", "Ask the microwave."),
    ("Why write notes?", "To remember later.", "To melt the ice."),
    ("Why give clear instructions?", "They save time.", "They taste like lemons."),
    ("Why close the door in winter?", "To keep the heat in.", "So the moon can sleep."),
    ("How should I cut wood?", "Measure twice, cut once.", "Cut first, think never."),
    ("What does good tea need?", "Hot water and patience.", "A loud trumpet."),
    ("What do kind words do?", "They lighten a hard day.", "They are sold by weight."),
]

_THOUGHTS = [
    ("A warm room invites cooking.", "A flying teapot is nonsense."),
    ("Baking happens early.", "This ignores the question."),
    ("Midday heat evaporates water.", "Juice would harm the plants."),
    ("Dull blades slip.", "Soup is not a knife."),
    ("Preparation avoids mistakes.", "Burning is not a step."),
    ("Order saves searching.", "Clouds do not sing."),
    ("Walking lowers stress.", "Shoes cannot swim."),
    ("Labels remove doubt.", "Invisible ink defeats labels."),
    ("Tomatoes need light.", "Freezers kill plants."),
    ("Recovery supports effort.", "A bicycle is unrelated."),
    ("Hygiene prevents illness.", "Germs do not keep a calendar."),
    ("Progress adds up.", "Steps are not food."),
    ("Sharing work helps.", "Appliances do not advise."),
    ("Memory fades.", "Ice melts away."),
    ("Clarity avoids rework.", "Instructions have no flavour."),
    ("Doors keep warmth inside.", "The moon does not sleep."),
    ("Checking avoids waste.", "Skipping checks wastes wood."),
    ("Tea needs time to steep.", "Trumpets do not brew tea."),
    ("Kindness eases stress.", "Words are not sold."),
]

_N_TEST = 2  # rows held out for the "test" split, as on the Hub (19 rows, test_size=0.1)


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _split_and_save(ds, root: Path, config: str):
    from datasets import DatasetDict

    n = len(ds)
    splits = DatasetDict({"train": ds.select(range(n - _N_TEST)), "test": ds.select(range(n - _N_TEST, n))})
    (root / config).mkdir(parents=True, exist_ok=True)
    for split, part in splits.items():
        part.to_parquet(str(root / config / f"{split}-00000-of-00001.parquet"))
    return list(splits)


def _write_dataset_card(root: Path, configs: dict[str, list[str]]):
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split in splits:
            lines += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    lines += ["---", "", "Offline stand-in generated by trl_tokenpo's scripts/trl_compat/make_fixtures.py.", ""]
    (root / "README.md").write_text("\n".join(lines))


def build_zen(out: Path):
    from datasets import Dataset

    root = out / ORG / "zen"
    prompts = [p for p, _, _ in _PAIRS]
    chosen = [c for _, c, _ in _PAIRS]
    rejected = [r for _, _, r in _PAIRS]
    questions = [q for q, _, _ in _QUESTIONS]
    good = [c for _, c, _ in _QUESTIONS]
    bad = [r for _, _, r in _QUESTIONS]
    labels = [i % 3 != 1 for i in range(len(_PAIRS))]
    tables = {
        "standard_language_modeling": {"text": [p + c for p, c, _ in _PAIRS]},
        "standard_prompt_only": {"prompt": prompts},
        "standard_prompt_completion": {"prompt": prompts, "completion": chosen},
        "standard_preference": {"prompt": prompts, "chosen": chosen, "rejected": rejected},
        "standard_implicit_prompt_preference": {
            "chosen": [p + c for p, c in zip(prompts, chosen, strict=True)],
            "rejected": [p + r for p, r in zip(prompts, rejected, strict=True)],
        },
        "standard_unpaired_preference": {
            "prompt": prompts,
            "completion": [c if ok else r for c, r, ok in zip(chosen, rejected, labels, strict=True)],
            "label": labels,
        },
        "conversational_language_modeling": {
            "messages": [[_user(q), _assistant(a)] for q, a in zip(questions, good, strict=True)]
        },
        "conversational_prompt_only": {"prompt": [[_user(q)] for q in questions]},
        "conversational_prompt_completion": {
            "prompt": [[_user(q)] for q in questions],
            "completion": [[_assistant(a)] for a in good],
        },
        "conversational_preference": {
            "prompt": [[_user(q)] for q in questions],
            "chosen": [[_assistant(a)] for a in good],
            "rejected": [[_assistant(a)] for a in bad],
        },
        "conversational_implicit_prompt_preference": {
            "chosen": [[_user(q), _assistant(a)] for q, a in zip(questions, good, strict=True)],
            "rejected": [[_user(q), _assistant(a)] for q, a in zip(questions, bad, strict=True)],
        },
        "conversational_unpaired_preference": {
            "prompt": [[_user(q)] for q in questions],
            "completion": [[_assistant(g if ok else b)] for g, b, ok in zip(good, bad, labels, strict=True)],
            "label": labels,
        },
    }
    configs = {name: _split_and_save(Dataset.from_dict(cols), root, name) for name, cols in tables.items()}
    _write_dataset_card(root, configs)


def build_harmony(out: Path):
    from datasets import Dataset

    root = out / ORG / "harmony"
    efforts = ["low", "medium", "high"]
    identity = "You are Pocket Helper, a very small language model."
    rows = list(zip(_QUESTIONS, _THOUGHTS, strict=True))
    tables = {
        "preference": {
            "prompt": [[_user(q)] for (q, _, _), _ in rows],
            "chosen": [[{"role": "assistant", "thinking": tg, "content": g}] for (_, g, _), (tg, _) in rows],
            "rejected": [[{"role": "assistant", "thinking": tb, "content": b}] for (_, _, b), (_, tb) in rows],
            "chat_template_kwargs": [
                {"reasoning_effort": efforts[i % 3], "model_identity": identity} for i in range(len(rows))
            ],
        },
        "prompt_completion": {
            "prompt": [[_user(q)] for (q, _, _), _ in rows],
            "completion": [[{"role": "assistant", "thinking": tg, "content": g}] for (_, g, _), (tg, _) in rows],
            "chat_template_kwargs": [
                {"reasoning_effort": efforts[i % 3], "model_identity": identity} for i in range(len(rows))
            ],
        },
    }
    configs = {name: _split_and_save(Dataset.from_dict(cols), root, name) for name, cols in tables.items()}
    _write_dataset_card(root, configs)


def _tool_schema(name, description, params):
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {p: {"type": t, "description": d} for p, (t, d) in params.items()},
                "required": list(params),
            },
        },
    }


def build_toolcall(out: Path):
    from datasets import Dataset

    root = out / ORG / "toolcall"
    # (request, tool schema, call arguments, tool output, final answer, bad answer)
    cases = [
        (
            "Boil an egg timer for 6 minutes.",
            "set_timer",
            {"minutes": ("integer", "Length in minutes.")},
            {"minutes": 6},
            "{'status': 'started'}",
            "Your 6 minute timer is running.",
            "I cannot count.",
        ),
        (
            "How far is the bakery from here?",
            "get_distance",
            {"place": ("string", "Destination.")},
            {"place": "bakery"},
            "{'km': 1.2}",
            "The bakery is 1.2 km away.",
            "It is on the moon.",
        ),
        (
            "Dim the kitchen lights.",
            "set_light",
            {"room": ("string", "Room."), "level": ("integer", "Percent.")},
            {"room": "kitchen", "level": 30},
            "{'level': 30}",
            "The kitchen lights are at 30%.",
            "Lights are loud.",
        ),
        (
            "Will it rain in Porto tomorrow?",
            "get_forecast",
            {"city": ("string", "City."), "day": ("string", "Day.")},
            {"city": "Porto", "day": "tomorrow"},
            "{'rain': 0.7}",
            "Rain is likely in Porto tomorrow.",
            "Bring cake.",
        ),
        (
            "Add flour to my shopping list.",
            "add_item",
            {"item": ("string", "Item to add.")},
            {"item": "flour"},
            "{'ok': True}",
            "Flour is on your list.",
            "Flour is a planet.",
        ),
        (
            "Play a calm song.",
            "play_song",
            {"mood": ("string", "Mood of the song.")},
            {"mood": "calm"},
            "{'title': 'Still Water'}",
            "Playing Still Water.",
            "Here is a drum solo.",
        ),
        (
            "Remind me to water plants at 8.",
            "add_reminder",
            {"time": ("string", "When."), "note": ("string", "What.")},
            {"time": "08:00", "note": "water plants"},
            "'saved'",
            "Reminder saved for 8:00.",
            "Plants water you.",
        ),
        (
            "What is the oven temperature?",
            "read_oven",
            {},
            {},
            "{'celsius': 180}",
            "The oven is at 180 degrees.",
            "The oven is asleep.",
        ),
    ]
    prompts, chosen, rejected, tools = [], [], [], []
    for i, (request, name, params, args, result, answer, bad) in enumerate(cases):
        call = {"type": "function", "function": {"name": name, "arguments": args}}
        prompts.append([_user(request)])
        chosen.append(
            [
                {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "name": name, "content": result},
                _assistant(answer),
            ]
            if i % 2 == 0
            else [{"role": "assistant", "tool_calls": [call]}]
        )
        rejected.append([_assistant(bad)])
        tools.append([_tool_schema(name, f"Tool {name.replace('_', ' ')}.", params)])
    cols = {"prompt": prompts, "chosen": chosen, "rejected": rejected, "tools": tools}
    # Arguments and schemas differ from row to row: store those columns as JSON values.
    ds = Dataset.from_dict(cols, on_mixed_types="use_json")
    n = len(ds)
    root.mkdir(parents=True, exist_ok=True)
    (root / "preference").mkdir(exist_ok=True)
    ds.select(range(n - 1)).to_parquet(str(root / "preference" / "train-00000-of-00001.parquet"))
    ds.select(range(n - 1, n)).to_parquet(str(root / "preference" / "test-00000-of-00001.parquet"))
    _write_dataset_card(root, {"preference": ["train", "test"]})


def build_zen_image(out: Path, name="zen-image", n_images=1):
    from datasets import Dataset
    from PIL import Image

    root = out / ORG / name
    images, prompts, chosen, rejected = [], [], [], []
    for i, (q, g, b) in enumerate(_QUESTIONS):
        k = 1 + (i % n_images)
        images.append([Image.new("RGB", (16 + 4 * j, 16), ((40 * i) % 255, 90, 30 * j)) for j in range(k)])
        content = [{"type": "image"} for _ in range(k)] + [{"type": "text", "text": q}]
        prompts.append([{"role": "user", "content": content}])
        chosen.append([{"role": "assistant", "content": [{"type": "text", "text": g}]}])
        rejected.append([{"role": "assistant", "content": [{"type": "text", "text": b}]}])
    ds = Dataset.from_dict({"images": images, "prompt": prompts, "chosen": chosen, "rejected": rejected})
    configs = {"conversational_preference": _split_and_save(ds, root, "conversational_preference")}
    _write_dataset_card(root, configs)


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizers and chat templates (written for this harness)
# ----------------------------------------------------------------------------------------------------------------------

# ChatML-style template: system/user/assistant/tool roles, optional tools, tool calls, reasoning ("thinking") and
# `add_generation_prompt`. A default system turn is inserted when none is given, as Qwen2.5 does.
CHATML_TEMPLATE = textwrap.dedent(
    """\
    {%- macro text(content) -%}
    {%- if content is string -%}{{ content }}{%- elif content -%}
    {%- for part in content -%}{%- if part.type == 'text' -%}{{ part.text }}{%- endif -%}{%- endfor -%}
    {%- endif -%}
    {%- endmacro -%}
    {%- set has_system = messages and messages[0].role == 'system' -%}
    {{- '<|im_start|>system\\n' -}}
    {%- if has_system -%}{{- text(messages[0].content) -}}{%- else -%}{{- default_system -}}{%- endif -%}
    {%- if tools -%}
    {{- '\\n\\n# Tools\\n<tools>' -}}
    {%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}
    {{- '\\n</tools>' -}}
    {%- endif -%}
    {{- '<|im_end|>\\n' -}}
    {%- for message in messages -%}
    {%- if not (loop.first and has_system) -%}
    {%- if message.role == 'assistant' -%}
    {{- '<|im_start|>assistant\\n' -}}
    {%- if message.thinking -%}{{- '<think>\\n' + message.thinking + '\\n</think>\\n\\n' -}}{%- endif -%}
    {{- text(message.content) -}}
    {%- for call in (message.tool_calls or []) -%}
    {%- set fn = call.function if call.function is defined else call -%}
    {{- '\\n<tool_call>\\n{"name": "' + fn.name + '", "arguments": ' -}}
    {%- if fn.arguments is string -%}{{- fn.arguments -}}{%- else -%}{{- fn.arguments | tojson -}}{%- endif -%}
    {{- '}\\n</tool_call>' -}}
    {%- endfor -%}
    {{- '<|im_end|>\\n' -}}
    {%- elif message.role == 'tool' -%}
    {{- '<|im_start|>tool\\n' + text(message.content) + '<|im_end|>\\n' -}}
    {%- else -%}
    {{- '<|im_start|>' + message.role + '\\n' + text(message.content) + '<|im_end|>\\n' -}}
    {%- endif -%}
    {%- endif -%}
    {%- endfor -%}
    {%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}
    """
).replace("default_system", "'You are a tiny helpful assistant.'")

# Harmony-flavoured template (for the GPT-OSS stand-in): reasoning goes to an "analysis" channel, the answer to a
# "final" channel, and `reasoning_effort` / `model_identity` are read from the template kwargs.
HARMONY_TEMPLATE = textwrap.dedent(
    """\
    {%- macro text(content) -%}
    {%- if content is string -%}{{ content }}{%- elif content -%}
    {%- for part in content -%}{%- if part.type == 'text' -%}{{ part.text }}{%- endif -%}{%- endfor -%}
    {%- endif -%}
    {%- endmacro -%}
    {{- '<|start|>system<|message|>' + (model_identity or 'You are a tiny assistant.') -}}
    {{- '\\nReasoning: ' + (reasoning_effort or 'medium') + '<|end|>' -}}
    {%- if tools -%}
    {{- '<|start|>developer<|message|># Tools' -}}
    {%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}
    {{- '<|end|>' -}}
    {%- endif -%}
    {%- for message in messages -%}
    {%- if message.role == 'assistant' -%}
    {%- if message.thinking -%}
    {{- '<|start|>assistant<|channel|>analysis<|message|>' + message.thinking + '<|end|>' -}}
    {%- endif -%}
    {%- for call in (message.tool_calls or []) -%}
    {%- set fn = call.function if call.function is defined else call -%}
    {{- '<|start|>assistant to=functions.' + fn.name + '<|channel|>commentary json<|message|>' -}}
    {%- if fn.arguments is string -%}{{- fn.arguments -}}{%- else -%}{{- fn.arguments | tojson -}}{%- endif -%}
    {{- '<|call|>' -}}
    {%- endfor -%}
    {%- if message.content -%}
    {{- '<|start|>assistant<|channel|>final<|message|>' + text(message.content) -}}
    {{- '<|return|>' if loop.last else '<|end|>' -}}
    {%- endif -%}
    {%- elif message.role == 'tool' -%}
    {{- '<|start|>functions.' + (message.name or 'tool') + ' to=assistant<|message|>' -}}
    {{- text(message.content) + '<|end|>' -}}
    {%- else -%}
    {{- '<|start|>' + message.role + '<|message|>' + text(message.content) + '<|end|>' -}}
    {%- endif -%}
    {%- endfor -%}
    {%- if add_generation_prompt -%}{{- '<|start|>assistant' -}}{%- endif -%}
    """
)

CHATML_SPECIALS = {"pad": "<|endoftext|>", "eos": "<|im_end|>", "bos": None, "extra": ["<|im_start|>"]}
HARMONY_SPECIALS = {
    "pad": "<|endoftext|>",
    "eos": "<|return|>",
    "bos": "<|startoftext|>",
    "extra": ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|call|>"],
}
BOS_CHATML_SPECIALS = {"pad": "<|pad|>", "eos": "<|im_end|>", "bos": "<|startoftext|>", "extra": ["<|im_start|>"]}


def _corpus():
    lines = []
    for p, c, r in _PAIRS:
        lines += [p + c, p + r]
    for q, g, b in _QUESTIONS:
        lines += [q, g, b]
    for tg, tb in _THOUGHTS:
        lines += [tg, tb]
    lines += [
        "system user assistant tool analysis final commentary developer functions Reasoning",
        "You are a tiny helpful assistant. You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        '<tools> </tools> <tool_call> </tool_call> <think> </think> {"name": "arguments": "type": "function"}',
        "This is a very long prompt that fills up the whole max_length budget on its own. Hi there bye yes no",
        "The quick brown fox jumps over the lazy dog. 0123456789 %:;,.!?()[]{}'\"-_/\\+=*&^$#@~`|<>",
    ]
    return lines * 3


_TOKENIZER_CACHE: dict[tuple, object] = {}


def _backend_tokenizer(specials: dict, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    key = (tuple(specials["extra"]), specials["pad"], specials["eos"], specials["bos"], vocab_size)
    if key not in _TOKENIZER_CACHE:
        special_tokens = [t for t in [specials["pad"], specials["eos"], specials["bos"], *specials["extra"]] if t]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=special_tokens,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_corpus(), trainer=trainer)
        _TOKENIZER_CACHE[key] = tok.to_str()
    return Tokenizer.from_str(_TOKENIZER_CACHE[key])


def save_tokenizer(path: Path, specials: dict, chat_template: str, vocab_size: int = 640):
    """Save a byte-level BPE tokenizer with the given special tokens and chat template; return it."""
    from transformers import PreTrainedTokenizerFast

    kwargs = {"eos_token": specials["eos"], "pad_token": specials["pad"]}
    if specials["bos"]:
        kwargs["bos_token"] = specials["bos"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_backend_tokenizer(specials, vocab_size),
        additional_special_tokens=list(specials["extra"]),
        chat_template=chat_template,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
    tokenizer.save_pretrained(str(path))
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# Tiny models
# ----------------------------------------------------------------------------------------------------------------------

_COMMON = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def _model_specs():
    """hub name -> (config class name, config kwargs, specials, chat template)."""
    return {
        "tiny-Qwen2ForCausalLM-2.5": (
            "Qwen2Config",
            {**_COMMON, "hidden_size": 8, "intermediate_size": 32, "tie_word_embeddings": False},
            CHATML_SPECIALS,
            CHATML_TEMPLATE,
        ),
        "tiny-Cohere2ForCausalLM": (
            "Cohere2Config",
            {
                **_COMMON,
                "intermediate_size": 32,
                "sliding_window": 64,
                "layer_types": ["sliding_attention", "full_attention"],
            },
            BOS_CHATML_SPECIALS,
            CHATML_TEMPLATE,
        ),
        "tiny-Glm4MoeForCausalLM": (
            "Glm4MoeConfig",
            {
                **_COMMON,
                "intermediate_size": 32,
                "moe_intermediate_size": 16,
                "n_routed_experts": 4,
                "n_shared_experts": 1,
                "num_experts_per_tok": 2,
                "n_group": 1,
                "topk_group": 1,
                "first_k_dense_replace": 1,
            },
            CHATML_SPECIALS,
            CHATML_TEMPLATE,
        ),
        "tiny-GptOssForCausalLM": (
            "GptOssConfig",
            {
                **_COMMON,
                "intermediate_size": 16,
                "head_dim": 8,
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "sliding_window": 64,
                "layer_types": ["sliding_attention", "full_attention"],
            },
            HARMONY_SPECIALS,
            HARMONY_TEMPLATE,
        ),
        "tiny-Qwen3MoeForCausalLM": (
            "Qwen3MoeConfig",
            {
                **_COMMON,
                "intermediate_size": 32,
                "moe_intermediate_size": 16,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "head_dim": 8,
            },
            CHATML_SPECIALS,
            CHATML_TEMPLATE,
        ),
        "tiny-NemotronHForCausalLM-nano": (
            "NemotronHConfig",
            {
                "hidden_size": 16,
                "layers_block_type": ["mamba", "attention", "moe"],
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 4,
                "intermediate_size": 32,
                "ssm_state_size": 8,
                "mamba_num_heads": 4,
                "mamba_head_dim": 8,
                "n_groups": 1,
                "chunk_size": 16,
                "n_routed_experts": 4,
                "n_shared_experts": 1,
                "moe_intermediate_size": 16,
                "moe_shared_expert_intermediate_size": 16,
                "num_experts_per_tok": 2,
                "n_group": 1,
                "topk_group": 1,
            },
            BOS_CHATML_SPECIALS,
            CHATML_TEMPLATE,
        ),
        "tiny-Olmo3ForCausalLM": (
            "Olmo3Config",
            {
                **_COMMON,
                "intermediate_size": 32,
                "sliding_window": 64,
                "layer_types": ["sliding_attention", "full_attention"],
            },
            CHATML_SPECIALS,
            CHATML_TEMPLATE,
        ),
        "tiny-Lfm2ForCausalLM": (
            "Lfm2Config",
            {**_COMMON, "intermediate_size": 32, "layer_types": ["conv", "full_attention"]},
            BOS_CHATML_SPECIALS,
            CHATML_TEMPLATE,
        ),
        "tiny-Lfm2ForCausalLM-2.5": (
            "Lfm2Config",
            {**_COMMON, "intermediate_size": 32, "layer_types": ["full_attention", "conv"]},
            BOS_CHATML_SPECIALS,
            CHATML_TEMPLATE,
        ),
    }


def _token_ids(tokenizer):
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    ids["bos_token_id"] = tokenizer.bos_token_id
    return ids


def _init_tiny_weights(model):
    """Deterministic, NaN-free init: Xavier-uniform linear/conv weights, zero biases, N(0, 0.02) embeddings."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 0.02)


def build_model(out: Path, name: str):
    import torch
    import transformers

    config_cls, kwargs, specials, template = _model_specs()[name]
    path = out / ORG / name
    tokenizer = save_tokenizer(path, specials, template)
    config = getattr(transformers, config_cls)(vocab_size=len(tokenizer), **_token_ids(tokenizer), **kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _init_tiny_weights(model)
    model = model.to(torch.bfloat16)  # the Hub's tiny test checkpoints are stored in bfloat16
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(path))


# A model whose code lives in the checkpoint directory (loaded only with `trust_remote_code=True`).
_REMOTE_CONFIG_PY = """\
from transformers import Qwen2Config


class RemoteConfig(Qwen2Config):
    model_type = "remote"
"""

_REMOTE_MODELING_PY = """\
from transformers import Qwen2ForCausalLM

from .configuration_remote import RemoteConfig


class RemoteForCausalLM(Qwen2ForCausalLM):
    config_class = RemoteConfig
"""


def build_remote_model(out: Path):
    import torch
    import transformers

    path = out / ORG / "tiny-RemoteForCausalLM"
    tokenizer = save_tokenizer(path, CHATML_SPECIALS, CHATML_TEMPLATE)
    cfg = transformers.Qwen2Config(
        vocab_size=len(tokenizer), intermediate_size=32, tie_word_embeddings=False, **_token_ids(tokenizer), **_COMMON
    )
    model = transformers.Qwen2ForCausalLM(cfg)
    _init_tiny_weights(model)
    model = model.to(torch.bfloat16)
    model.save_pretrained(str(path))
    (path / "configuration_remote.py").write_text(_REMOTE_CONFIG_PY)
    (path / "modeling_remote.py").write_text(_REMOTE_MODELING_PY)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "remote"
    config["architectures"] = ["RemoteForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "configuration_remote.RemoteConfig",
        "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))


# ----------------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------------

# Hub ids used by TRL's DPO tests that are deliberately NOT provided (vision-language models, gated models, kernels).
NOT_PROVIDED = [
    "google/gemma-3n-E2B-it",
    "kernels-community/flash-attn2",
    "trl-internal-testing/tiny-Gemma3ForConditionalGeneration",
    "trl-internal-testing/tiny-Gemma4ForConditionalGeneration",
    "trl-internal-testing/tiny-Idefics2ForConditionalGeneration",
    "trl-internal-testing/tiny-Idefics3ForConditionalGeneration",
    "trl-internal-testing/tiny-LlavaForConditionalGeneration",
    "trl-internal-testing/tiny-LlavaNextForConditionalGeneration",
    "trl-internal-testing/tiny-Qwen2VLForConditionalGeneration",
    "trl-internal-testing/tiny-Qwen2_5_VLForConditionalGeneration",
    "trl-internal-testing/tiny-Qwen3VLForConditionalGeneration",
    "trl-internal-testing/tiny-Qwen3_5ForConditionalGeneration-NoThink",
    "trl-internal-testing/tiny-Qwen3_5MoeForConditionalGeneration-3.6",
    "trl-internal-testing/tiny-SmolVLMForConditionalGeneration",
    "trl-internal-testing/zen-multi-image",
]


def builders():
    """hub id -> function(out_dir) that builds it."""
    table = {
        f"{ORG}/zen": build_zen,
        f"{ORG}/zen-image": build_zen_image,
        f"{ORG}/harmony": build_harmony,
        f"{ORG}/toolcall": build_toolcall,
        f"{ORG}/tiny-RemoteForCausalLM": build_remote_model,
    }
    for name in _model_specs():
        table[f"{ORG}/{name}"] = lambda out, name=name: build_model(out, name)
    return table


def make_fixtures(out_dir: str | os.PathLike, only: list[str] | None = None, verbose: bool = True) -> list[str]:
    """Build the stand-ins under ``out_dir``; return the hub ids built."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = builders()
    unknown = sorted(set(only or []) - set(table))
    if unknown:
        raise SystemExit(f"unknown fixture ids: {unknown}")
    done = []
    for hub_id, build in table.items():
        if only and hub_id not in only:
            continue
        if verbose:
            print(f"[make_fixtures] {hub_id}", file=sys.stderr)
        build(out)
        done.append(hub_id)
    return done


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="directory to create the <org>/<name> stand-ins in")
    parser.add_argument("--only", nargs="+", help="build only these hub ids")
    parser.add_argument("--list", action="store_true", help="print the hub ids provided and not provided, then exit")
    args = parser.parse_args(argv)
    if args.list:
        print("provided:", *builders(), sep="\n  ")
        print("not provided:", *NOT_PROVIDED, sep="\n  ")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    make_fixtures(args.out_dir, args.only)


if __name__ == "__main__":
    main()
