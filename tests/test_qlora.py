"""QLoRA: a 4-bit (bitsandbytes NF4, CPU) base model with LoRA adapters trains with both trainers, and only the adapters
change.

The only other difference after training is a dtype conversion done by bitsandbytes itself: `Linear4bit.forward`
casts the input to `bnb_4bit_compute_dtype` and then converts the layer's bias IN PLACE to that dtype
(`bias.data = bias.data.to(x.dtype)`, bitsandbytes 0.50). With a float32 checkpoint and a bfloat16 compute dtype every
bias of every quantized layer (with or without an adapter) becomes the bfloat16 rounding of its float32 value on the
first forward, before any optimizer step. The tests tell that apart from an update: the new value must be exactly the
old one cast to the compute dtype, and it appears already after a forward with no step.

On a CPU with AVX512-BF16, bitsandbytes 0.50 also converts a 4-bit layer in place for its CPU inference kernel in an
eval-mode forward without gradient, rounding its scales to bfloat16, and `state_dict()` does not convert the scales
back (see trl_tokenpo/quantization.py): a real, lasting change of the frozen base. The trainers and the estimator turn
that conversion off. This machine lacks AVX512-BF16, so the tests that run such forwards take that path through the
`avx512bf16_cpu_path` fixture: the layers believe the CPU has AVX512-BF16, and the fused kernel, which cannot run here,
is replaced by a reference computation on the same packed layout. Everything else (the conversion, `state_dict()`) is
bitsandbytes' own code.
"""

import copy
import math

import pytest
import torch
from conftest import build_tokenizer, cpu_args, preference_rows
from datasets import Dataset


bnb = pytest.importorskip("bitsandbytes")

from packaging.version import Version  # noqa: E402
from transformers import BitsAndBytesConfig  # noqa: E402

from trl_tokenpo import TDPOConfig, TDPOTrainer, TISDPOConfig, TISDPOTrainer  # noqa: E402
from trl_tokenpo.data import tokenize_preference_dataset  # noqa: E402


# bitsandbytes >= 0.50 casts each bias in place to the compute dtype; earlier releases cast it to the input's dtype,
# float32 here like the bias, so nothing changes
BIAS_CAST_TO_COMPUTE_DTYPE = Version(bnb.__version__) >= Version("0.50.0")


