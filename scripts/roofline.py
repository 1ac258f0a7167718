#!/usr/bin/env python
"""Roofline prediction of one training step on a GPU: `trl.DPOTrainer` vs TDPO2 and TIS-DPO "reverse".

What is counted
---------------
The LM-head part of one step (policy head forward and backward, reference head forward) of three implementations:

* ``dpo``: TRL's fused LM head (``trl.kernels.ChunkedLogProbFunction``, the path of ``trl.DPOTrainer``) with its
  Triton kernels, for the policy (log-probs + entropy, mean logit, top-1: the outputs DPOTrainer asks for) and the
  reference (log-probs);
* ``torch``: ``trl_tokenpo.kernels`` with ``backend="torch"`` (float32 torch operations on ``[rows, V]`` tiles);
* ``fused``: ``trl_tokenpo.kernels`` with ``backend="triton"`` (one Triton kernel per tile and direction).

The bytes and flops are not estimated by hand: each implementation's own code runs on ``meta`` tensors of the real
shapes (no memory, no arithmetic), and a dispatch mode records every aten operation it issues: a matmul costs
``2 M N K`` flops and reads its operands and writes its output once; any other operation reads its tensor inputs and
writes its outputs once (views are free; ``logsumexp`` is counted as the four passes ATen's composite makes: ``amax``,
``sub``, ``exp_``, ``sum``; ``gather`` / ``scatter_add_`` touch one element per row). A Triton kernel launch is
replaced by a recorder that charges one read of every tensor argument (the ``[rows, columns]`` tile views, the
per-token vectors) and one write of what the kernel stores, plus its exponentials (one per tile element and model;
``tl.exp`` runs on the special-function units, 16 per clock per SM on Hopper). Where the code branches on the device
(``torch.addmm(..., out_dtype=float32)`` on CUDA, ``_use_triton`` in TRL), the CUDA branch is taken. Where our
Triton backward branches on the data (which tokens' KL has a gradient), TDPO2 is given its real pattern: the chosen
half's KL is detached, so only the rejected half projects the reference again.

Step time model (roofline): every recorded operation takes ``max(bytes / bandwidth, flops / bf16 peak,
exponentials / exp rate)``; the rest of the step (backbone forward and backward of the policy, forward of the
reference, attention included, LM head excluded) takes its flops at the bf16 peak. Vendor figures: H100 SXM 3.35 TB/s
and 989 TFLOPS dense bf16, H200 SXM 4.8 TB/s and 989 TFLOPS (both 132 SMs at 1.98 GHz). Shapes: 4,096 tokens per step
(4 sequences x 1,024), all of them scored (the upper bound of the head's share), bf16, LoRA (frozen base weights and LM
head, reference = the same model with the adapter disabled, adapter flops ignored) or full fine-tuning.

Usage::

    python scripts/roofline.py                 # prints the tables
    python scripts/roofline.py --write-docs    # replaces the roofline block of docs/benchmarks.md
    python scripts/roofline.py --measure       # on a CUDA GPU: measured LM-head times next to the prediction
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
MARKERS = ("<!-- roofline:start -->", "<!-- roofline:end -->")
MEASURED_MARKERS = ("<!-- roofline:measured:start -->", "<!-- roofline:measured:end -->")


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    hidden: int
    vocab: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    def layer_params(self) -> int:
        """Parameters of the transformer layers (attention and gated MLP projections; norms and biases ignored)."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return self.layers * (attention + 3 * self.hidden * self.intermediate)

    def backbone_flops(self, tokens: int, seq_len: int, lora: bool) -> float:
        """Flops of one step without the LM head: policy forward + backward (input gradients; weight gradients too
        for full fine-tuning), reference forward. Causal attention: each token attends to ``seq_len / 2`` keys on
        average (QK^T and AV, 2 flops per multiply-add); its backward costs twice its forward."""
        linear = 2 * self.layer_params() * tokens  # one forward of the projections
        attention = self.layers * 4 * self.heads * self.head_dim * (seq_len / 2) * tokens
        policy = (linear + attention) + (linear + 2 * attention) + (0 if lora else linear)
        return policy + linear + attention


