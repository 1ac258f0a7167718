#!/usr/bin/env python
"""Speed and memory of the token-level trainers next to `trl.DPOTrainer`, on identical models, data and batches.

What is measured
----------------
For every trainer (``dpo`` = ``trl.DPOTrainer`` with the sigmoid loss, ``tdpo1``, ``tdpo2``, ``tisdpo-none``,
``tisdpo-none-precomputed`` (``precompute_ref_log_probs=True``: no reference model kept, no reference forward),
``tisdpo-reverse``, ``tisdpo-tdpo``) the script builds, in a FRESH subprocess, the same randomly initialised causal LM
(seeded), a copy of it as the reference model, the same synthetic preference batch, and times

    trainer.training_step(model, batch)   # forward of policy + reference, loss, backward
    optimizer.step(); optimizer.zero_grad()

``--warmup`` times, then ``--steps`` times (the median of the timed steps is the step time). Memory:

* CPU: the process's resident set. ``peak`` is the high-water mark (``VmHWM``, i.e. ``getrusage`` ``ru_maxrss``) over
  the whole run, ``above setup`` subtracts the resident memory right after the model, the reference and the trainer
  are built (so it holds gradients, optimizer state, activations and the loss computation's temporaries), and
  ``step transient`` is the high-water mark of the timed steps alone (reset through ``/proc/self/clear_refs`` after the
  warm-up) minus the resident memory just before them. Workers run with ``MALLOC_MMAP_THRESHOLD_`` fixed so that
  freed large buffers go back to the OS and the resident set follows live memory.
* CUDA: ``torch.cuda.max_memory_allocated`` (reset after the warm-up), and the same minus the memory allocated after
  setup.

The trainers run interleaved over ``--rounds`` rounds (round 1: every trainer once, round 2: again, ...), so that a
drift of the machine's load hits all of them alike; a trainer's ratio to DPO is the median over rounds of its step
time (memory) divided by DPO's in the same round.

Data: a word-level tokenizer over a fixed vocabulary (``w0 w1 ...``, one token per word, no BOS), so that a text of
``k`` random words is exactly ``k`` tokens. Each pair has a prompt of ``seq_len // 4`` tokens and two completions that
fill the rest of ``seq_len`` together with the EOS TRL appends: every row has exactly ``seq_len`` tokens and there is
no padding. TIS-DPO gets random per-token weights (``chosen_weights`` / ``rejected_weights``) aligned with TRL's
tokenization.

Sizes (``--size``): ``tiny`` (a smoke test, about two minutes: one process per trainer), ``cpu`` (vocabulary 32k,
hidden 256, 4 layers, sequence 256, 2 pairs, 1 thread per worker: about 100 s per worker process, i.e. 22 minutes for
2 rounds on a 2-core machine under a load average of 6, less when idle; the LM head is 8.2M of the model's 13M
parameters, so the loss computation weighs as much as it does for a 0.5B model with a 150k vocabulary), ``gpu`` (Qwen2.5-0.5B-shaped: vocabulary 151936, hidden 896, 24 layers, 14 / 2 heads, intermediate 4864,
tied embeddings, sequence 1024, 4 pairs, bf16, LoRA r=16 on every linear layer with the adapter-disabled model as
reference; CUDA only; ``scripts/gpu_check.sh`` runs it), ``gpu-2k`` (the same model, 8 pairs x 2,048 tokens),
``gpu-llama8b`` (Llama-3.1-8B's layer and head shapes: hidden 4096, vocabulary 128,256, 32 / 8 heads, intermediate
14,336, with 2 of its layers; 4 pairs x 1,024, bf16, LoRA), ``tiny-lora`` (the ``gpu`` code path at the tiny shape,
for a CPU smoke test). The ``gpu*`` models are initialised on the GPU. ``--scaling`` times TDPO2 against DPO as the
sequence doubles from 256 to 2048 tokens on a smaller model.

``--in-process`` runs every trainer in ONE worker process instead, each on its own copy of the model and the same
batch, interleaved round by round; per round and trainer: the median of ``--steps`` timed steps, then one step under
``torch.profiler``. On CUDA that step gives the GPU time (the durations of everything that ran on the GPU, summed) and
the host syncs (calls that wait for the device, and the host time in them); without a GPU, the operators' CPU time.
The table gives min and median over rounds, and the ratios to DPO (min / DPO's min; median of same-round ratios);
memory is the step peak above the memory allocated before the timed steps. ``scripts/gpu_check.sh`` runs it at
``gpu``, ``gpu-2k`` and ``gpu-llama8b``.

Usage::

    python scripts/benchmark_speed.py --size tiny
    python scripts/benchmark_speed.py --size cpu --rounds 3 --write-docs
    python scripts/benchmark_speed.py --scaling --write-docs
    python scripts/benchmark_speed.py --size cpu --only-estimator --write-docs   # estimator throughput and memory
    python scripts/benchmark_speed.py --size gpu --write-docs          # on a CUDA machine
    python scripts/benchmark_speed.py --size gpu --no-estimator --markdown outputs/gpu.md   # block to paste
    python scripts/benchmark_speed.py --size gpu --in-process --trainers dpo tdpo2 tisdpo-reverse --json out.json
    python scripts/benchmark_speed.py --size tiny-lora --in-process --rounds 2   # the same code path on a CPU

``--write-docs`` replaces the matching part of the ``## Speed`` section of ``docs/benchmarks.md`` (and creates the
section, or the file, when missing) with the table, the machine and the exact command.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
RESULT_TAG = "BENCH_RESULT "

TRAINERS = ("dpo", "tdpo1", "tdpo2", "tisdpo-none", "tisdpo-reverse", "tisdpo-tdpo", "tisdpo-none-precomputed")
SCALING_TRAINERS = ("dpo", "tdpo2")
SCALING_LENGTHS = (256, 512, 1024, 2048)
ESTIMATOR_ROWS = ("forward-x2", "estimator-prompt", "estimator-adapters")
# Peak memory of the estimator (fit + score, LoRA r16) next to the trainer that uses its weights (LoRA r16), same data
MEMORY_ROWS = ("tisdpo-lora", "tdpo2-lora", "estimator-sft", "estimator-dpo")

# Targets of the issue: (max time ratio, max memory ratio) to DPO
TARGETS = {
    "tdpo2": (1.25, 1.10),
    "tisdpo-reverse": (1.25, 1.10),
    "tisdpo-tdpo": (1.25, 1.10),
    "tisdpo-none": (1.05, 1.02),
    # no reference forward and no reference model in memory: <= 0.75x DPO's step time, memory below DPO's
    "tisdpo-none-precomputed": (0.75, 1.0),
}
# On CUDA the fused (Triton) path of the KL trainers is held to a tighter step-time goal than on CPU
CUDA_TIME_TARGETS = {"tdpo2": 1.10, "tisdpo-reverse": 1.10, "tisdpo-tdpo": 1.10}
ESTIMATOR_TARGET = 0.8  # estimator tokens/s >= 0.8x those of two plain forward passes


@dataclasses.dataclass(frozen=True)
class Size:
    """A model shape and a batch shape."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    seq_len: int
    pairs: int
    architecture: str = "llama"  # "llama" or "qwen2"
    tie_embeddings: bool = False
    bf16: bool = False
    # LoRA on every linear layer of the backbone (r=16, alpha=32); the reference is the model with the adapter disabled
    lora: bool = False
    # with CUDA, the model is initialised on the GPU (a random init of a large model on the CPU takes long)
    init_on_gpu: bool = False

    def describe(self) -> str:
        return (
            f"{self.architecture}, vocab {self.vocab_size}, hidden {self.hidden_size}, {self.num_layers} layers, "
            f"{self.num_heads}/{self.num_kv_heads} heads, intermediate {self.intermediate_size}, "
            f"{'tied' if self.tie_embeddings else 'untied'} embeddings, sequence {self.seq_len} tokens, "
            f"{self.pairs} pairs per batch ({2 * self.pairs} rows), {'bf16' if self.bf16 else 'float32'}"
            + (", LoRA r=16 on all linear layers (reference: adapter disabled)" if self.lora else "")
        )


