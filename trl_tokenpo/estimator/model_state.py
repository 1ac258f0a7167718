"""The base model's state around the estimator's work: what adapter training and scoring change, and how it is undone.

* :class:`ModelSnapshot` records and restores what TRL's trainers change on the base model (patched `forward`,
  `requires_grad`, train mode, gradient checkpointing, `use_cache`).
* :func:`attached_pair` puts the two adapters on the base model for scoring and takes them out afterwards; its
  `use(adapter)` makes one adapter (or none) the model a pass runs. Plain LoRA adapters on float32 / float16 linear
  layers are added to the base weights for the pass (`W + B A * scaling`, what PEFT's merge computes) without PEFT
  layers (:class:`DirectLoraPair`: no per-call module surgery); other adapters are loaded with PEFT
  (:class:`AttachedPair`), merged when that is exact. The base weights are restored bit for bit after every pass.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from transformers import PreTrainedModel

from ..compat import checkpointing_enabled, set_checkpointing


__all__ = [
    "AttachedPair",
    "DirectLoraPair",
    "ModelSnapshot",
    "attached_pair",
    "direct_lora_pair",
    "is_peft_model",
    "merge_backup",
    "strip_adapter_layers",
]

_MISSING = object()


def is_peft_model(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def strip_adapter_layers(model: torch.nn.Module) -> None:
    """Replace every PEFT adapter layer injected into `model` by the layer it wraps."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())


class ModelSnapshot:
    """What the trainers change on the base model, restored by :meth:`restore`: the instance `forward` (TRL and this
    package patch a fused LM head onto it) and any other attribute set on the instance, `requires_grad` of every
    parameter (PEFT freezes the base), the train/eval mode, gradient checkpointing and `config.use_cache`."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.attributes = set(model.__dict__)
        self.forward = model.__dict__.get("forward", _MISSING)
        self.requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self.training = model.training
        self.gradient_checkpointing = checkpointing_enabled(model)
        self.use_cache = getattr(model.config, "use_cache", None)

    def restore(self) -> None:
        model = self.model
        for name in set(model.__dict__) - self.attributes:  # e.g. the patched forward and its "already patched" flag
            del model.__dict__[name]
        if self.forward is not _MISSING:
            model.forward = self.forward
        for name, p in model.named_parameters():
            if name in self.requires_grad:
                p.requires_grad_(self.requires_grad[name])
        model.train(self.training)
        if checkpointing_enabled(model) and not self.gradient_checkpointing:
            set_checkpointing(model, False)
        if self.use_cache is not None:
            model.config.use_cache = self.use_cache


def merge_backup(peft_model) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """A CPU copy of every base weight an adapter merge changes, or None when merging is not used.

    Merging is used only for LoRA adapters on plain float32 / float16 layers (`Linear`, `Embedding`, `Conv1d/2d`,
    transformers' `Conv1D`): not for quantized layers (a merge would requantize) nor bfloat16 ones (a merged bfloat16
    weight rounds `W + BA` to 8 bits of mantissa). The copy lets :meth:`AttachedPair.use` restore the weights exactly;
    it costs host memory the size of the adapted layers' weights.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import PeftType
    from transformers.pytorch_utils import Conv1D

    mergeable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
    if any(config.peft_type != PeftType.LORA for config in peft_model.peft_config.values()):
        return None
    params: dict[int, torch.Tensor] = {}
    for module in peft_model.modules():
        if not isinstance(module, BaseTunerLayer) or not hasattr(module, "lora_A"):
            continue
        base = module.get_base_layer()
        if type(base) not in mergeable:
            return None
        for param in base.parameters(recurse=False):
            if param.dtype not in (torch.float32, torch.float16) or param.is_meta:
                return None
            params[id(param)] = param
    if not params:
        return None
    return [(param, param.detach().to("cpu", copy=True)) for param in params.values()]


class AttachedPair:
    """The base model with the `"plus"` and `"minus"` adapters loaded (or none, for the prompt method)."""

    def __init__(self, model: PreTrainedModel, peft_model=None, merge: bool = True):
        self.model, self.peft_model = model, peft_model
        self.backup = merge_backup(peft_model) if peft_model is not None and merge else None

    @contextlib.contextmanager
    def use(self, adapter: str | None) -> Iterator[PreTrainedModel]:
        """Yield the transformers model to call with `adapter` active (None: the bare base model). A mergeable adapter
        is merged for the duration, so every forward runs at the speed of the base model; afterwards the weights are
        copied back from the backup (an unmerge alone leaves rounding differences of the order of one ulp)."""
        peft_model = self.peft_model
        if peft_model is None:
            yield self.model
            return
        inner = peft_model.get_base_model()
        if adapter is None:
            with peft_model.disable_adapter():
                yield inner
            return
        peft_model.set_adapter(adapter)
        if not self.backup:
            yield inner
            return
        try:
            peft_model.merge_adapter([adapter])
            yield inner
        finally:
            try:
                peft_model.unmerge_adapter()
            finally:
                _restore(self.backup)