MODELS = (
    Model("SmolLM2-135M", hidden=576, vocab=49152, layers=30, heads=9, kv_heads=3, head_dim=64, intermediate=1536),
    Model("Qwen2.5-0.5B", hidden=896, vocab=151936, layers=24, heads=14, kv_heads=2, head_dim=64, intermediate=4864),
    Model("Llama-3.1-8B", hidden=4096, vocab=128256, layers=32, heads=32, kv_heads=8, head_dim=128,
          intermediate=14336),
)


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    bandwidth: float  # bytes / s
    bf16_flops: float  # dense tensor-core flops / s
    exp_rate: float  # exponentials / s (SFU: 16 per clock per SM)


GPUS = (
    Gpu("H100 SXM", bandwidth=3.35e12, bf16_flops=989e12, exp_rate=16 * 132 * 1.98e9),
    Gpu("H200 SXM", bandwidth=4.8e12, bf16_flops=989e12, exp_rate=16 * 132 * 1.98e9),
)

TOKENS = 4096
SEQ_LEN = 1024


# ----------------------------------------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Op:
    name: str
    read: float = 0.0
    written: float = 0.0
    flops: float = 0.0
    exps: float = 0.0

    def seconds(self, gpu: Gpu) -> float:
        return max((self.read + self.written) / gpu.bandwidth, self.flops / gpu.bf16_flops, self.exps / gpu.exp_rate)


def _nbytes(tensor) -> float:
    return float(tensor.numel() * tensor.element_size())


def _tensors(values) -> list:
    import torch
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(values) if isinstance(t, torch.Tensor)]


class Recorder:
    """Collects the operations of the code run inside :meth:`recording`."""

    def __init__(self):
        self.ops: list[Op] = []

    def add(self, op: Op) -> None:
        self.ops.append(op)

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        from torch.utils._python_dispatch import TorchDispatchMode

        recorder = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                result = _meta_out_dtype_matmul(func, args, kwargs)
                if result is None:
                    result = func(*args, **kwargs)
                op = _aten_cost(func, args, kwargs, result)
                if op is not None:
                    recorder.add(op)
                return result

        with Mode():
            yield

    def total(self) -> Op:
        return Op("total", *(sum(getattr(op, f) for op in self.ops) for f in ("read", "written", "flops", "exps")))

    def seconds(self, gpu: Gpu) -> float:
        return sum(op.seconds(gpu) for op in self.ops)


def _meta_out_dtype_matmul(func, args, kwargs):
    """``torch.addmm(..., out_dtype=...)`` (``aten::addmm.dtype`` / ``aten::addmm.dtype_out``) on meta tensors: the
    result's shape and dtype, without running the op; ``None`` for any other call.

    Those overloads have CUDA kernels only, so on meta tensors torch runs a decomposition as their meta kernel, and
    which one depends on the release: torch 2.13 has one of their own, while torch 2.11 registers the plain ``addmm``
    decomposition for every overload, which takes ``out_dtype`` for ``beta`` and fails (``TypeError: unsupported
    operand type(s) for *: 'torch.dtype' and 'Tensor'``). Meta tensors hold no data, so the shapes are all a recording
    needs; the cost is counted from the call as for any matmul (`_aten_cost`)."""
    import torch

    if func._schema.name != "aten::addmm" or func._schema.overload_name not in ("dtype", "dtype_out"):
        return None
    if not all(t.is_meta for t in _tensors([args, kwargs])):
        return None
    _, mat1, mat2, out_dtype = args[:4]
    shape = (mat1.shape[0], mat2.shape[1])
    if func._schema.overload_name == "dtype":
        return torch.empty(shape, dtype=out_dtype, device="meta")
    out = kwargs["out"]
    if tuple(out.shape) != shape or out.dtype != out_dtype:
        raise RuntimeError(f"addmm out_dtype={out_dtype}: out is {out.dtype} {tuple(out.shape)}, expected {shape}")
    return out