SIZES = {
    "tiny": Size(vocab_size=512, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                 seq_len=64, pairs=2),
    "cpu": Size(vocab_size=32000, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=688,
                seq_len=256, pairs=2),
    "gpu": Size(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                intermediate_size=4864, seq_len=1024, pairs=4, architecture="qwen2", tie_embeddings=True, bf16=True,
                lora=True, init_on_gpu=True),
    # the `gpu` model on a longer, larger batch: 8 pairs x 2,048 tokens
    "gpu-2k": Size(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                   intermediate_size=4864, seq_len=2048, pairs=8, architecture="qwen2", tie_embeddings=True, bf16=True,
                   lora=True, init_on_gpu=True),
    # Llama-3.1-8B's layer and head shapes (hidden 4096, vocabulary 128,256, 32 / 8 heads) with 2 of its 32 layers:
    # its LM head (the part this package changes) at full size, on a step that fits a short check
    "gpu-llama8b": Size(vocab_size=128256, hidden_size=4096, num_layers=2, num_heads=32, num_kv_heads=8,
                        intermediate_size=14336, seq_len=1024, pairs=4, bf16=True, lora=True, init_on_gpu=True),
    # the code path of `gpu` (LoRA, tied embeddings, qwen2) at the tiny shape, for a CPU smoke test
    "tiny-lora": Size(vocab_size=512, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                      seq_len=64, pairs=2, architecture="qwen2", tie_embeddings=True, lora=True),
    # --scaling: the sequence length is overridden per run
    "scaling": Size(vocab_size=32000, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=344, seq_len=256, pairs=1),
    "scaling-tiny": Size(vocab_size=512, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=64, seq_len=32, pairs=1),
}


# ----------------------------------------------------------------------------------------------------------------------
# Worker side: one trainer, one process
# ----------------------------------------------------------------------------------------------------------------------


def _quiet_environment() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    os.environ.setdefault("ACCELERATE_LOG_LEVEL", "error")
    import warnings

    warnings.filterwarnings("ignore")


