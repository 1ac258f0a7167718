"""The base model's state around the estimator's work: what adapter training and scoring change, and how it is undone.

* :class:`ModelSnapshot` records and restores what TRL's trainers change on the base model (patched `forward`,
  `requires_grad`, train mode, gradient checkpointing, `use_cache`).
* :func:`attached_pair` loads the two adapters on the base model for scoring and takes them out afterwards; its
  :meth:`AttachedPair.use` makes one adapter (or none) the model a pass runs, merging a LoRA adapter into float32 /
  float16 base weights for the pass and restoring them bit for bit afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import PreTrainedModel


__all__ = ["AttachedPair", "ModelSnapshot", "attached_pair", "is_peft_model", "merge_backup", "strip_adapter_layers"]

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
    """What TRL's trainers change on the base model, restored by :meth:`restore`: the instance `forward` (TRL patches a
    fused LM head onto it), `requires_grad` of every parameter (PEFT freezes the base), the train/eval mode, gradient
    checkpointing and `config.use_cache`."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.forward = model.__dict__.get("forward", _MISSING)
        self.requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self.training = model.training
        self.gradient_checkpointing = getattr(model, "is_gradient_checkpointing", False)
        self.use_cache = getattr(model.config, "use_cache", None)

    def restore(self) -> None:
        model = self.model
        if self.forward is _MISSING:
            model.__dict__.pop("forward", None)
        else:
            model.forward = self.forward
        for name, p in model.named_parameters():
            if name in self.requires_grad:
                p.requires_grad_(self.requires_grad[name])
        model.train(self.training)
        if getattr(model, "is_gradient_checkpointing", False) and not self.gradient_checkpointing:
            model.gradient_checkpointing_disable()
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
                with torch.no_grad():
                    for param, saved in self.backup:
                        param.data.copy_(saved, non_blocking=False)


@contextlib.contextmanager
def attached_pair(model: PreTrainedModel, adapter_paths: dict[str, str] | None) -> Iterator[AttachedPair]:
    """Load the adapters of `adapter_paths` (`{"plus": dir, "minus": dir}`, or None) on `model` in eval mode; on exit
    unload them and restore the model as it was."""
    snapshot = ModelSnapshot(model)
    peft_model = None
    try:
        if adapter_paths is not None:
            from peft import PeftModel

            peft_model = PeftModel.from_pretrained(model, adapter_paths["plus"], adapter_name="plus", is_trainable=False)
            peft_model.load_adapter(adapter_paths["minus"], adapter_name="minus", is_trainable=False)
            peft_model.eval()
        model.eval()
        yield AttachedPair(model, peft_model)
    finally:
        if peft_model is not None:
            peft_model.unload()
        snapshot.restore()