def _restore(backup: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for param, saved in backup:
            param.data.copy_(saved, non_blocking=False)


# LoRA config fields that do not change what a plain LoRA adapter adds to a linear layer at inference (the others must
# be off for the direct path: DoRA, LoRA biases, patterns, variants, fan_in_fan_out, modules_to_save, ...).
_PLAIN_LORA_FIELDS = {
    "task_type", "peft_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode", "r", "lora_alpha",
    "lora_dropout", "target_modules", "exclude_modules", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "use_rslora", "megatron_config", "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "peft_version", "qalora_group_size", "ensure_weight_tying",
}  # fmt: skip


class DirectLoraPair:
    """Plain LoRA adapters applied to the base weights for a pass: `W += (B @ A) * scaling` (PEFT's merge), restored
    from a copy afterwards. `deltas[adapter]` lists `(weight, A, B, scaling)` per adapted linear layer."""

    def __init__(self, model: PreTrainedModel, deltas: dict[str, list[tuple]]):
        self.model, self.deltas = model, deltas
        weights = {id(w): w for entries in deltas.values() for w, *_ in entries}
        self.backup = [(w, w.detach().to("cpu", copy=True)) for w in weights.values()]

    @contextlib.contextmanager
    def use(self, adapter: str | None) -> Iterator[PreTrainedModel]:
        if adapter is None:
            yield self.model
            return
        try:
            with torch.no_grad():
                for weight, a, b, scaling in self.deltas[adapter]:
                    weight.add_((b @ a) * scaling)
            yield self.model
        finally:
            _restore(self.backup)


def direct_lora_pair(model: PreTrainedModel, adapter_paths: dict[str, str]) -> DirectLoraPair | None:
    """A :class:`DirectLoraPair` when both adapters are plain LoRA on `torch.nn.Linear` layers with float32 / float16
    weights, else None (PEFT is used)."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    deltas = {}
    for name, path in adapter_paths.items():
        config = PeftConfig.from_pretrained(path).to_dict()
        if config.get("peft_type") not in ("LORA", "PeftType.LORA") and str(config.get("peft_type")) != "PeftType.LORA":
            return None
        if any(value not in (None, False, "none", {}, []) for key, value in config.items() if key not in _PLAIN_LORA_FIELDS):
            return None
        r, alpha = config["r"], config["lora_alpha"]
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        state = load_peft_weights(path, device="cpu")
        modules: dict[str, dict] = {}
        for key, tensor in state.items():
            prefix, dot, kind = key.rpartition(".lora_")
            if not dot or kind not in ("A.weight", "B.weight") or not prefix.startswith("base_model.model."):
                return None  # anything but lora_A / lora_B weights (DoRA magnitudes, biases, saved modules, ...)
            modules.setdefault(prefix[len("base_model.model.") :], {})[kind[0]] = tensor
        entries = []
        for module_name, ab in modules.items():
            try:
                layer = model.get_submodule(module_name)
            except AttributeError:
                return None
            weight = getattr(layer, "weight", None)
            if type(layer) is not torch.nn.Linear or weight is None or weight.dtype not in (torch.float32, torch.float16):
                return None
            a, b = ab.get("A"), ab.get("B")
            if a is None or b is None or a.shape != (r, layer.in_features) or b.shape != (layer.out_features, r):
                return None
            entries.append((weight, a.to(weight.device, torch.float32), b.to(weight.device, torch.float32), scaling))
        deltas[name] = entries
    return DirectLoraPair(model, deltas)


@contextlib.contextmanager
def attached_pair(model: PreTrainedModel, adapter_paths: dict[str, str] | None) -> Iterator:
    """Put the adapters of `adapter_paths` (`{"plus": dir, "minus": dir}`, or None) on `model` in eval mode, yielding
    an object whose `use(adapter)` gives the model of a pass; on exit restore the model as it was."""
    snapshot = ModelSnapshot(model)
    peft_model = None
    try:
        model.eval()
        direct = direct_lora_pair(model, adapter_paths) if adapter_paths is not None else None
        if direct is not None or adapter_paths is None:
            yield direct or AttachedPair(model)
            return
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, adapter_paths["plus"], adapter_name="plus", is_trainable=False)
        peft_model.load_adapter(adapter_paths["minus"], adapter_name="minus", is_trainable=False)
        peft_model.eval()
        yield AttachedPair(model, peft_model)
    finally:
        if peft_model is not None:
            peft_model.unload()
        snapshot.restore()