def _rss_mib(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process in MiB (Linux), else ``None``."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the resident-set high-water mark to the current resident set (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    hwm = _rss_mib("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _mark_memory(cuda: bool) -> tuple[float, bool]:
    """The memory in use now (MiB: allocated on CUDA, else the resident set), with the high-water mark reset to it;
    and whether the reset worked."""
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20, True
    return _rss_mib("VmRSS") or 0.0, _reset_peak_rss()


def _peak_since_mark(cuda: bool, reset: bool) -> float:
    """The high-water mark (MiB) since `_mark_memory`; NaN where the resident set's mark could not be reset."""
    if cuda:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return _peak_rss_mib() if reset else float("nan")


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer over ``vocab_size`` entries: ``<pad> <eos> <unk> w0 w1 ...``, one token per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def build_model(size: Size, tokenizer, seed: int):
    """A randomly initialised causal LM of the given shape (the same weights for the same seed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = (Qwen2Config, Qwen2ForCausalLM) if size.architecture == "qwen2" else (
        LlamaConfig, LlamaForCausalLM)
    config = config_class(
        vocab_size=size.vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads,
        max_position_embeddings=max(4096, size.seq_len),
        tie_word_embeddings=size.tie_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    if size.init_on_gpu and torch.cuda.is_available():
        torch.cuda.manual_seed(seed)
        with torch.device("cuda"):
            model = model_class(config)
    else:
        model = model_class(config)
    if size.bf16:
        model = model.to(torch.bfloat16)
    return model


def build_dataset(size: Size, seed: int):
    """``size.pairs`` preference pairs of random words; every tokenized row has exactly ``size.seq_len`` tokens."""
    import torch
    from datasets import Dataset

    prompt_len = size.seq_len // 4
    completion_len = size.seq_len - prompt_len - 1  # TRL appends EOS to each completion
    num_words = size.vocab_size - 3
    gen = torch.Generator().manual_seed(seed)

    def text(n: int) -> str:
        return " ".join(f"w{i}" for i in torch.randint(num_words, (n,), generator=gen).tolist())

    rows = [
        {"prompt": text(prompt_len), "chosen": " " + text(completion_len), "rejected": " " + text(completion_len)}
        for _ in range(size.pairs)
    ]
    return Dataset.from_list(rows)


def with_random_weights(dataset, tokenizer, seed: int):
    """Add ``chosen_weights`` / ``rejected_weights``: one random weight in [0.2, 2.2] per token of TRL's completion."""
    import torch

    from trl_tokenpo.data import tokenize_preference_dataset

    ids = tokenize_preference_dataset(dataset, tokenizer)
    gen = torch.Generator().manual_seed(seed + 1)
    chosen = [(0.2 + 2 * torch.rand(len(x), generator=gen)).tolist() for x in ids["chosen_ids"]]
    rejected = [(0.2 + 2 * torch.rand(len(x), generator=gen)).tolist() for x in ids["rejected_ids"]]
    return dataset.add_column("chosen_weights", chosen).add_column("rejected_weights", rejected)


def build_trainer(name: str, model, ref_model, tokenizer, dataset, size: Size, output_dir: str, seed: int):
    """The trainer ``name`` with the shared settings; only the method's own options differ."""
    import torch
    from trl import DPOConfig, DPOTrainer

    from trl_tokenpo import TDPOConfig, TDPOTrainer, TISDPOConfig, TISDPOTrainer

    cuda = torch.cuda.is_available()
    peft_config = None
    if size.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    common = dict(
        output_dir=output_dir,
        use_cpu=not cuda,
        bf16=size.bf16 and cuda,
        gradient_checkpointing=False,
        report_to="none",
        per_device_train_batch_size=size.pairs,
        max_length=None,
        max_steps=1000,
        logging_steps=10**6,
        save_strategy="no",
        learning_rate=1e-5,
        seed=seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    if name == "dpo":
        return DPOTrainer(model=model, ref_model=ref_model, args=DPOConfig(**common), train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config)
    if name in ("tdpo1", "tdpo2"):
        return TDPOTrainer(model=model, ref_model=ref_model, args=TDPOConfig(**common, tdpo_variant=name),
                           train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
    if name == "tisdpo-none-precomputed":
        # the reference's weighted sums are computed once at construction; no reference model is kept
        return TISDPOTrainer(model=model, ref_model=None, args=TISDPOConfig(**common, precompute_ref_log_probs=True),
                             train_dataset=with_random_weights(dataset, tokenizer, seed), processing_class=tokenizer,
                             peft_config=peft_config)
    if name.startswith("tisdpo-"):
        kl_term = name.split("-", 1)[1]
        return TISDPOTrainer(model=model, ref_model=ref_model, args=TISDPOConfig(**common, tis_kl_term=kl_term),
                             train_dataset=with_random_weights(dataset, tokenizer, seed), processing_class=tokenizer,
                             peft_config=peft_config)
    raise ValueError(f"unknown trainer {name!r}")


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclasses.dataclass
class TrainerStep:
    """One trainer ready to step on its batch: ``run()`` is one optimizer step (``training_step`` + ``optimizer.step``
    + ``zero_grad``), ``timed()`` the same waited for on the device and timed (wall and process CPU seconds)."""

    name: str
    trainer: object
    batch: dict
    optimizer: object
    tokens: int
    scored_tokens: int

    def run(self):
        loss = self.trainer.training_step(self.trainer.model, self.batch)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def timed(self) -> tuple[float, float]:
        import torch

        start, start_cpu = time.perf_counter(), time.process_time()
        loss = self.run()
        _synchronize()
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.name}: non-finite loss {loss.item()}")
        return wall, cpu


def prepare_step(name: str, model, tokenizer, dataset, size: Size, output_dir: str, seed: int) -> TrainerStep:
    """The trainer ``name`` on ``model`` (a reference copy is made unless LoRA or precomputed), its first batch on the
    device and its optimizer."""
    import copy

    # LoRA: the reference is the model with the adapter disabled, as TRL does it; no copy
    ref_model = None if name.endswith("-precomputed") or size.lora else copy.deepcopy(model)
    trainer = build_trainer(name, model, ref_model, tokenizer, dataset, size, output_dir, seed)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    optimizer = trainer.create_optimizer()
    # What `Trainer.train()` sets before its loop and `training_step` reads
    trainer.current_gradient_accumulation_steps = 1
    return TrainerStep(name, trainer, batch, optimizer, tokens=int(batch["attention_mask"].sum()),
                       scored_tokens=int(batch["completion_mask"][:, 1:].sum()))


def run_trainer_worker(name: str, size: Size, warmup: int, steps: int, seed: int) -> dict:
    """Build everything for one trainer, run ``warmup`` + ``steps`` optimizer steps on one batch, and measure."""
    import torch

    cuda = torch.cuda.is_available()
    tokenizer = build_tokenizer(size.vocab_size)
    model = build_model(size, tokenizer, seed)
    dataset = build_dataset(size, seed)
    with tempfile.TemporaryDirectory() as output_dir:
        prepared = prepare_step(name, model, tokenizer, dataset, size, output_dir, seed)
        step, tokens, scored = prepared.timed, prepared.tokens, prepared.scored_tokens
        _synchronize()
        if cuda:
            setup_mem = torch.cuda.memory_allocated() / 2**20
        else:
            setup_mem = _rss_mib("VmRSS") or _peak_rss_mib()
        for _ in range(warmup):
            step()
        before_steps, reset = _mark_memory(cuda)
        timings = [step() for _ in range(steps)]
        times, cpu_times = [t[0] for t in timings], [t[1] for t in timings]
        step_peak = _peak_since_mark(cuda, reset)
        peak = step_peak if cuda else max(_peak_rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {
        "trainer": name,
        "step_time_s": statistics.median(times),
        "step_times_s": times,
        "cpu_time_s": statistics.median(cpu_times),
        "cpu_times_s": cpu_times,
        "peak_mib": peak,
        "setup_mib": setup_mem,
        "above_setup_mib": peak - setup_mem,
        "step_transient_mib": step_peak - before_steps,
        "tokens": tokens,
        "scored_tokens": scored,
        "memory_kind": "cuda_max_allocated" if cuda else "rss",
    }


# Host calls that wait for the device, as the profiler names them (CUDA runtime events on the CPU side)
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
# The profiled step's own span (a `record_function` range): the profiler synchronizes the device when it stops, after it
STEP_LABEL = "benchmark_speed:step"


def device_time_totals(events, cuda: bool) -> dict:
    """Totals of one profiled step from ``torch.profiler`` events (``prof.events()``).

    CUDA: ``device_ms`` sums the duration of every event that ran on the GPU (kernels, copies, sets: the GPU's work,
    however the host launched it), ``syncs`` counts the host calls that wait for the device (``SYNC_CALLS``) inside
    the step's span (``STEP_LABEL``; the profiler's own synchronize when it stops comes after it) and ``sync_ms`` is
    the host time spent in them. CPU (no device): ``device_ms`` is the CPU time of the operators (their self times
    summed; annotated ranges, the step's span among them, left out), the work the step asks of the CPU; there are no
    syncs.
    """
    from torch.autograd import DeviceType

    cpu_events = [e for e in events if e.device_type == DeviceType.CPU]
    span = next((e.time_range for e in cpu_events if e.name == STEP_LABEL), None)
    if cuda:
        # (annotated ranges, ours and any library's, also appear on the GPU's timeline: they are not work; torch's
        # own profiler tables leave them out the same way)
        device_us = sum(e.time_range.end - e.time_range.start for e in events if e.device_type == DeviceType.CUDA
                        and not getattr(e, "is_user_annotation", False) and e.name != STEP_LABEL)  # fmt: skip
        syncs = [e for e in cpu_events if e.name in SYNC_CALLS
                 and (span is None or span.start <= e.time_range.start and e.time_range.end <= span.end)]  # fmt: skip
        return {"device_ms": device_us / 1e3, "syncs": len(syncs),
                "sync_ms": sum(e.time_range.end - e.time_range.start for e in syncs) / 1e3}
    cpu_us = sum(e.self_cpu_time_total for e in cpu_events
                 if not getattr(e, "is_user_annotation", False) and e.name != STEP_LABEL)  # fmt: skip
    return {"device_ms": cpu_us / 1e3, "syncs": None, "sync_ms": None}


def profiled_step(prepared: TrainerStep, cuda: bool) -> dict:
    """One optimizer step under ``torch.profiler`` (CPU activity, and CUDA's with a GPU): ``device_time_totals``."""
    from torch.profiler import ProfilerActivity, profile, record_function

    _synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        with record_function(STEP_LABEL):
            prepared.run()  # no synchronize of ours: the host waits only where the step itself makes it wait
    return device_time_totals(prof.events(), cuda)


def run_interleaved_worker(names, size: Size, rounds: int, warmup: int, steps: int, seed: int) -> dict:
    """Every trainer of ``names`` in this one process, each on its own copy of the same model and the same batch,
    interleaved round by round: per round and trainer, ``steps`` timed steps (their median is the round's step time),
    then one step under ``torch.profiler`` (its GPU time, or its operators' CPU time without a GPU) and the step
    peak: the high-water mark of the timed steps above the memory allocated before them (the other trainers' models
    are the same for all). ``warmup`` steps per trainer before the first round."""
    import copy

    import torch

    cuda = torch.cuda.is_available()
    tokenizer = build_tokenizer(size.vocab_size)
    base = build_model(size, tokenizer, seed)
    dataset = build_dataset(size, seed)
    results = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as output_dir:
        prepared = [prepare_step(name, copy.deepcopy(base), tokenizer, dataset, size, os.path.join(output_dir, name),
                                 seed) for name in names]  # fmt: skip
        del base
        for step in prepared:
            for _ in range(warmup):
                step.timed()
        for round_index in range(rounds):
            for step in prepared:
                _synchronize()
                before, reset = _mark_memory(cuda)
                timings = [step.timed() for _ in range(steps)]
                transient = _peak_since_mark(cuda, reset) - before
                results[step.name].append({
                    "trainer": step.name, "round": round_index, "step_time_s": statistics.median(t[0] for t in timings),
                    "step_times_s": [t[0] for t in timings], "cpu_time_s": statistics.median(t[1] for t in timings),
                    "step_transient_mib": transient, "tokens": step.tokens, "scored_tokens": step.scored_tokens,
                    "memory_kind": "cuda_max_allocated" if cuda else "rss", **profiled_step(step, cuda),
                })  # fmt: skip
    return {"trainer": "interleaved", "results": results}


def run_estimator_worker(name: str, size: Size, warmup: int, steps: int, seed: int) -> dict:
    """Token-scoring throughput (no gradient) over the completions of the benchmark batch.

    ``forward-x2``: the floor, two plain forward passes of the base model (logits only) over the same ``2 * pairs``
    sequences, i.e. what any scorer of ``log pi_plus - log pi_minus`` on one base model must at least run.
    ``estimator-prompt``: ``ContrastiveWeightEstimator(method="prompt").score(dataset)`` end to end (tokenization,
    fingerprints, on-disk cache; a fresh cache directory per call so nothing is a cache hit). Its own
    ``stats["scoring_seconds"]`` (the scoring loop alone) is reported too.
    """
    import torch

    cuda = torch.cuda.is_available()
    tokenizer = build_tokenizer(size.vocab_size)
    model = build_model(size, tokenizer, seed)
    device = torch.device("cuda" if cuda else "cpu")
    model.to(device).eval()
    dataset = build_dataset(size, seed)
    from trl_tokenpo.data import tokenize_preference_dataset

    ids = tokenize_preference_dataset(dataset, tokenizer)
    completion_tokens = sum(len(c) for c in ids["chosen_ids"]) + sum(len(r) for r in ids["rejected_ids"])
    workdir = tempfile.mkdtemp(prefix="benchmark-speed-")
    loop_rates = []

    if name == "forward-x2":
        rows = [p + c for p, c in zip(ids["prompt_ids"], ids["chosen_ids"])]
        rows += [p + r for p, r in zip(ids["prompt_ids"], ids["rejected_ids"])]
        input_ids = torch.tensor(rows, device=device)
        attention_mask = torch.ones_like(input_ids)

        def score(_: int) -> None:
            with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=size.bf16 and cuda):
                for _ in range(2):
                    model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            _synchronize()

    elif name in ("estimator-prompt", "estimator-adapters"):
        from trl_tokenpo.estimator import ContrastiveWeightEstimator, WeightEstimatorConfig

        # "prompt": the base model under two system prompts (longer contexts than the floor's); "adapters": the
        # sft/dpo methods' scoring with two LoRA adapters (random non-zero weights: scoring cost does not depend on
        # how they were trained)
        config = WeightEstimatorConfig(
            output_dir=workdir, method="prompt" if name == "estimator-prompt" else "sft", scoring_batch_size=size.pairs,
            report_to="none", disable_tqdm=True, use_cpu=not cuda, bf16=size.bf16 and cuda,
        )
        estimator = ContrastiveWeightEstimator(model, processing_class=tokenizer, args=config)
        if name == "estimator-adapters":
            import copy

            from peft import LoraConfig, get_peft_model

            paths = []
            for adapter in ("plus", "minus"):
                lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
                get_peft_model(copy.deepcopy(model), lora).save_pretrained(os.path.join(workdir, adapter))
                paths.append(os.path.join(workdir, adapter))
            estimator.load_adapters(*paths)

        def score(i: int) -> None:
            estimator.args.cache_dir = os.path.join(workdir, f"cache-{i}")  # a cold cache on every call
            estimator.score(dataset)
            _synchronize()
            stats = estimator.stats
            if stats["cache_hit"] or stats["scored_tokens"] != completion_tokens:
                raise RuntimeError(f"unexpected estimator stats {stats}")
            loop_rates.append(stats["scored_tokens"] / stats["scoring_seconds"])

    else:
        raise ValueError(f"unknown scorer {name!r}")

    for i in range(warmup):
        score(-1 - i)
    times, cpu_times = [], []
    loop_rates.clear()
    for i in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        score(i)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - start_cpu)
    result = {
        "trainer": name, "status": "ok", "step_time_s": statistics.median(times), "step_times_s": times,
        "cpu_time_s": statistics.median(cpu_times), "tokens_per_s": completion_tokens / statistics.median(times),
        "tokens_per_cpu_s": completion_tokens / statistics.median(cpu_times), "scored_tokens": completion_tokens,
        "peak_mib": _peak_rss_mib(), "device": device.type,
    }
    if loop_rates:
        result["loop_tokens_per_s"] = statistics.median(loop_rates)
    return result


def run_memory_worker(name: str, size: Size, seed: int) -> dict:
    """Peak memory and time of one whole job on the benchmark data, LoRA r16 on every linear layer, TRL's default
    gradient checkpointing: ``tisdpo-lora`` trains TIS-DPO (tis_kl_term "none", the default: TRL's fused LM head;
    reference = adapters disabled) and ``tdpo2-lora`` TDPO2 (this package's tiled kernel) for one optimizer step on
    the batch; ``estimator-sft`` / ``estimator-dpo`` run ``ContrastiveWeightEstimator.estimate`` (two adapters, one
    optimizer step each on the same batch, then scoring with the reference log-probs)."""
    import torch
    from peft import LoraConfig

    cuda = torch.cuda.is_available()
    tokenizer = build_tokenizer(size.vocab_size)
    model = build_model(size, tokenizer, seed)
    dataset = build_dataset(size, seed)
    workdir = tempfile.mkdtemp(prefix="benchmark-memory-")
    common = dict(output_dir=workdir, use_cpu=not cuda, bf16=size.bf16 and cuda, report_to="none", disable_tqdm=True,
                  per_device_train_batch_size=size.pairs, max_steps=1, logging_steps=10**6, save_strategy="no",
                  seed=seed, dataloader_num_workers=0)  # fmt: skip
    if cuda:
        model.cuda()
        setup = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        setup = _rss_mib("VmRSS") or 0.0
    start, start_cpu = time.perf_counter(), time.process_time()
    if name.endswith("-lora"):
        from trl_tokenpo import TDPOConfig, TDPOTrainer, TISDPOConfig, TISDPOTrainer

        lora = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear")
        if name == "tisdpo-lora":
            trainer = TISDPOTrainer(model=model, args=TISDPOConfig(**common, max_length=None), peft_config=lora,
                                    train_dataset=with_random_weights(dataset, tokenizer, seed), processing_class=tokenizer)
        else:
            trainer = TDPOTrainer(model=model, args=TDPOConfig(**common, max_length=None), peft_config=lora,
                                  train_dataset=dataset, processing_class=tokenizer)
        trainer.train()
    else:
        from trl_tokenpo.estimator import ContrastiveWeightEstimator, WeightEstimatorConfig

        config = WeightEstimatorConfig(**common, method=name.split("-")[1], scoring_batch_size=size.pairs,
                                       include_ref_logps=True)  # fmt: skip
        ContrastiveWeightEstimator(model, tokenizer, config).estimate(dataset)
    _synchronize()
    wall, cpu_time = time.perf_counter() - start, time.process_time() - start_cpu
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mib()
    return {"trainer": name, "status": "ok", "step_time_s": wall, "cpu_time_s": cpu_time, "peak_mib": peak,
            "setup_mib": setup, "above_setup_mib": peak - setup, "memory_kind": "cuda_max_allocated" if cuda else "rss"}


def worker_main(args) -> None:
    _quiet_environment()
    import torch

    torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    if args.seq_len is not None:
        size = dataclasses.replace(size, seq_len=args.seq_len)
    if args.worker == "interleaved":
        result = run_interleaved_worker(args.trainers, size, args.rounds, args.warmup, args.steps, args.seed)
    elif args.worker in ESTIMATOR_ROWS:
        result = run_estimator_worker(args.worker, size, args.warmup, args.steps, args.seed)
    elif args.worker in MEMORY_ROWS:
        result = run_memory_worker(args.worker, size, args.seed)
    else:
        result = run_trainer_worker(args.worker, size, args.warmup, args.steps, args.seed)
    result["seq_len"] = size.seq_len
    print(RESULT_TAG + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Parent side: interleaved rounds, tables, docs
# ----------------------------------------------------------------------------------------------------------------------


def spawn_worker(name: str, args, seq_len: int | None = None, size_name: str | None = None, extra=()) -> dict:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--worker", name, "--size", size_name or args.size,
        "--warmup", str(args.warmup), "--steps", str(args.steps), "--seed", str(args.seed),
        "--threads", str(args.threads), *extra,
    ]
    if seq_len is not None:
        command += ["--seq-len", str(seq_len)]
    env = dict(os.environ)
    # Large buffers are mmap-ed and unmapped when freed, so that the resident set follows live memory
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=args.worker_timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(
        f"worker {name} (seq {seq_len}) failed with exit code {proc.returncode}:\n{proc.stdout[-3000:]}\n"
        f"{proc.stderr[-6000:]}"
    )


def _median(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else float("nan")


def run_rounds(names, args, seq_len=None, size_name=None, label="") -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {name: [] for name in names}
    for round_index in range(args.rounds):
        for name in names:
            start = time.perf_counter()
            result = spawn_worker(name, args, seq_len=seq_len, size_name=size_name)
            results[name].append(result)
            if result.get("status", "ok") != "ok":
                shown = result.get("reason", result.get("status"))
            elif "tokens_per_s" in result:
                shown = f"{result['tokens_per_s']:.0f} tokens/s, {result['tokens_per_cpu_s']:.0f} tokens/CPU-s"
            else:
                shown = (f"step {result['step_time_s']:.3f} s wall, {result['cpu_time_s']:.3f} s CPU, "
                         f"peak {result['peak_mib']:.0f} MiB")
            print(f"  [{label}round {round_index + 1}/{args.rounds}] {name:15s} {shown}  "
                  f"({time.perf_counter() - start:.0f} s wall)", file=sys.stderr, flush=True)
    return results


def summarize(results: dict[str, list[dict]], baseline: str = "dpo") -> list[dict]:
    """Per trainer: medians over rounds, and ratios to the baseline as medians over rounds of same-round ratios."""
    base = results[baseline]
    rows = []
    for name, runs in results.items():
        row = {"trainer": name, "memory_kind": runs[0]["memory_kind"], "scored_tokens": runs[0]["scored_tokens"]}
        for key, ratio_key in (("step_time_s", "time_ratio"), ("cpu_time_s", "cpu_ratio"), ("peak_mib", "peak_ratio"),
                               ("above_setup_mib", "above_setup_ratio"),
                               ("step_transient_mib", "transient_ratio")):
            row[key] = _median([r[key] for r in runs])
            row[ratio_key] = _median([r[key] / b[key] if b[key] else float("nan") for r, b in zip(runs, base)])
        rows.append(row)
    return rows


def _judged_time_ratio(row: dict) -> tuple[float, str]:
    """The time ratio the targets are judged on: process CPU time on CPU (on a shared machine the wall clock of a
    worker also counts the time it waits for a core), wall clock on CUDA."""
    if row["memory_kind"] == "rss":
        return row["cpu_ratio"], "CPU time"
    return row["time_ratio"], "time"


def target_verdict(row: dict) -> str:
    if row["trainer"] not in TARGETS:
        return ""
    max_time, max_mem = TARGETS[row["trainer"]]
    if row["memory_kind"] != "rss":
        max_time = CUDA_TIME_TARGETS.get(row["trainer"], max_time)
    time_ratio, time_name = _judged_time_ratio(row)
    return (f"{time_name} <= {max_time:.2f}x: {'met' if time_ratio <= max_time else 'MISSED'}; "
            f"peak <= {max_mem:.2f}x: {'met' if row['peak_ratio'] <= max_mem else 'MISSED'}")


def format_main_table(rows: list[dict]) -> str:
    unit = "peak RSS" if rows[0]["memory_kind"] == "rss" else "peak allocated"
    lines = [
        f"| trainer | step wall (s) | wall / DPO | step CPU (s) | CPU / DPO | {unit} (MiB) | peak / DPO | "
        "above setup (MiB) | above setup / DPO | step transient (MiB) | transient / DPO | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['trainer']} | {r['step_time_s']:.3f} | {r['time_ratio']:.2f}x | {r['cpu_time_s']:.3f} | "
            f"{r['cpu_ratio']:.2f}x | {r['peak_mib']:.0f} | {r['peak_ratio']:.3f}x | {r['above_setup_mib']:.0f} | "
            f"{r['above_setup_ratio']:.2f}x | {r['step_transient_mib']:.0f} | {r['transient_ratio']:.2f}x | "
            f"{target_verdict(r)} |"
        )
    return "\n".join(lines)


# Goals of the interleaved GPU measurement (issue 20), for TDPO2 and TIS-DPO "reverse": step wall time / DPO per size,
# and GPU time / DPO at every size; judged on the medians of same-round ratios
INTERLEAVED_WALL_GOALS = {"gpu": 1.05, "gpu-2k": 1.03}
INTERLEAVED_DEVICE_GOAL = 1.03
INTERLEAVED_GOAL_TRAINERS = ("tdpo2", "tisdpo-reverse")


def summarize_interleaved(runs: dict[str, list[dict]], baseline: str = "dpo") -> list[dict]:
    """Per trainer, over the rounds of one interleaved run: min and median of the step wall time and of the profiled
    step's device time, their ratios to the baseline (``min / baseline's min``; median of same-round ratios), and the
    medians of the syncs, their host time and the step peak (with its median same-round ratio)."""
    base = runs[baseline]

    def ratios(runs_, key):
        return [r[key] / b[key] if b[key] else float("nan") for r, b in zip(runs_, base)]

    rows = []
    for name, rounds in runs.items():
        row = {"trainer": name, "rounds": len(rounds), "memory_kind": rounds[0]["memory_kind"],
               "scored_tokens": rounds[0]["scored_tokens"], "tokens": rounds[0]["tokens"]}  # fmt: skip
        for key, short in (("step_time_s", "wall"), ("device_ms", "device")):
            values = [r[key] for r in rounds]
            row[f"{short}_min"], row[f"{short}_median"] = min(values), statistics.median(values)
            row[f"{short}_ratio_min"] = min(values) / min(b[key] for b in base)
            row[f"{short}_ratio_median"] = _median(ratios(rounds, key))
        for key in ("syncs", "sync_ms", "step_transient_mib", "cpu_time_s"):
            values = [r[key] for r in rounds if r[key] is not None]
            row[key] = _median(values) if values else None  # syncs: None without a GPU
        row["transient_ratio"] = _median(ratios(rounds, "step_transient_mib"))
        rows.append(row)
    return rows


def interleaved_verdict(row: dict, size_name: str) -> str:
    """The issue's goals, on CUDA only (CPU timings say nothing about them)."""
    if row["memory_kind"] == "rss" or row["trainer"] not in INTERLEAVED_GOAL_TRAINERS:
        return ""
    verdicts = []
    if size_name in INTERLEAVED_WALL_GOALS:
        goal = INTERLEAVED_WALL_GOALS[size_name]
        verdicts.append(f"wall <= {goal:.2f}x: {'met' if row['wall_ratio_median'] <= goal else 'MISSED'}")
    verdicts.append(f"GPU time <= {INTERLEAVED_DEVICE_GOAL:.2f}x: "
                    f"{'met' if row['device_ratio_median'] <= INTERLEAVED_DEVICE_GOAL else 'MISSED'}")
    return "; ".join(verdicts)


def format_interleaved_table(rows: list[dict], size_name: str) -> str:
    cuda = rows[0]["memory_kind"] != "rss"
    device = "GPU time" if cuda else "operator CPU time"
    peak = "step peak above start, allocated" if cuda else "step peak above start, RSS"
    lines = [
        f"| trainer | step wall, min / median (s) | wall / DPO, min / median | {device}, min / median (ms) | "
        f"{device} / DPO, min / median | host syncs per step | host time in syncs (ms) | {peak} (MiB) | "
        "peak / DPO | goal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def number(value, spec):
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

    for r in rows:
        lines.append(
            f"| {r['trainer']} | {r['wall_min']:.3f} / {r['wall_median']:.3f} | "
            f"{r['wall_ratio_min']:.3f}x / {r['wall_ratio_median']:.3f}x | "
            f"{r['device_min']:.1f} / {r['device_median']:.1f} | "
            f"{r['device_ratio_min']:.3f}x / {r['device_ratio_median']:.3f}x | {number(r['syncs'], '.0f')} | "
            f"{number(r['sync_ms'], '.1f')} | {number(r['step_transient_mib'], '.0f')} | "
            f"{number(r['transient_ratio'], '.3f')}x | {interleaved_verdict(r, size_name)} |"
        )
    return "\n".join(lines)


def format_estimator_table(results: dict[str, list[dict]]) -> str:
    lines = [
        "| scorer | wall (s) | tokens/s (wall) | vs. floor | CPU (s) | tokens/CPU-s | vs. floor | scoring loop only, "
        "tokens/s | peak (MiB) | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    floor = results.get("forward-x2", [])
    floor_rate = _median([r.get("tokens_per_s") for r in floor])
    floor_cpu_rate = _median([r.get("tokens_per_cpu_s") for r in floor])
    for name, runs in results.items():
        if any(r.get("status") != "ok" for r in runs):
            lines.append(f"| {name} | TODO | TODO | TODO | TODO | TODO | TODO | TODO | TODO | {runs[0].get('reason', '')} |")
            continue
        rate = _median([r["tokens_per_s"] for r in runs])
        cpu_rate = _median([r["tokens_per_cpu_s"] for r in runs])
        loop = _median([r.get("loop_tokens_per_s") for r in runs])
        target = ""
        if name != "forward-x2":
            # on CPU the process's CPU time (a shared machine's wall clock also counts waiting for a core), on a GPU
            # the wall clock
            cuda = runs[0].get("device") == "cuda"
            judged, unit = (rate / floor_rate, "tokens/s") if cuda else (cpu_rate / floor_cpu_rate, "tokens/CPU-s")
            target = f"{unit} >= {ESTIMATOR_TARGET}x floor: {'met' if judged >= ESTIMATOR_TARGET else 'MISSED'}"
        lines.append(
            f"| {name} | {_median([r['step_time_s'] for r in runs]):.3f} | {rate:.0f} | {rate / floor_rate:.2f}x | "
            f"{_median([r['cpu_time_s'] for r in runs]):.3f} | {cpu_rate:.0f} | {cpu_rate / floor_cpu_rate:.2f}x | "
            f"{'' if math.isnan(loop) else f'{loop:.0f}'} | {_median([r.get('peak_mib') for r in runs]):.0f} | {target} |"
        )
    return "\n".join(lines)


def format_memory_table(results: dict[str, list[dict]]) -> str:
    """Peak memory of each job, and its ratio to the default TIS-DPO trainer's (``tisdpo-lora``) in the same round."""
    unit = "peak RSS" if results[MEMORY_ROWS[0]][0]["memory_kind"] == "rss" else "peak allocated"
    lines = [f"| job | wall (s) | CPU (s) | {unit} (MiB) | peak / tisdpo-lora | above setup (MiB) | above setup / tisdpo-lora |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    base = results[MEMORY_ROWS[0]]
    for name, runs in results.items():
        ratio = _median([r["peak_mib"] / b["peak_mib"] for r, b in zip(runs, base)])
        above = _median([r["above_setup_mib"] / b["above_setup_mib"] for r, b in zip(runs, base)])
        lines.append(
            f"| {name} | {_median([r['step_time_s'] for r in runs]):.1f} | {_median([r['cpu_time_s'] for r in runs]):.1f} "
            f"| {_median([r['peak_mib'] for r in runs]):.0f} | {ratio:.2f}x | "
            f"{_median([r['above_setup_mib'] for r in runs]):.0f} | {above:.2f}x |"
        )
    return "\n".join(lines)


def format_scaling_table(by_length: dict[int, list[dict]]) -> str:
    rss = next(iter(by_length.values()))[0]["memory_kind"] == "rss"
    unit = "peak RSS" if rss else "peak allocated"
    time_name = "CPU" if rss else "wall"
    lines = [
        f"| sequence | scored tokens | DPO step {time_name} (s) | TDPO2 step {time_name} (s) | TDPO2 / DPO | "
        f"DPO {unit} (MiB) | TDPO2 {unit} (MiB) | TDPO2 / DPO | DPO above setup (MiB) | TDPO2 above setup (MiB) | "
        "TDPO2 / DPO | DPO step transient (MiB) | TDPO2 step transient (MiB) | TDPO2 / DPO |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    key, ratio = ("cpu_time_s", "cpu_ratio") if rss else ("step_time_s", "time_ratio")
    for seq_len, rows in by_length.items():
        dpo, tdpo = (next(r for r in rows if r["trainer"] == name) for name in SCALING_TRAINERS)
        lines.append(
            f"| {seq_len} | {dpo['scored_tokens']} | {dpo[key]:.3f} | {tdpo[key]:.3f} | {tdpo[ratio]:.2f}x | "
            f"{dpo['peak_mib']:.0f} | {tdpo['peak_mib']:.0f} | {tdpo['peak_ratio']:.3f}x | "
            f"{dpo['above_setup_mib']:.0f} | {tdpo['above_setup_mib']:.0f} | {tdpo['above_setup_ratio']:.2f}x | "
            f"{dpo['step_transient_mib']:.0f} | {tdpo['step_transient_mib']:.0f} | {tdpo['transient_ratio']:.2f}x |"
        )
    return "\n".join(lines)


def machine_description() -> str:
    import torch
    import transformers
    import trl

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
            if match:
                cpu = match.group(1).strip()
    except OSError:
        pass
    parts = [f"CPU: {cpu}, {os.cpu_count()} logical cores"]
    if torch.cuda.is_available():
        parts.append(f"GPU: {torch.cuda.get_device_name(0)}")
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        parts.append(f"load average at the end of the run: {load}")
    except OSError:
        pass
    parts.append(
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
        f"Python {platform.python_version()}; {datetime.date.today().isoformat()}"
    )
    return "; ".join(parts)


def update_docs(block_name: str, body: str) -> None:
    """Write ``body`` between this block's markers inside the ``## Speed`` section of docs/benchmarks.md."""
    start_marker, end_marker = f"<!-- speed:{block_name}:start -->", f"<!-- speed:{block_name}:end -->"
    block = f"{start_marker}\n{body.strip()}\n{end_marker}"
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    if start_marker in text and end_marker in text:
        head, rest = text.split(start_marker, 1)
        _, tail = rest.split(end_marker, 1)
        text = head + block + tail
    else:
        match = re.search(r"^## Speed[ \t]*$", text, re.MULTILINE)
        if match is None:
            text = text.rstrip("\n") + "\n\n## Speed\n\n" + SPEED_INTRO + "\n\n" + block + "\n"
        else:
            # Append the block at the end of the Speed section (before the next `## ` heading)
            next_heading = re.search(r"^## ", text[match.end():], re.MULTILINE)
            cut = match.end() + (next_heading.start() if next_heading else len(text) - match.end())
            text = text[:cut].rstrip("\n") + "\n\n" + block + "\n" + ("\n" + text[cut:] if next_heading else "")
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text)
    print(f"updated {DOCS.relative_to(REPO)} ({block_name})", file=sys.stderr)


SPEED_INTRO = """\
`scripts/benchmark_speed.py` times one optimizer step (`trainer.training_step` + `optimizer.step`) of each trainer on
the same randomly initialised model, the same reference copy and the same synthetic batch, each trainer in its own
process, interleaved over several rounds. Ratios are to `trl.DPOTrainer` (sigmoid loss) measured in the same round.
Memory on CPU is the process's resident set: *peak* is the high-water mark of the whole run (model, reference,
Python and libraries included), *above setup* subtracts the resident set after model + trainer construction (gradients,
optimizer state, activations, loss temporaries), *step transient* is the high-water mark of the timed steps minus the
resident set just before them (activations and loss temporaries only). On CUDA the same columns come from
`torch.cuda.max_memory_allocated`."""


def main_parent(args) -> None:
    if args.size.startswith("gpu") and not _cuda_available():
        sys.exit(f"--size {args.size} needs CUDA; use --size cpu (or tiny, tiny-lora) on this machine.")
    command = "python scripts/benchmark_speed.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    started = time.perf_counter()

    if args.scaling:
        size_name = "scaling-tiny" if args.size == "tiny" else "scaling"
        lengths = SCALING_LENGTHS if args.size != "tiny" else (32, 64)
        by_length = {}
        for seq_len in lengths:
            results = run_rounds(SCALING_TRAINERS, args, seq_len=seq_len, size_name=size_name, label=f"seq {seq_len} ")
            by_length[seq_len] = summarize(results)
        table = format_scaling_table(by_length)
        size = SIZES[size_name]
        header = (f"Model: {dataclasses.replace(size, seq_len=0).describe().replace(', sequence 0 tokens', '')}; "
                  f"{args.rounds} rounds x ({args.warmup} warm-up + {args.steps} timed steps), {args.threads} torch "
                  "thread(s) per worker.")
        print("\n" + header + "\n\n" + table)
        if args.write_docs:
            body = (
                "### Scaling with the sequence length (TDPO2 vs DPO)\n\n"
                f"Command: `{command}` ({time.perf_counter() - started:.0f} s).\n\n{header}\n\n"
                f"Machine: {machine_description()}.\n\n{table}\n"
            )
            update_docs("scaling", body + (("\n" + args.notes + "\n") if args.notes else ""))
        return

    size = SIZES[args.size]
    if args.only_estimator:
        main_estimator(args, size, command, started)
        return
    if args.in_process:
        main_interleaved(args, size, command, started)
        return
    results = run_rounds(args.trainers, args)
    rows = summarize(results)
    table = format_main_table(rows)
    header = (f"Model: {size.describe()}; {args.rounds} rounds x ({args.warmup} warm-up + {args.steps} timed steps), "
              f"{args.threads} torch thread(s) per worker; "
              f"{rows[0]['scored_tokens']} scored completion tokens per batch "
              f"({2 * size.pairs * size.seq_len} tokens).")
    print("\n" + header + "\n\n" + table)
    estimator_table = ""
    if not args.no_estimator:
        est = run_rounds(ESTIMATOR_ROWS, args, label="estimator ")
        estimator_table = format_estimator_table(est)
        print("\nToken scoring throughput (completion tokens per second, no gradient):\n\n" + estimator_table)
    body = (
        f"### Step time and peak memory, `--size {args.size}`\n\n"
        f"Command: `{command}` ({time.perf_counter() - started:.0f} s).\n\n{header}\n\n"
        f"Machine: {machine_description()}.\n\n{table}\n"
    )
    if estimator_table:
        body += ("\nToken scoring throughput of the weight estimator (completion tokens per second, no gradient; "
                 "the floor is two plain forward passes of the base model over the same tokens):\n\n"
                 + estimator_table + "\n")
    write_block(args, f"main-{args.size}", body, {"size": args.size, "rows": rows, "runs": results})


def write_block(args, block_name: str, body: str, figures: dict | None = None) -> None:
    """``--markdown``: the block ``--write-docs`` would put in docs/benchmarks.md, with its markers, to paste there;
    ``--json``: ``figures``; ``--write-docs``: the block into docs/benchmarks.md."""
    if args.notes:
        body = body.rstrip("\n") + "\n\n" + args.notes + "\n"
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(f"<!-- speed:{block_name}:start -->\n{body.strip()}\n"
                                       f"<!-- speed:{block_name}:end -->\n")
        print(f"wrote {args.markdown}", file=sys.stderr)
    if args.json and figures is not None:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.write_docs:
        update_docs(block_name, body)


def main_interleaved(args, size: Size, command: str, started: float) -> None:
    """``--in-process``: every trainer in one worker process, interleaved round by round (`run_interleaved_worker`)."""
    extra = ["--trainers", *args.trainers, "--rounds", str(args.rounds)]
    runs = spawn_worker("interleaved", args, extra=extra)["results"]
    rows = summarize_interleaved(runs)
    table = format_interleaved_table(rows, args.size)
    cuda = rows[0]["memory_kind"] != "rss"
    header = (
        f"Model: {size.describe()}; {rows[0]['scored_tokens']} scored completion tokens per batch "
        f"({2 * size.pairs * size.seq_len} tokens). All trainers in one process, each on its own copy of the model "
        f"and the same batch, interleaved over {args.rounds} rounds (after {args.warmup} warm-up step(s) each); per "
        f"round and trainer: the median of {args.steps} timed steps (wall, the device waited for), then one step "
        "under torch.profiler: " + (
            "the GPU time is the sum of the durations of everything that ran on the GPU (kernels, copies), the host "
            "syncs are the calls that wait for the device (cudaStreamSynchronize, cudaDeviceSynchronize, "
            "cudaEventSynchronize) and the host time spent in them" if cuda else
            "without a GPU the profiled figure is the operators' CPU time (their self times summed)"
        ) + ". Ratios to DPO: min over rounds / DPO's min, and the median over rounds of same-round ratios. Step peak: "
        "the memory high-water mark of the timed steps above the memory allocated before them."
    )
    print("\n" + header + "\n\n" + table)
    body = (
        f"### One optimizer step, trainers interleaved in one process, `--size {args.size}`\n\n"
        f"Command: `{command}` ({time.perf_counter() - started:.0f} s).\n\n{header}\n\n"
        f"Machine: {machine_description()}.\n\n{table}\n"
    )
    figures = {"size": args.size, "model": size.describe(), "rounds": args.rounds, "rows": rows, "runs": runs,
               "machine": machine_description(), "command": command}  # fmt: skip
    write_block(args, f"interleaved-{args.size}", body, figures)


def main_estimator(args, size: Size, command: str, started: float) -> None:
    """``--only-estimator``: the scoring throughput table and (unless ``--no-memory``) the estimator's peak memory next
    to the trainer's."""
    scorers = ["forward-x2"] + [name for name in args.scorers if name != "forward-x2"]  # the floor comes first
    results = run_rounds(scorers, args, label="estimator ")
    throughput = format_estimator_table(results)
    memory = "" if args.no_memory else format_memory_table(run_rounds(MEMORY_ROWS, args, label="memory "))
    header = (f"Model: {size.describe()}; {args.rounds} rounds, {args.warmup} warm-up + {args.steps} timed calls per "
              f"scorer, {args.threads} torch thread(s) per worker.")
    print(f"\n{header}\n\n{throughput}\n\n{memory}")
    body = (
        f"### Weight estimator, `--size {args.size}`\n\nCommand: `{command}` ({time.perf_counter() - started:.0f} s)."
        f"\n\n{header}\n\nMachine: {machine_description()}.\n\nToken scoring throughput (completion tokens per "
        "second, no gradient; the floor is two plain forward passes of the base model over the same tokens, "
        f"logits only):\n\n{throughput}\n"
    )
    if memory:
        body += (
            "\nPeak memory of a whole estimate (fit two LoRA r16 adapters one step each, then score with reference "
            "log-probs) next to one LoRA r16 training step of TIS-DPO (default `tis_kl_term='none'`: TRL's fused LM "
            "head) and of TDPO2 (this package's tiled kernel) on the same batch, each in a fresh process:\n\n"
            f"{memory}\n"
        )
    figures = {name: {key: _median([r.get(key) for r in runs]) for key in ("tokens_per_s", "tokens_per_cpu_s")}
               for name, runs in results.items() if all(r.get("status") == "ok" for r in runs)}  # fmt: skip
    write_block(args, f"estimator-{args.size}", body, {"size": args.size, "throughput": figures, "runs": results})


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="cpu")
    parser.add_argument("--scaling", action="store_true", help="TDPO2 vs DPO as the sequence doubles 256 -> 2048.")
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    parser.add_argument("--rounds", type=int, default=None, help="Interleaved rounds (default: 1 tiny, 3 else).")
    parser.add_argument("--warmup", type=int, default=None, help="Warm-up steps per run (default: 1).")
    parser.add_argument("--steps", type=int, default=None, help="Timed steps per run (default: 2 tiny, 3 else).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch threads per worker (default: 1 without CUDA, which keeps timings stable on a shared machine, "
        "else the number of cores).",
    )
    parser.add_argument("--no-estimator", action="store_true", help="Skip the token-scoring throughput rows.")
    parser.add_argument("--only-estimator", action="store_true",
                        help="Only the estimator: scoring throughput and peak memory next to a LoRA trainer.")
    parser.add_argument("--scorers", nargs="+", choices=ESTIMATOR_ROWS, default=list(ESTIMATOR_ROWS),
                        help="With --only-estimator: the scorers timed (the floor, forward-x2, always is).")
    parser.add_argument("--no-memory", action="store_true",
                        help="With --only-estimator: skip the peak-memory jobs (whole estimates and training steps).")
    parser.add_argument("--write-docs", action="store_true", help="Update the ## Speed section of docs/benchmarks.md.")
    parser.add_argument("--notes", default="", help="Free text appended under the table in the docs (e.g. load).")
    parser.add_argument("--markdown", default=None,
                        help="Also write the docs block of the main table to this file (e.g. from a GPU machine).")
    parser.add_argument("--json", default=None, help="Also write the table's figures (and every round's) to this file.")
    parser.add_argument("--in-process", action="store_true",
                        help="All trainers in one worker process, interleaved round by round, with a profiled step "
                        "per round (GPU time and host syncs on CUDA) and min / median over rounds.")
    parser.add_argument("--worker-timeout", type=int, default=1800)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.size in ("tiny", "tiny-lora", "scaling-tiny")
    args.rounds = args.rounds or (1 if quick else 3)
    args.warmup = 1 if args.warmup is None else args.warmup
    args.steps = args.steps or 2
    if args.threads is None:
        args.threads = (os.cpu_count() or 1) if _cuda_available() else 1
    if "dpo" not in args.trainers:
        args.trainers = ["dpo"] + list(args.trainers)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
    else:
        main_parent(args)


if __name__ == "__main__":
    main()
