"""Count, on CPU, the operations that would make the host wait for the device on CUDA.

On CUDA the host queues kernels and runs ahead of the GPU; an operation whose result the host must read (a Python
number from a tensor, a shape that depends on tensor values, a comparison that returns a Python bool) makes it wait
until the queue has drained. Inside a training step, before the backward is queued, every such wait leaves the GPU
idle while the host launches the next operations. They can be counted on CPU because the same aten operations run:

* :data:`SYNC_OPS`: aten operations that synchronize on CUDA (``_local_scalar_dense`` is what ``.item()``,
  ``float(t)`` and ``bool(t)`` call; ``nonzero`` / ``masked_select`` / boolean-mask indexing have an output size that
  depends on the values);
* :data:`HOST_READS`: Python-level reads of tensor values (``Tensor.item``, ``tolist``, ``cpu``, ``numpy``).

:class:`SyncCounter` counts both, per named window, and remembers where each one came from (file:line of the first
frame outside torch), so that a failing test says which line to look at.
"""

from __future__ import annotations

import collections
import contextlib
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback


SYNC_OPS = frozenset(
    {
        "_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "equal", "unique", "_unique", "_unique2",
        "unique_dim", "unique_consecutive", "unique_dim_consecutive", "repeat_interleave", "bincount",
        "masked_scatter", "masked_scatter_",
    }
)  # fmt: skip
HOST_READS = ("item", "tolist", "cpu", "numpy")
# index / index_put with a boolean mask: the number of selected elements is read on the host
_INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _origin() -> str:
    for frame in reversed(traceback.extract_stack()[:-3]):
        name = frame.filename
        if "/torch/" not in name and not name.endswith("host_sync.py"):
            return f"{name.rsplit('/', 2)[-2]}/{name.rsplit('/', 1)[-1]}:{frame.lineno} ({frame.name})"
    return "?"


class SyncCounter(TorchDispatchMode):
    """Counts syncing aten ops and Python-level host reads while a window is open.

    ``with counter.window("step"):`` opens a window; windows nest and each open window counts what happens inside it.
    ``counter.counts[name]`` is the number of syncing ops plus host reads seen in window ``name`` (summed over every
    time it was open), ``counter.sites[name]`` a ``Counter`` of ``"op @ origin"``.
    """

    def __init__(self):
        super().__init__()
        self.open: list[str] = []
        self.counts: collections.Counter = collections.Counter()
        self.sites: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self._in_read = 0

    def _record(self, what: str) -> None:
        if not self.open:
            return
        site = f"{what} @ {_origin()}"
        for name in set(self.open):
            self.counts[name] += 1
            self.sites[name][site] += 1

    @contextlib.contextmanager
    def paused(self):
        """No window counts inside (host-side work such as collating a batch from CPU tensors)."""
        open_windows, self.open = self.open, []
        try:
            yield
        finally:
            self.open = open_windows

    @contextlib.contextmanager
    def window(self, name: str):
        self.open.append(name)
        try:
            yield
        finally:
            self.open.remove(name)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if not self._in_read and (name in SYNC_OPS or (name in _INDEX_OPS and _has_bool_index(args))):
            self._record(f"aten.{name}")
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def patched_host_reads(self):
        """Count `Tensor.item/tolist/cpu/numpy` (an `.item()` is counted once, not again as `_local_scalar_dense`)."""
        originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

        def wrap(name, original):
            def read(tensor, *args, **kwargs):
                self._record(f"Tensor.{name}")
                self._in_read += 1
                try:
                    return original(tensor, *args, **kwargs)
                finally:
                    self._in_read -= 1

            return read

        for name, original in originals.items():
            setattr(torch.Tensor, name, wrap(name, original))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)

    def report(self, name: str) -> str:
        return "\n".join(f"  {n} x {site}" for site, n in self.sites[name].most_common())


class StepWindows(TrainerCallback):
    """Opens window ``"step"`` from ``on_step_begin`` to ``on_step_end`` of the optimizer steps in ``steps`` (1-based;
    that span holds the forward, the loss, the backward and the optimizer step, not the batch fetch nor the logging,
    which runs after ``on_step_end``), and window ``"compute_loss"`` around every ``compute_loss`` of those steps."""

    def __init__(self, counter: SyncCounter, trainer, steps):
        self.counter, self.steps, self._stack = counter, set(steps), None
        original = trainer.compute_loss

        def compute_loss(*args, **kwargs):
            if self._stack is None:
                return original(*args, **kwargs)
            with counter.window("compute_loss"):
                return original(*args, **kwargs)

        trainer.compute_loss = compute_loss

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 in self.steps:
            self._stack = contextlib.ExitStack()
            self._stack.enter_context(self.counter.window("step"))

    def on_step_end(self, args, state, control, **kwargs):
        if self._stack is not None:
            self._stack.close()
            self._stack = None


def count_step_syncs(trainer, steps=(2,)) -> SyncCounter:
    """Train `trainer` (its `max_steps` steps) and count the syncs of the optimizer steps `steps`: returns the counter,
    with windows ``"step"``, ``"compute_loss"`` and ``"train"`` (the whole `train()`, logging included). The collator
    is not counted: it builds the batch from CPU tensors on the host, before anything is on the device."""
    counter = SyncCounter()
    trainer.add_callback(StepWindows(counter, trainer, steps))
    collate = trainer.data_collator.torch_call

    def torch_call(examples):
        with counter.paused():
            return collate(examples)

    trainer.data_collator.torch_call = torch_call
    with counter, counter.patched_host_reads(), counter.window("train"):
        trainer.train()
    return counter
