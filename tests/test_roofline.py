"""scripts/roofline.py counts the LM-head work from the implementations' own code: check its counts on a small shape
where they are known exactly, so that a change in the kernels (ours or TRL's) cannot silently break the prediction.

The script patches private names of TRL 1.16 (`trl.kernels.chunked_logprob._use_triton`, `_forward_kernel`,
`_backward_kernel`, `_addmm_fp32`, `trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE`); these tests fail when they move."""

import contextlib
import importlib.util
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def roofline():
    pytest.importorskip("triton")  # both Triton paths are recorded through their launch code
    spec = importlib.util.spec_from_file_location("roofline", ROOT / "scripts" / "roofline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("lora", [True, False])
def test_matmul_flops_and_traffic_on_a_small_shape(roofline, lora):
    model = roofline.Model("tiny", hidden=64, vocab=5000, layers=1, heads=1, kv_heads=1, head_dim=64, intermediate=128)
    tokens = 512  # one tile for every implementation
    projection = 2.0 * tokens * model.vocab * model.hidden
    extra = 0 if lora else 1  # the LM head's weight gradient
    dpo = roofline.record_dpo(model, tokens, lora).total()
    # policy forward, reference forward, policy recomputed in the backward, hidden-state gradient (+ weight gradient)
    assert dpo.flops == pytest.approx((4 + extra) * projection)
    counts = {}
    for method, ref_rows in (("tdpo2", 0.5), ("tisdpo-reverse", 1.0)):
        for backend in ("torch", "triton"):
            total = roofline.record_ours(model, tokens, lora, method, backend).total()
            counts[method, backend] = total
            # the reference is projected again in the backward: for every token (torch, and TIS-DPO's reverse KL) or
            # only for the rejected half, whose KL has a gradient (TDPO2 on Triton)
            again = ref_rows if backend == "triton" else 1.0
            assert total.flops == pytest.approx((4 + again + extra) * projection), (method, backend)
    elements = tokens * model.vocab
    # TRL's head moves about 16 bytes per logit (bf16 tiles, one kernel per tile; plus the weight and its float32
    # gradient, which weigh more at this small token count); ours fused stays close to it, the torch tiles move an
    # order of magnitude more (float32 passes)
    weights = 0 if lora else 8
    assert 14 * elements < dpo.read + dpo.written < (20 + weights) * elements
    for method in ("tdpo2", "tisdpo-reverse"):
        fused, torch_tiles = counts[method, "triton"], counts[method, "torch"]
        assert fused.read + fused.written < (24 + weights) * elements
        assert torch_tiles.read + torch_tiles.written > 5 * (fused.read + fused.written)


def test_step_ratios_stay_within_the_goal(roofline):
    # The prediction the docs quote (docs/benchmarks.md, roofline block): <= 1.10x DPO at every shape, with LoRA
    rows = roofline.compute(lora=True)
    ratios = {(row["model"].name, row["gpu"].name, key): row["heads"][key]["ratio"] for row in rows
              for key in ("tdpo2/fused", "tisdpo-reverse/fused")}
    assert len(ratios) == 2 * len(roofline.MODELS) * len(roofline.GPUS)
    assert all(1.0 < ratio <= 1.10 for ratio in ratios.values()), ratios


class Torch211MetaAddmm:
    """Makes ``torch.addmm(..., out_dtype=...)`` on meta tensors fail as it does in torch 2.11, where the only meta
    implementation of ``aten::addmm.dtype`` / ``.dtype_out`` is the plain ``addmm`` decomposition: it takes the
    ``out_dtype`` argument for ``beta`` and multiplies it with a tensor. A dispatch mode entered below the recorder's
    sees every op the recorder runs for real, and raises for those."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func._schema.name == "aten::addmm" and func._schema.overload_name in ("dtype", "dtype_out"):
                    beta = args[3]  # what torch 2.11's decomposition receives as beta: the dtype
                    return beta * args[0]  # TypeError: unsupported operand type(s) for *: 'torch.dtype' and 'Tensor'
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def __enter__(self):
        return self.mode.__enter__()

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def test_the_float32_accumulating_matmul_is_recorded_on_meta_tensors_without_running_it(roofline):
    # The CUDA branch of TRL's `_addmm_fp32` (and of our `accumulate_mm`), as the recordings take it. On CPU tensors
    # the op does not exist (`aten::addmm.dtype_out` has CUDA kernels only), so only meta tensors can run it here.
    import torch

    acc = torch.empty(64, 48, device="meta", dtype=torch.float32)
    a = torch.empty(64, 32, device="meta", dtype=torch.bfloat16)
    b = torch.empty(32, 48, device="meta", dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError):
        roofline.addmm_fp32(*(torch.zeros_like(t, device="cpu") for t in (acc, a, b)))
    for torch_211 in (False, True):
        recorder = roofline.Recorder()
        with Torch211MetaAddmm() if torch_211 else contextlib.nullcontext(), recorder.recording():
            roofline.addmm_fp32(acc, a, b)
            result = torch.addmm(acc, a, b, out_dtype=torch.float32)  # the overload without `out`
        assert result.shape == (64, 48) and result.dtype == torch.float32 and result.is_meta
        assert [op.name for op in recorder.ops] == ["addmm", "addmm"]
        op = recorder.ops[0]
        assert op.flops == 2 * 64 * 32 * 48
        assert op.read == 64 * 48 * 4 + (64 * 32 + 32 * 48) * 2 and op.written == 64 * 48 * 4


def test_torch_211_meta_addmm_fails_without_the_recorder(roofline):
    # The emulation above does what torch 2.11 did under the recorder before the fix: a TypeError from the op
    import torch

    acc = torch.empty(4, 5, device="meta")
    a, b = torch.empty(4, 3, device="meta", dtype=torch.bfloat16), torch.empty(3, 5, device="meta", dtype=torch.bfloat16)
    with Torch211MetaAddmm(), pytest.raises(TypeError, match="torch.dtype"):
        roofline.addmm_fp32(acc, a, b)


@pytest.mark.parametrize("record", ["dpo", "tdpo2", "tisdpo-reverse"])
def test_recordings_are_the_same_under_torch_211s_meta_addmm(roofline, record):
    # The predictions of `roofline.py --measure` (which records each implementation next to its measurement) crashed
    # on torch 2.11; with its meta behaviour emulated, every recording gives the same counts as on this torch
    model = roofline.Model("tiny", hidden=64, vocab=5000, layers=1, heads=1, kv_heads=1, head_dim=64, intermediate=128)

    def counts():
        if record == "dpo":
            recorder = roofline.record_dpo(model, 512, lora=True)
        else:
            recorder = roofline.record_ours(model, 512, True, record, "triton")
        total = recorder.total()
        return len(recorder.ops), total.read, total.written, total.flops, total.exps

    expected = counts()
    with Torch211MetaAddmm():
        assert counts() == expected
