"""Shared fixtures: a tiny causal LM and a word-level tokenizer built locally (no network), and small datasets."""

from __future__ import annotations

import os

import pytest
import torch
from datasets import Dataset


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU, the Triton kernels of `trl_tokenpo.kernels` are tested in Triton's interpreter on CPU tensors. It must
# be switched on before `triton` is first imported (`import torch` does not import it; trl does).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(2)

WORDS = (
    "the a an is are was good bad great terrible kind rude helpful harmful answer question please thanks "
    "yes no maybe sky blue green red water fire tree house cat dog runs jumps sleeps quickly slowly very not "
    "and or but because what why how when where who i you we they it this that"
).split()

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS + ["?", ".", ","])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, seed: int = 0, hidden_size: int = 32):
    # Llama rather than Qwen2: transformers 5 forces Qwen2Tokenizer on any directory whose config says qwen2, which
    # would replace this word-level tokenizer when a trainer reloads it from the saved path.
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: as fast as two on an idle machine, far faster on a busy one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama model + tokenizer; pass the path as `model` so TRL can also load the reference from it."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


PROMPTS = ["what is the sky ?", "why is the cat rude ?", "how are you ?", "where is the dog ?", "who runs quickly ?"]
# Completions start with a space, as in real datasets: TRL concatenates prompt and completion strings
CHOSEN = [" the sky is blue .", " the cat is not rude .", " very good thanks .", " the dog sleeps .", " the cat runs ."]
REJECTED = [" fire .", " because it is bad and terrible", " no .", " it is red and green and blue", " i"]


def preference_rows(n: int = 8):
    return [
        {"prompt": PROMPTS[i % len(PROMPTS)], "chosen": CHOSEN[i % len(CHOSEN)], "rejected": REJECTED[i % len(REJECTED)]}
        for i in range(n)
    ]


@pytest.fixture
def standard_dataset():
    return Dataset.from_list(preference_rows())


@pytest.fixture
def conversational_dataset():
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
                "rejected": [{"role": "assistant", "content": r["rejected"].strip()}],
            }
            for r in preference_rows()
        ]
    )


@pytest.fixture
def implicit_prompt_dataset():
    return Dataset.from_list(
        [
            {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
            for r in preference_rows()
        ]
    )


def cpu_args(config_class, output_dir, **kwargs):
    """A trainer config for this CPU machine: float32, no gradient checkpointing, no reporting, quiet."""
    defaults = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-3,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    defaults.update(kwargs)
    return config_class(**defaults)