def addmm_fp32(acc, a, b) -> None:
    """``acc += a @ b`` accumulated in float32 from bf16 / fp16 operands: the CUDA branch of TRL's ``_addmm_fp32``
    (and of ``trl_tokenpo.kernels.stats.accumulate_mm``), which the recordings take on meta tensors."""
    import torch

    torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)


_FREE = {"empty", "empty_strided", "empty_like", "new_empty", "lift_fresh", "detach", "_local_scalar_dense",
         "set_", "resize_", "_to_copy_meta"}
_WRITE_ONLY = {"zeros", "zeros_like", "new_zeros", "full", "full_like", "ones", "fill_", "zero_", "arange"}
_MATMULS = {"mm", "addmm", "addmm_", "bmm", "matmul"}


def _aten_cost(func, args, kwargs, result) -> Op | None:
    name = func._schema.name.split("::")[-1]
    if func.is_view or name in _FREE:
        return None
    out = kwargs.get("out")
    outputs = _tensors(out if out is not None else result)
    inputs = _tensors([a for a in args]) + _tensors({k: v for k, v in kwargs.items() if k != "out"})
    if name in _WRITE_ONLY:
        return Op(name, written=sum(map(_nbytes, outputs)))
    if name in _MATMULS:
        mat1, mat2 = (args[1], args[2]) if name.startswith("addmm") else (args[0], args[1])
        flops = 2.0 * mat1.shape[0] * mat1.shape[1] * mat2.shape[1]
        return Op(name, read=sum(map(_nbytes, inputs)), written=sum(map(_nbytes, outputs)), flops=flops)
    if name == "logsumexp":
        # ATen's composite: amax (read), self - max (read, write), exp_ (read, write), sum (read)
        size = _nbytes(args[0])
        return Op(name, read=4 * size, written=2 * size, exps=args[0].numel())
    if name in ("gather", "scatter_add", "scatter_add_"):
        index = args[2]
        touched = index.numel() * args[0].element_size()
        return Op(name, read=_nbytes(index) + touched * (2 if name != "gather" else 1), written=touched)
    exps = sum(t.numel() for t in outputs) if name in ("exp", "exp_") else 0.0
    return Op(name, read=sum(map(_nbytes, inputs)), written=sum(map(_nbytes, outputs)), exps=exps)


class KernelRecorder:
    """Stands for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records what the launch reads and writes.

    ``written``: indices of the arguments the kernel stores to; ``exps_per_element(kwargs)``: exponentials per element
    of ``tile``, the ``[rows, columns]`` argument at index ``tile``.
    """

    def __init__(self, recorder: Recorder, name: str, written: tuple[int, ...], exps_per_element, tile: int = 0,
                 skip=lambda kwargs: ()):
        self.recorder, self.name, self.written, self.exps_per_element = recorder, name, written, exps_per_element
        self.tile, self.skip = tile, skip

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            import torch

            skipped = self.skip(kwargs)
            tensors = [(i, a) for i, a in enumerate(args) if isinstance(a, torch.Tensor) and i not in skipped]
            op = Op(
                self.name,
                read=sum(_nbytes(a) for _, a in tensors),
                written=sum(_nbytes(a) for i, a in tensors if i in self.written),
                exps=args[self.tile].numel() * self.exps_per_element(kwargs),
            )
            self.recorder.add(op)

        return launch


# ----------------------------------------------------------------------------------------------------------------------
# The three implementations, on meta tensors
# ----------------------------------------------------------------------------------------------------------------------


def _softcap_exps(kwargs, *flags):
    # tanh through sigmoid: one exponential per softcapped logit
    return sum(1 for flag in flags if kwargs.get(flag))


