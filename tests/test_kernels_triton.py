"""The Triton backend of trl_tokenpo.kernels against the dense float64 reference and the torch backend.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``
before ``triton`` is imported). The interpreter is slow (tens of milliseconds per program), so the shapes are tiny and
the tiles are made smaller still, so that every boundary case happens: token chunks that end mid-way (4 rows per tile),
vocabulary chunks that end mid-way (29 = 12 + 12 + 5 columns) and column blocks that end mid-way (blocks of 8).
"""

import copy
import os
import subprocess
import sys

import pytest
import torch
from kernel_reference import (
    DIFFERENTIABLE,
    assert_close,
    coefficients,
    combination,
    dense_from_logits,
    dense_head_stats,
    grads_of,
    loss_of,
    make_batch,
    make_inputs,
    perturbed_copy,
    run_token_stats,
    tiny_qwen,
)

from trl_tokenpo.kernels import (
    OPTIONAL_OUTPUTS,
    TokenStatsRequest,
    add_token_stats_head,
    fused_token_stats,
    tiles_triton,
)


# `cuda`: on a GPU these run the compiled kernels (scripts/gpu_check.sh selects them with `pytest -m cuda`)
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not tiles_triton.available() or not (tiles_triton.interpreted() or torch.cuda.is_available()),
        reason="needs `triton`, and a CUDA GPU or TRITON_INTERPRET=1 set before triton is imported",
    ),
]

DEVICE = "cpu" if tiles_triton.interpreted() else "cuda"
VALUES = ("policy_logps", "ref_logps", "forward_kl", "reverse_kl", "entropy", "mean_logits", "log_sum_sq_probs")
N, H, V, H_REF = 6, 8, 29, 6
TILE = 4 * 12  # 4 rows x 12 columns with MAX_ROWS = 4


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(tiles_triton, "MAX_ROWS", 4)
    monkeypatch.setattr(tiles_triton, "BLOCK_SIZE", 8)


def _on_device(inputs):
    return [None if t is None else t.detach().to(DEVICE).requires_grad_(t.requires_grad) for t in inputs]


def _grads(out, coefs, params):
    return torch.autograd.grad(combination(out, {k: v.to(DEVICE) for k, v in coefs.items()}, torch.float32), params)


def test_tile_shape():
    assert tiles_triton.tile_shape(6, 29, TILE) == (4, 12)
    assert tiles_triton.tile_shape(3, 29, 10**6) == (3, 29)  # a single tile
    assert tiles_triton.tile_shape(6, 29, 2) == (2, 1)