@pytest.fixture(scope="module")
def biased_model_dir(tmp_path_factory):
    """A tiny Llama with attention biases (non-zero), saved in float32: the biases are where bitsandbytes' dtype cast
    shows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, attention_bias=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
    path = tmp_path_factory.mktemp("tiny-llama-bias")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def avx512bf16_cpu_path(monkeypatch):
    """Linear4bit layers created from now on take bitsandbytes' CPU inference path as on a CPU with AVX512-BF16."""
    import bitsandbytes.functional as F

    init, gemv = bnb.nn.Linear4bit.__init__, F.gemv_4bit

    def linear4bit_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.support_avx512bf16_for_cpu = True

    def gemv_4bit(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
        if not getattr(state, "packing_format_for_cpu", False):
            return gemv(A, B, out=out, transposed_A=transposed_A, transposed_B=transposed_B, state=state)
        # the fused kernel: bfloat16 input and scales, scales read as [in_features / blocksize, out_features]
        n, k = state.shape
        unpacked = copy.copy(state)
        qweight, unpacked = F._convert_weight_packed_for_cpu_inverse(B.clone(), unpacked)
        unpacked = copy.copy(unpacked)
        unpacked.absmax = state.absmax.reshape(k // state.blocksize, n).T.reshape(-1).float()
        unpacked.nested, unpacked.dtype = False, torch.float32
        weight = F.dequantize_4bit(qweight, unpacked).to(torch.bfloat16)
        return (A.to(torch.bfloat16) @ weight.T).to(A.dtype)

    monkeypatch.setattr(bnb.nn.Linear4bit, "__init__", linear4bit_init)
    monkeypatch.setattr(F, "gemv_4bit", gemv_4bit)


def make_trainer(method, model_dir, tmp_path, compute_dtype, **overrides):
    from peft import LoraConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
    )
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    dataset = Dataset.from_list(preference_rows())
    options = dict(max_steps=2, learning_rate=2e-2, **overrides)
    kwargs = dict(model=model_dir, train_dataset=dataset, quantization_config=quantization, peft_config=peft_config)
    if method == "tdpo":
        return TDPOTrainer(args=cpu_args(TDPOConfig, tmp_path, **options), **kwargs)
    tokenizer = build_tokenizer()
    ids = tokenize_preference_dataset(dataset, tokenizer)
    weights = {
        side: [[0.5 + ((i + r) % 3) / 2 for i in range(len(x))] for r, x in enumerate(ids[f"{side}_ids"])]
        for side in ("chosen", "rejected")
    }
    kwargs["train_dataset"] = dataset.add_column("chosen_weights", weights["chosen"]).add_column(
        "rejected_weights", weights["rejected"]
    )
    args = cpu_args(TISDPOConfig, tmp_path, tis_kl_term=method.split("_")[1], **options)
    return TISDPOTrainer(args=args, **kwargs)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def frozen_changes(before, after, compute_dtype):
    """Non-adapter entries that changed, and the subset explained by bitsandbytes' in-place bias cast."""
    changed, cast = [], []
    for key, old in before.items():
        if "lora_" in key:
            continue
        new = after[key]
        if new.dtype == old.dtype and torch.equal(new, old):
            continue
        if key.endswith(".bias") and new.dtype == compute_dtype and torch.equal(new, old.to(new.dtype)):
            cast.append(key)
        else:
            changed.append(key)
    return changed, cast


@pytest.mark.parametrize(
    "method, compute_dtype",
    [
        ("tdpo", torch.float32),
        ("tdpo", torch.bfloat16),
        ("tisdpo_none", torch.float32),
        ("tisdpo_tdpo", torch.bfloat16),
    ],
)
def test_qlora_trains_only_the_adapters(tmp_path, biased_model_dir, method, compute_dtype):
    trainer = make_trainer(method, biased_model_dir, tmp_path, compute_dtype)
    model = trainer.model
    base = model.get_base_model()
    assert getattr(base, "is_loaded_in_4bit", False)
    assert type(base.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert type(base.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert trainer.ref_model is None  # the reference is the 4-bit base with the adapters disabled
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = snapshot(model)

    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2 and all(math.isfinite(e["loss"]) for e in logs)
    if method != "tisdpo_none":
        assert all(math.isfinite(e["kl/chosen"]) for e in logs)
    after = snapshot(model)

    changed, cast = frozen_changes(before, after, compute_dtype)
    assert changed == [], f"frozen (non-adapter) entries changed: {changed}"
    biases = [k for k in before if k.endswith(".bias") and "lora_" not in k]
    if compute_dtype == torch.float32 or not BIAS_CAST_TO_COMPUTE_DTYPE:
        assert cast == []
    else:
        # every bias of a quantized layer was cast (adapted or not): a bitsandbytes dtype conversion, not an update
        assert sorted(cast) == sorted(biases)
    assert any(not torch.equal(after[k], before[k]) for k in before if "lora_B" in k), "the adapters did not train"


def test_bias_cast_happens_in_a_forward_without_any_step(tmp_path, biased_model_dir, avx512bf16_cpu_path):
    """The bfloat16 biases come from bitsandbytes' forward, not from the optimizer: one loss computation, no step.
    Nothing else changes, also where bitsandbytes would convert the layers for CPU inference (eval mode, no grad)."""
    trainer = make_trainer("tdpo", biased_model_dir, tmp_path, torch.bfloat16)
    before = snapshot(trainer.model)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    assert math.isfinite(loss.item())
    changed, cast = frozen_changes(before, snapshot(trainer.model), torch.bfloat16)
    assert changed == [] and bool(cast) == BIAS_CAST_TO_COMPUTE_DTYPE


def test_qlora_estimator_scores_and_leaves_the_base_model_unchanged(tmp_path, biased_model_dir, avx512bf16_cpu_path):
    estimator_module = pytest.importorskip("trl_tokenpo.estimator")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(biased_model_dir, quantization_config=quantization)
    tokenizer = AutoTokenizer.from_pretrained(biased_model_dir)
    before = snapshot(model)
    args = estimator_module.WeightEstimatorConfig(
        str(tmp_path / "estimator"), method="sft", max_steps=2, use_cpu=True, report_to="none", disable_tqdm=True,
        lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"], lora_dropout=0.0, per_device_train_batch_size=4,
    )  # fmt: skip
    dataset = Dataset.from_list(preference_rows(6))
    result = estimator_module.ContrastiveWeightEstimator(model, tokenizer, args=args).estimate(dataset)
    ids = tokenize_preference_dataset(dataset, tokenizer)
    for side in ("chosen", "rejected"):
        rewards = result[f"{side}_token_rewards"]
        assert [len(r) for r in rewards] == [len(x) for x in ids[f"{side}_ids"]]
        assert all(math.isfinite(v) for row in rewards for v in row)
    assert any(v != 0.0 for row in result["chosen_token_rewards"] for v in row)  # the two adapters differ
    changed, cast = frozen_changes(before, snapshot(model), torch.float32)
    assert changed == [] and cast == []


def test_a_base_converted_for_cpu_inference_before_training_is_converted_back(biased_model_dir, caplog):
    """A 4-bit model the user ran CPU inference with (on AVX512-BF16) reaches the trainer converted: it is converted
    back to the layout training reads (scales rounded to bfloat16 by that conversion, as the warning says)."""
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM

    from trl_tokenpo.quantization import keep_4bit_layout

    if not hasattr(F, "_convert_weight_packed_for_cpu"):
        pytest.skip(f"bitsandbytes {bnb.__version__} has no CPU inference conversion (added in 0.49)")

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(biased_model_dir, quantization_config=quantization)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    before = {name: (m.weight.data.clone(), m.weight.quant_state.absmax.clone()) for name, m in layers.items()}
    assert any(m.in_features > m.weight.quant_state.blocksize for m in layers.values())  # rows of several blocks
    for m in layers.values():  # what Linear4bit.forward does in eval mode without grad on AVX512-BF16
        m.weight.data, m.weight.quant_state = F._convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)

    with caplog.at_level("WARNING"):
        restored = keep_4bit_layout(model)
    assert sorted(restored) == sorted(layers)
    assert f"{len(layers)} 4-bit layers" in caplog.text and "bfloat16 rounding" in caplog.text
    for name, m in layers.items():
        data, absmax = before[name]
        state = m.weight.quant_state
        assert not state.packing_format_for_cpu and not m.support_avx512bf16_for_cpu
        assert torch.equal(m.weight.data, data), name
        assert torch.equal(state.absmax, absmax.to(torch.bfloat16).float()), name
    assert keep_4bit_layout(model) == []