@contextlib.contextmanager
def _patched(module, **attributes) -> Iterator[None]:
    saved = {name: getattr(module, name) for name in attributes}
    for name, value in attributes.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


@contextlib.contextmanager
def _meta_autocast() -> Iterator[None]:
    # Autocast knows no "meta" device: report it off, and make `torch.autocast("meta", enabled=False)` a no-op
    import torch

    is_enabled, autocast = torch.is_autocast_enabled, torch.autocast

    def meta_is_enabled(*args):
        return False if args and args[0] == "meta" else is_enabled(*args)

    def meta_autocast(device_type, *args, **kwargs):
        return contextlib.nullcontext() if device_type == "meta" else autocast(device_type, *args, **kwargs)

    with _patched(torch, is_autocast_enabled=meta_is_enabled, autocast=meta_autocast):
        yield


def _meta_inputs(model: Model, tokens: int, lora: bool):
    import torch

    meta = dict(device="meta", dtype=torch.bfloat16)
    hidden = torch.empty(tokens, model.hidden, **meta, requires_grad=True)
    weight = torch.empty(model.vocab, model.hidden, **meta, requires_grad=not lora)
    ref_hidden = torch.empty(tokens, model.hidden, **meta)
    # LoRA: the reference is the base model with the adapter disabled, i.e. the very same LM head
    ref_weight = weight if lora else torch.empty(model.vocab, model.hidden, **meta)
    labels = torch.empty(tokens, device="meta", dtype=torch.int64)
    return hidden, weight, ref_hidden, ref_weight, labels


def record_dpo(model: Model, tokens: int, lora: bool) -> Recorder:
    """trl.DPOTrainer's LM head: ChunkedLogProbFunction for the policy (with its metrics) and the reference."""
    import torch
    import trl.kernels.chunked_logprob as clp
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    recorder = Recorder()
    # _forward_kernel(mm, stride, targets, max, sum_exp, x_sum_exp, sq_sum_exp, z_sum, max_before, target_logit, ...)
    forward_kernel = KernelRecorder(recorder, "trl forward kernel", written=tuple(range(3, 10)),
                                    exps_per_element=lambda kw: 1 + _softcap_exps(kw, "HAS_SOFTCAP"))
    # _backward_kernel(mm, stride, targets, log_z, entropy, grad_logprobs, grad_entropy, ...): overwrites the tile
    backward_kernel = KernelRecorder(recorder, "trl backward kernel", written=(0,),
                                     exps_per_element=lambda kw: 1 + _softcap_exps(kw, "HAS_SOFTCAP"))
    hidden, weight, ref_hidden, ref_weight, labels = _meta_inputs(model, tokens, lora)
    policy_outputs = ("log_probs", "entropy", "mean_logits", "is_top1")  # DPOTrainer.__init__, loss_type sigmoid
    with _patched(clp, _use_triton=lambda device: True, _forward_kernel=forward_kernel,
                  _backward_kernel=backward_kernel, _addmm_fp32=addmm_fp32), _meta_autocast(), recorder.recording():
        log_probs, *_ = clp.ChunkedLogProbFunction.apply(
            hidden, weight, None, labels, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, policy_outputs
        )
        with torch.no_grad():
            clp.ChunkedLogProbFunction.apply(
                ref_hidden, ref_weight, None, labels, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs",)
            )
        torch.autograd.backward(log_probs, torch.empty_like(log_probs))
    return recorder


