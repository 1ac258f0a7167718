"""What keeps the token-level trainers' steps free of host-device synchronizations.

On CUDA the host queues kernels and runs ahead of the GPU. Any read of tensor values by the host (`.item()`,
`bool(tensor)`, `nonzero`, a boolean-mask index, `torch.equal`) waits until everything queued before it has run, and
the GPU then idles while the host launches what comes next: in a launch-bound step (small models, short batches) this
costs as much as the work itself. `trl.DPOTrainer` reads about twenty values per step, most of them metrics, before
the backward is queued. The token-level trainers read none:

* metrics stay on the device as :class:`DeviceValue` until TRL logs them, and are then read in one transfer
  (:func:`read_device_values`), giving exactly the numbers an `.item()` per value would have given;
* the scored positions and the padding of a batch come from the host with the batch (`BatchLayout`, built by the
  collator);
* :func:`known_padding` keeps transformers' SDPA mask builder from reading the padding mask to decide whether it may
  skip the causal mask: the host already knows whether the batch is padded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch


class DeviceValue:
    """A logged value still on the device: ``combine(*numbers)`` of the values of ``tensors`` (each a one-element
    tensor, read as a Python float), or the value of the only tensor without ``combine``.

    ``float(value)`` reads it on its own; :func:`read_device_values` reads many in one transfer.
    """

    __slots__ = ("combine", "tensors")

    def __init__(self, *tensors: torch.Tensor, combine: Callable[..., float] | None = None):
        if any(t.numel() != 1 for t in tensors):
            raise ValueError(f"A DeviceValue holds one-element tensors; got shapes {[tuple(t.shape) for t in tensors]}.")
        self.tensors = tuple(t.detach() for t in tensors)
        self.combine = combine

    def resolve(self, numbers: list[float]) -> float:
        return self.combine(*numbers) if self.combine is not None else numbers[0]

    def __float__(self) -> float:
        return read_device_values([self])[0]

    def __repr__(self) -> str:
        return f"DeviceValue({', '.join(map(repr, self.tensors))})"


def ratio_or_zero(numerator: torch.Tensor, denominator: torch.Tensor) -> DeviceValue:
    """``numerator / denominator`` divided on the host in float64, ``0.0`` when the denominator is not positive:
    what ``a.item() / b.item() if b > 0 else 0.0`` gives."""
    return DeviceValue(numerator, denominator, combine=lambda num, den: num / den if den > 0 else 0.0)


def value_if_positive(value: torch.Tensor, count: torch.Tensor) -> DeviceValue:
    """``value``, or ``0.0`` when ``count`` is not positive: what ``value.item() if count > 0 else 0.0`` gives."""
    return DeviceValue(value, count, combine=lambda v, n: v if n > 0 else 0.0)


def read_device_values(values: Iterable) -> list[float]:
    """The Python value of each item of ``values``: numbers as they are, :class:`DeviceValue` read from the device in
    one transfer per device (every tensor is cast to float64 there, which represents float32 values and integer counts
    below 2**53 exactly, so the numbers equal those of one `.item()` per tensor)."""
    values = list(values)
    pending = [v for v in values if isinstance(v, DeviceValue)]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for value in pending:
        for tensor in value.tensors:
            by_device.setdefault(tensor.device, []).append(tensor)
    numbers: dict[int, float] = {}
    for device, tensors in by_device.items():
        # MPS has no float64: its values come over one by one
        if device.type == "mps":
            flat = [x for t in tensors for x in t.reshape(-1).cpu().double().tolist()]
        else:
            flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]).tolist()
        numbers.update(zip((id(t) for t in tensors), flat))
    out = []
    for value in values:
        if isinstance(value, DeviceValue):
            value = value.resolve([numbers[id(t)] for t in value.tensors])
        out.append(value)
    return out


def resolve_metrics(metrics: dict[str, list]) -> None:
    """Replace, in place, every :class:`DeviceValue` in the lists of ``metrics`` by its number, in one transfer."""
    names = [(name, len(values)) for name, values in metrics.items()]
    flat = read_device_values(v for values in metrics.values() for v in values)
    start = 0
    for name, count in names:
        metrics[name][:] = flat[start : start + count]
        start += count


@contextlib.contextmanager
def known_padding(padded: bool):
    """Inside, transformers' SDPA mask builder (`sdpa_mask`) does not read the padding mask back from the device.

    Before it builds a causal mask, transformers checks on the device whether the 2-D attention mask has any padding
    (one read per forward): without padding it relies on SDPA's `is_causal` instead. The caller knows from the host
    whether the batch is padded, and says it here: a padded batch gets its mask built without the check (the check
    would have found padding), a batch without padding gets no mask (what the check would have decided). The results
    are exactly transformers' own. The override of transformers' shared mask interface is removed on exit; it applies
    to models that use SDPA (transformers' default attention) or eager attention (which never checks).
    """
    from transformers import masking_utils

    interface = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS
    had_local = "sdpa" in getattr(interface, "_local_mapping", {})
    previous = interface["sdpa"]

    def sdpa_mask_known_padding(*args, **kwargs):
        if not args:  # transformers passes everything by keyword
            if padded:
                kwargs["allow_is_causal_skip"] = False
            else:
                kwargs["attention_mask"] = None
        return previous(*args, **kwargs)

    interface["sdpa"] = sdpa_mask_known_padding
    try:
        yield
    finally:
        if had_local:
            interface["sdpa"] = previous
        else:
            del interface["sdpa"]