@pytest.mark.parametrize(
    "policy_scale, policy_softcap, ref_scale, ref_softcap, bias",
    [(1.0, None, 1.0, None, True), (1.7, 2.5, 0.8, 6.0, False)],
)
def test_values_and_gradients_match_dense_and_torch(policy_scale, policy_softcap, ref_scale, ref_softcap, bias):
    inputs = make_inputs(n=N, h=H, v=V, h_ref=H_REF, bias=bias, seed=21)
    device_inputs = _on_device(inputs)
    transforms = dict(
        policy_logit_scale=policy_scale, policy_softcap=policy_softcap, ref_logit_scale=ref_scale,
        ref_softcap=ref_softcap, outputs=OPTIONAL_OUTPUTS, tile_elements=TILE,
    )
    out = fused_token_stats(*device_inputs, backend="triton", **transforms)
    torch_out = fused_token_stats(*device_inputs, backend="torch", **transforms)
    expected, leaves = dense_head_stats(inputs, policy_scale, policy_softcap, ref_scale, ref_softcap)
    for name in VALUES:
        value = getattr(out, name)
        assert value.dtype == torch.float32 and value.shape == (N,), name
        assert_close(value.cpu(), expected[name])
        assert_close(value, getattr(torch_out, name), rtol=1e-5, atol=1e-5)
    assert torch.equal(out.is_top1.cpu(), expected["is_top1"])

    coefs = coefficients(N, DIFFERENTIABLE, seed=2)
    params = [t for t in device_inputs[:3] if t is not None]
    grads = _grads(out, coefs, params)
    torch_grads = _grads(torch_out, coefs, params)
    expected_grads = torch.autograd.grad(
        combination(expected, coefs, torch.float64), [t for t in leaves if t is not None]
    )
    for grad, torch_grad, expected_grad in zip(grads, torch_grads, expected_grads):
        assert grad.dtype == torch.float32
        assert_close(grad.cpu(), expected_grad)
        assert_close(grad, torch_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", ["rejected-half", "scattered", "none"])
def test_kl_gradients_on_some_tokens_only(pattern):
    # Some tokens' KL gets no gradient (TDPO2 detaches the chosen side's KL); without `kl_gradient_rows` the backward
    # projects the reference for every token and must give the same gradients whatever the pattern (the rows given by
    # `kl_gradient_rows`: tests/test_sync_free.py)
    inputs = make_inputs(n=N, h=H, v=V, h_ref=H_REF, seed=22)
    device_inputs = _on_device(inputs)
    out = fused_token_stats(*device_inputs, backend="triton", outputs=("forward_kl", "reverse_kl"), tile_elements=TILE)
    expected, leaves = dense_head_stats(inputs)
    coefs = coefficients(N, DIFFERENTIABLE, seed=3)
    keep = {
        "rejected-half": torch.arange(N) >= N // 2,
        "scattered": torch.tensor([True, False, False, True, False, True]),
        "none": torch.zeros(N, dtype=torch.bool),
    }[pattern]
    coefs["forward_kl"] = coefs["forward_kl"] * keep
    coefs["reverse_kl"] = coefs["reverse_kl"] * keep.roll(1) if pattern == "scattered" else coefs["reverse_kl"] * keep
    grads = _grads(out, coefs, device_inputs[:3])
    expected_grads = torch.autograd.grad(combination(expected, coefs, torch.float64), leaves)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close(grad.cpu(), expected_grad)


@pytest.mark.parametrize("mode", ["bf16-tensors", "bf16-autocast"])
def test_bf16(mode):
    inputs = make_inputs(n=N, h=H, v=V, h_ref=H_REF, seed=23)
    device_inputs = _on_device(inputs)
    context = torch.autocast(DEVICE, dtype=torch.bfloat16)
    if mode == "bf16-tensors":
        hp, w, b, hr, wr, br, labels = device_inputs
        hp, w, b = (t.detach().bfloat16().requires_grad_() for t in (hp, w, b))
        device_inputs = [hp, w, b, hr.bfloat16(), wr.bfloat16(), br.bfloat16(), labels]
        context = torch.autocast(DEVICE, enabled=False)
    with context:
        out = fused_token_stats(*device_inputs, backend="triton", outputs=OPTIONAL_OUTPUTS, tile_elements=TILE)
        torch_out = fused_token_stats(*device_inputs, backend="torch", outputs=OPTIONAL_OUTPUTS, tile_elements=TILE)
    expected, leaves = dense_head_stats(inputs)
    for name in VALUES:
        value = getattr(out, name)
        assert value.dtype == torch.float32, name
        # Both backends round the same bf16 logits, then compute in float32
        assert_close(value, getattr(torch_out, name), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(value.double().cpu(), expected[name], rtol=0.05, atol=0.1)
    assert torch.equal(out.is_top1, torch_out.is_top1)

    coefs = coefficients(N, DIFFERENTIABLE, seed=4)
    grads = _grads(out, coefs, device_inputs[:3])
    torch_grads = _grads(torch_out, coefs, device_inputs[:3])
    expected_grads = torch.autograd.grad(combination(expected, coefs, torch.float64), leaves)
    for grad, torch_grad, expected_grad in zip(grads, torch_grads, expected_grads):
        assert grad.dtype == (torch.bfloat16 if mode == "bf16-tensors" else torch.float32)
        scale = expected_grad.abs().max().item()
        # The gradient tile is rounded to bf16 in both backends (the torch one before its bias sum, hence the margin)
        torch.testing.assert_close(grad.double(), torch_grad.double(), rtol=0.02, atol=0.02 * scale)
        torch.testing.assert_close(grad.double().cpu(), expected_grad, rtol=0.05, atol=0.05 * scale)


def test_is_top1_takes_the_first_argmax_across_column_chunks():
    # Identity head: the logits are the hidden states; 2 columns per tile, so ties cross tile boundaries
    logits = torch.tensor(
        [
            [1.0, 3.0, 3.0, 0.0, 0.0],  # label 1: tied with a LATER token (next tile) -> top-1
            [1.0, 3.0, 3.0, 0.0, 0.0],  # label 2: tied with an EARLIER token (previous tile) -> not top-1
            [1.0, 3.0, 3.0, 0.0, 0.0],  # label 0: not a maximum
            [0.0, 0.0, 0.0, 0.0, 2.0],  # label 4: unique maximum, in the last, partial tile
            [2.0, 2.0, 2.0, 2.0, 2.0],  # label 0: all tied, the first one wins
            [2.0, 2.0, 2.0, 2.0, 2.0],  # label 3: all tied
        ],
        device=DEVICE,
    )
    labels = torch.tensor([1, 2, 0, 4, 0, 3], device=DEVICE)
    eye = torch.eye(5, device=DEVICE)
    out = fused_token_stats(logits, eye, None, logits, eye, None, labels, outputs=("is_top1",), tile_elements=8,
                            backend="triton")
    assert out.is_top1.tolist() == [True, False, False, True, True, False]


def test_no_scored_token():
    hp, w, b, hr, wr, br, labels = _on_device(make_inputs(n=N, h=H, v=V, h_ref=H_REF))
    out = fused_token_stats(hp[:0], w, b, hr[:0], wr, br, labels[:0], outputs=OPTIONAL_OUTPUTS, backend="triton")
    assert out.policy_logps.shape == (0,)
    grads = torch.autograd.grad(out.policy_logps.sum() + out.forward_kl.sum() + out.reverse_kl.sum(), [w, b])
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.fixture
def one_block_per_row(monkeypatch):
    # The model tests are about the patch, not the tiling: one tile, one block per row keeps the interpreter quick
    monkeypatch.setattr(tiles_triton, "MAX_ROWS", 4096)
    monkeypatch.setattr(tiles_triton, "BLOCK_SIZE", 128)


@pytest.mark.parametrize("case", ["tied-embeddings", "peft-reference"])
def test_model_patch_matches_torch_backend(case, one_block_per_row):
    # A patched model with backend="triton" gives what the torch backend (tested against dense forwards) gives:
    # tied input / output embeddings with full fine-tuning, and PEFT with the adapter-disabled model as reference (the
    # very same LM head parameter on both sides)
    model = tiny_qwen(tie_word_embeddings=True).to(DEVICE)
    if case == "peft-reference":
        peft = pytest.importorskip("peft")
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = peft.get_peft_model(model, lora)
        add_token_stats_head(model.get_base_model())
    else:
        reference_model = perturbed_copy(model)
        add_token_stats_head(model)
        add_token_stats_head(reference_model)
    input_ids, attention_mask, labels = (t.to(DEVICE) for t in make_batch())
    coefs = {k: v.to(DEVICE) for k, v in coefficients(labels.shape[1] - 1, DIFFERENTIABLE, seed=5).items()}

    results = {}
    for backend in ("triton", "torch"):
        if case == "peft-reference":
            with torch.no_grad(), model.disable_adapter():
                reference = model(input_ids=input_ids, attention_mask=attention_mask,
                                  token_stats=TokenStatsRequest(labels))
            request = TokenStatsRequest(labels, reference=reference, outputs=("forward_kl", "reverse_kl"),
                                        backend=backend)
            out = model(input_ids=input_ids, attention_mask=attention_mask, token_stats=request)
        else:
            _, out = run_token_stats(model, reference_model, (input_ids, attention_mask, labels), backend=backend)
        loss_of(out, coefs).backward()
        results[backend] = (out, grads_of(model))
        model.zero_grad(set_to_none=True)

    (out, grads), (torch_out, torch_grads) = results["triton"], results["torch"]
    for name in DIFFERENTIABLE + ("ref_logps",):
        assert_close(getattr(out, name), getattr(torch_out, name), rtol=1e-5, atol=1e-5)
    assert out.forward_kl[out.label_mask].abs().min() > 0  # policy and reference differ
    assert grads and grads.keys() == torch_grads.keys()
    if case == "peft-reference":
        assert all("lora_" in name for name in grads)
    else:
        assert "model.embed_tokens.weight" in grads  # the tied head's gradient reaches the embedding
    for name in grads:
        assert_close(grads[name], torch_grads[name], rtol=1e-4, atol=1e-5)


def test_dense_reference_of_the_model_patch_cases(one_block_per_row):
    # The model-patch comparison above trusts the torch backend; this checks, once, that a tied-embedding model's
    # statistics from the Triton backend also equal the dense forward itself
    model = tiny_qwen(tie_word_embeddings=True).to(DEVICE)
    reference_model = perturbed_copy(model)
    dense_model = copy.deepcopy(model)
    add_token_stats_head(model)
    add_token_stats_head(reference_model)
    input_ids, attention_mask, labels = (t.to(DEVICE) for t in make_batch())
    _, out = run_token_stats(model, reference_model, (input_ids, attention_mask, labels), backend="triton")
    with torch.no_grad():
        z_pol = dense_model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        z_ref = reference_model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    mask = labels[:, 1:] != -100
    expected = dense_from_logits(z_pol[mask], z_ref[mask], labels[:, 1:][mask])
    for name in ("policy_logps", "ref_logps", "forward_kl", "reverse_kl"):
        assert_close(getattr(out, name)[mask], expected[name], rtol=1e-4, atol=1e-5)


COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from trl_tokenpo.kernels import tiles_triton

assert type(tiles_triton._forward_kernel).__name__ == "JITFunction"
pointers = ["*bf16", "i32", "*bf16", "i32", "*i64", "*fp32", "i32", "i32", "i32", "fp32", "fp32", "fp32", "fp32"]
for kernel in (tiles_triton._forward_kernel, tiles_triton._backward_kernel):
    names = list(kernel.arg_names)
    flags = {(i,): True for i in range(len(pointers), len(names) - 1)}
    signature = dict(zip(names, pointers + ["constexpr"] * (len(names) - len(pointers))))
    source = ASTSource(fn=kernel, signature=signature, constexprs={**flags, (len(names) - 1,): 1024})
    assert "cubin" in triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm
print("compiled")
"""


def test_kernels_compile_for_hopper_without_a_gpu(tmp_path):
    # The interpreter accepts code that the compiler rejects (types of loop-carried values, constexpr use): compile
    # both kernels, every option on, for sm_90 with Triton's bundled ptxas, in a process without the interpreter
    pytest.importorskip("triton.compiler", reason="needs Triton's compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