def record_ours(model: Model, tokens: int, lora: bool, method: str, backend: str) -> Recorder:
    """trl_tokenpo.kernels: the statistics TDPO2 ("tdpo2") or TIS-DPO "reverse" ("tisdpo-reverse") ask for."""
    import torch

    from trl_tokenpo.kernels import TokenStatsFunction, stats, tiles_triton
    from trl_tokenpo.trainer.base import METRIC_OUTPUTS

    recorder = Recorder()
    kl = "forward_kl" if method == "tdpo2" else "reverse_kl"
    outputs = (kl,) + METRIC_OUTPUTS  # what TokenLevelDPOTrainer._per_token_stats requests

    forward_kernel = KernelRecorder(recorder, "fused forward kernel", written=(5,),
                                    exps_per_element=lambda kw: 2 + _softcap_exps(kw, "P_SOFTCAP", "Q_SOFTCAP"))
    backward_kernel = KernelRecorder(
        recorder, "fused backward kernel", written=(0,),
        exps_per_element=lambda kw: 1 + int(kw["FKL"]) + _softcap_exps(kw, "P_SOFTCAP", "Q_SOFTCAP" if kw["REF"] else ""),
        skip=lambda kw: () if kw["REF"] else (2,),  # without the reference, the policy tile stands in for it
    )
    hidden, weight, ref_hidden, ref_weight, labels = _meta_inputs(model, tokens, lora)
    patches = dict(_forward_kernel=forward_kernel, _backward_kernel=backward_kernel)
    # TDPO2 detaches the chosen half's forward KL: only the rejected half (the second half of the tokens) needs the
    # reference's logits in the backward; TIS-DPO's reverse KL has a gradient on every token
    kl_rows = (tokens // 2, tokens) if method == "tdpo2" else None
    with _patched(tiles_triton, **patches), _patched(stats, mm_out_dtype_supported=lambda device: True), \
            _meta_autocast(), recorder.recording():
        results = TokenStatsFunction.apply(
            hidden, weight, None, ref_hidden, ref_weight, None, labels, 1.0, None, 1.0, None, outputs, None, backend,
            kl_rows,
        )
        policy_logps, _, forward_kl, reverse_kl = results[:4]
        kl_value = forward_kl if method == "tdpo2" else reverse_kl
        torch.autograd.backward([policy_logps, kl_value], [torch.empty_like(policy_logps), torch.empty_like(kl_value)])
    return recorder


# ----------------------------------------------------------------------------------------------------------------------
# Measurement on a GPU (--measure): the same three implementations, for real
# ----------------------------------------------------------------------------------------------------------------------


def measure_head(model: Model, tokens: int, key: str, repeats: int = 5) -> float:
    """Median milliseconds of the LM-head part of one LoRA step (``key``: ``dpo`` or ``<method>/<torch|fused>``) on
    the current CUDA device, with random bf16 weights."""
    import statistics

    import torch
    import trl.kernels.chunked_logprob as clp
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    from trl_tokenpo.kernels import fused_token_stats
    from trl_tokenpo.trainer.base import METRIC_OUTPUTS

    gen = torch.Generator(device="cuda").manual_seed(0)
    kwargs = dict(device="cuda", dtype=torch.bfloat16, generator=gen)
    hidden = torch.randn(tokens, model.hidden, **kwargs).requires_grad_()
    ref_hidden = hidden.detach() + 0.1 * torch.randn(tokens, model.hidden, **kwargs)
    weight = torch.randn(model.vocab, model.hidden, **kwargs) * model.hidden**-0.5
    labels = torch.randint(0, model.vocab, (tokens,), device="cuda", generator=gen)
    upstream = torch.randn(tokens, device="cuda", generator=gen)
    # TDPO2: the chosen half's KL is detached, so its gradient is zero there
    kl_upstream = torch.cat([torch.zeros(tokens // 2, device="cuda"), upstream[tokens // 2 :]])

    def step():
        hidden.grad = None
        if key == "dpo":
            log_probs, *_ = clp.ChunkedLogProbFunction.apply(
                hidden, weight, None, labels, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
                ("log_probs", "entropy", "mean_logits", "is_top1"),
            )
            with torch.no_grad():
                clp.ChunkedLogProbFunction.apply(
                    ref_hidden, weight, None, labels, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs",)
                )
            torch.autograd.backward(log_probs, upstream)
            return
        method, implementation = key.split("/")
        kl = "forward_kl" if method == "tdpo2" else "reverse_kl"
        out = fused_token_stats(hidden, weight, None, ref_hidden, weight, None, labels, outputs=(kl,) + METRIC_OUTPUTS,
                                backend="torch" if implementation == "torch" else "triton")
        kl_grad = kl_upstream if method == "tdpo2" else upstream
        torch.autograd.backward([out.policy_logps, getattr(out, kl)], [upstream, kl_grad])

    times = []
    for i in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        if i >= 2:  # warm-up: Triton compilation, allocator
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure_table(figures: dict | None = None) -> str:
    """The measured table (markdown); ``figures``, when given, receives ``{model: {key: {"measured_ms",
    "predicted_ms"}}}``."""
    import torch

    name = torch.cuda.get_device_name(0)
    gpu = next((g for g in GPUS if g.name.split()[0] in name), None)
    keys = ("dpo", "tdpo2/torch", "tdpo2/fused", "tisdpo-reverse/torch", "tisdpo-reverse/fused")
    lines = [
        f"Measured on {name} (LoRA, {TOKENS:,} tokens, bf16; median of 5 after 2 warm-ups; CUDA events): LM-head ms "
        f"per step, measured / predicted{'' if gpu else ' (no prediction for this GPU)'}",
        "",
        "| model | " + " | ".join(keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for model in MODELS:
        cells = []
        for key in keys:
            measured = measure_head(model, TOKENS, key)
            if figures is not None:
                figures.setdefault(model.name, {})[key] = {"measured_ms": measured, "predicted_ms": None}
            if gpu is None:
                cells.append(f"{measured:.2f}")
                continue
            if key == "dpo":
                predicted = record_dpo(model, TOKENS, lora=True).seconds(gpu) * 1e3
            else:
                method, implementation = key.split("/")
                backend = "torch" if implementation == "torch" else "triton"
                predicted = record_ours(model, TOKENS, True, method, backend).seconds(gpu) * 1e3
            if figures is not None:
                figures[model.name][key]["predicted_ms"] = predicted
            cells.append(f"{measured:.2f} / {predicted:.2f}")
        lines.append(f"| {model.name} | " + " | ".join(cells) + " |")
        torch.cuda.empty_cache()
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------------


def compute(lora: bool) -> list[dict]:
    rows = []
    for model in MODELS:
        heads = {"dpo": record_dpo(model, TOKENS, lora)}
        for method in ("tdpo2", "tisdpo-reverse"):
            for backend, label in (("torch", "torch"), ("triton", "fused")):
                heads[f"{method}/{label}"] = record_ours(model, TOKENS, lora, method, backend)
        backbone = model.backbone_flops(TOKENS, SEQ_LEN, lora)
        for gpu in GPUS:
            backbone_s = backbone / gpu.bf16_flops
            dpo_s = backbone_s + heads["dpo"].seconds(gpu)
            row = {"model": model, "gpu": gpu, "backbone_flops": backbone, "backbone_s": backbone_s, "heads": {}}
            for key, recorder in heads.items():
                total = recorder.total()
                head_s = recorder.seconds(gpu)
                row["heads"][key] = {
                    "bytes": total.read + total.written,
                    "flops": total.flops,
                    "head_s": head_s,
                    "ratio": (backbone_s + head_s) / dpo_s,
                }
            rows.append(row)
    return rows


def format_tables(lora: bool, rows: list[dict]) -> str:
    setting = "LoRA (frozen base and LM head)" if lora else "full fine-tuning (LM head trained)"
    head_keys = ("dpo", "tdpo2/torch", "tdpo2/fused", "tisdpo-reverse/torch", "tisdpo-reverse/fused")
    lines = [
        f"**{setting}**: LM-head traffic (GB) / flops (TFLOP) / roofline time (ms) per step, then the predicted step "
        "time ratio to DPO",
        "",
        "| model (hidden / vocab) | GPU | backbone TFLOP (ms) | DPO head | TDPO2 head, torch | TDPO2 head, fused | "
        "TIS-DPO rev. head, torch | TIS-DPO rev. head, fused | TDPO2 / DPO, torch → fused | "
        "TIS-DPO rev. / DPO, torch → fused |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        model, heads = row["model"], row["heads"]
        cells = [f"{heads[k]['bytes'] / 1e9:.1f} / {heads[k]['flops'] / 1e12:.2f} / {heads[k]['head_s'] * 1e3:.2f}"
                 for k in head_keys]
        lines.append(
            f"| {model.name} ({model.hidden:,} / {model.vocab:,}) | {row['gpu'].name} | "
            f"{row['backbone_flops'] / 1e12:.1f} ({row['backbone_s'] * 1e3:.1f}) | " + " | ".join(cells) + " | "
            f"{heads['tdpo2/torch']['ratio']:.2f}x → **{heads['tdpo2/fused']['ratio']:.3f}x** | "
            f"{heads['tisdpo-reverse/torch']['ratio']:.2f}x → **{heads['tisdpo-reverse/fused']['ratio']:.3f}x** |"
        )
    return "\n".join(lines)


def write_docs(body: str) -> None:
    text = DOCS.read_text()
    block = f"{MARKERS[0]}\n{body.strip()}\n{MARKERS[1]}"
    if MARKERS[0] in text and MARKERS[1] in text:
        head, rest = text.split(MARKERS[0], 1)
        text = head + block + rest.split(MARKERS[1], 1)[1]
    else:
        match = re.search(r"^## Quality", text, re.MULTILINE)
        cut = match.start() if match else len(text)
        text = text[:cut].rstrip("\n") + "\n\n" + block + "\n\n" + text[cut:]
    DOCS.write_text(text)
    print(f"updated {DOCS.relative_to(REPO)}", file=sys.stderr)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-docs", action="store_true", help="Replace the roofline block of docs/benchmarks.md.")
    parser.add_argument("--measure", action="store_true",
                        help="CUDA only: time the LM-head part of a LoRA step of the three implementations for real "
                        "and print it next to the prediction.")
    parser.add_argument("--markdown", default=None,
                        help="With --measure: also write the measured table to this file, as a docs block.")
    parser.add_argument("--json", default=None,
                        help="With --measure: also write the measured and predicted milliseconds to this JSON file.")
    return parser.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.measure:
        import torch

        if not torch.cuda.is_available():
            sys.exit("--measure needs a CUDA GPU.")
        figures = {}
        table = measure_table(figures)
        print(table)
        if args.markdown:  # a docs block, with its markers (scripts/gpu_check.py --paste puts it into the docs)
            Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
            Path(args.markdown).write_text(
                f"{MEASURED_MARKERS[0]}\n### The LM head alone, measured next to the prediction\n\nCommand: "
                f"`python scripts/roofline.py --measure`.\n\n{table}\n{MEASURED_MARKERS[1]}\n"
            )
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
        return table
    tables = [format_tables(lora, compute(lora)) for lora in (True, False)]
    body = (
        "### Roofline prediction on H100 / H200 (LM head of one step)\n\n"
        "Command: `python scripts/roofline.py --write-docs`. "
        f"{TOKENS:,} tokens per step ({TOKENS // SEQ_LEN} sequences x {SEQ_LEN:,}), all scored, bf16. "
        "The script runs each implementation's own code on meta tensors of these shapes and counts what every "
        "operation and kernel launch reads, writes and computes (see its docstring for the rules and the GPU "
        "figures); an operation takes max(bytes / bandwidth, flops / bf16 peak, exponentials / SFU rate), the rest of "
        "the step its flops at the bf16 peak.\n\n" + "\n\n".join(tables) + "\n"
    )
    print(body)
    if args.write_docs:
        write_docs(body)
    return body


if __name__ == "__main__":
    main()
