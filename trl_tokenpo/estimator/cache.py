"""Content-addressed on-disk cache for per-row scoring results.

Scoring every completion token of a preference dataset with two adapters is the expensive step of the contrastive
weight estimator, so its output is cached on disk under a key that is a fingerprint of everything the result depends
on (base model weights, adapter weights, tokenizer, dataset, scoring settings). This module has two halves:

* **Fingerprints** -- :func:`fingerprint` hashes JSON-able data, bytes, tensors and arrays into a stable hex digest;
  :func:`fingerprint_tokenizer`, :func:`fingerprint_module` and :func:`fingerprint_dataset` produce the digests of the
  objects the estimator depends on. Digests compose: ``fingerprint(fingerprint_module(model), config_dict)``.
* **Storage** -- :class:`ShardedScoreCache` stores the results for rows ``[0, num_rows)`` in shards of ``shard_size``
  rows under ``root/key/``. Every file is written atomically (temporary file in the same directory, ``fsync``,
  ``os.replace``) and every shard's SHA-256 is recorded in a per-shard sidecar, so an interrupted run leaves either a
  complete, verifiable shard or nothing that is ever read back. Work resumes from :meth:`ShardedScoreCache.missing_shards`.

Layout of ``root/key/``::

    layout.json               key, num_rows, shard_size (a different layout under the same key is refused)
    request.json              what the key was computed from, human readable (debugging only, never read back)
    shard-00000.npz           the rows of shard 0: per column a flat value array and row offsets
    shard-00000.json          sidecar of shard 0: rows, columns, size and sha256 of the .npz (written after it)
    ...
    manifest.json             written by :meth:`ShardedScoreCache.finalize`: the cache is complete

Multi-process scoring: each rank writes its own shards (:meth:`ShardedScoreCache.write_shard` touches only that
shard's two files, there is no shared mutable index), then after a barrier one rank calls
:meth:`ShardedScoreCache.finalize` and every rank may call :meth:`ShardedScoreCache.load_all`. A shard must have a
single writer at a time, and readers should read after the writers are done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import socket
import struct
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch


logger = logging.getLogger(__name__)

__all__ = [
    "CacheError",
    "CacheLayoutError",
    "CorruptShardError",
    "IncompleteCacheError",
    "MissingShardError",
    "ShardedScoreCache",
    "fingerprint",
    "fingerprint_base_model",
    "fingerprint_dataset",
    "fingerprint_module",
    "fingerprint_tokenizer",
    "reference_fingerprint",
]

FORMAT_VERSION = 1
_HASH_CHUNK = 64 * 1024 * 1024  # bytes fed to hashlib per call when hashing large tensors


# ----------------------------------------------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------------------------------------------


class _CanonicalHasher:
    """SHA-256 over a canonical, type-tagged, length-prefixed encoding of Python values.

    The encoding is unambiguous (``["ab"]`` and ``["a", "b"]`` differ, ``1`` and ``1.0`` and ``True`` differ) and
    independent of dict insertion order, Python's hash seed and the process.
    """

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def hexdigest(self) -> str:
        return self._sha.hexdigest()

    def _raw(self, tag: bytes, payload: bytes | memoryview = b"") -> None:
        self._sha.update(tag)
        self._sha.update(struct.pack("<Q", len(payload)))
        if len(payload):
            self._sha.update(payload)

    def _count(self, tag: bytes, n: int) -> None:
        self._sha.update(tag)
        self._sha.update(struct.pack("<Q", n))

    def update(self, obj: Any) -> None:
        if obj is None:
            self._raw(b"N")
        elif isinstance(obj, bool):
            self._raw(b"B", b"1" if obj else b"0")
        elif isinstance(obj, int):
            self._raw(b"I", str(int(obj)).encode())
        elif isinstance(obj, float):
            self._raw(b"F", float(obj).hex().encode())
        elif isinstance(obj, str):  # includes str-valued enums: hashed by value
            self._raw(b"S", str(obj).encode("utf-8", "surrogatepass"))
        elif isinstance(obj, os.PathLike):
            self._raw(b"S", os.fspath(obj).encode("utf-8", "surrogatepass"))
        elif isinstance(obj, (bytes, bytearray, memoryview)):
            self._raw(b"Y", memoryview(obj).cast("B"))
        elif isinstance(obj, torch.Tensor):
            self.update_tensor(obj)
        elif isinstance(obj, np.ndarray):
            self.update_array(obj)
        elif isinstance(obj, np.generic):
            self.update(obj.item())
        elif isinstance(obj, Mapping):
            self._count(b"D", len(obj))
            keys = list(obj.keys())
            if not all(isinstance(k, str) for k in keys):
                raise TypeError(f"cannot fingerprint a mapping with non-string keys: {keys!r}")
            for k in sorted(keys):
                self.update(k)
                self.update(obj[k])
        elif isinstance(obj, (list, tuple)):  # a tuple hashes like the list it would become in JSON
            self._count(b"L", len(obj))
            for item in obj:
                self.update(item)
        elif isinstance(obj, (set, frozenset)):  # order-free: sort the members' own digests
            digests = sorted(fingerprint(item) for item in obj)
            self._count(b"E", len(digests))
            for d in digests:
                self._raw(b"S", d.encode())
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            self._raw(b"C", f"{type(obj).__module__}.{type(obj).__qualname__}".encode())
            self.update({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
        elif _is_hf_dataset(obj):
            self._raw(b"H", fingerprint_dataset(obj).encode())
        else:
            raise TypeError(
                f"cannot fingerprint an object of type {type(obj).__module__}.{type(obj).__qualname__}; convert it to "
                "JSON-able data (dict/list/str/int/float/bool/None), bytes, a tensor or an array first, or pass one "
                "of the fingerprint_* digests of it"
            )

    def update_tensor(self, tensor: torch.Tensor) -> None:
        """Hash dtype, shape and the raw bytes of ``tensor`` (copied to CPU if needed, one tensor at a time)."""
        t = tensor.detach()
        if t.is_meta:
            raise ValueError("cannot fingerprint a tensor on the meta device (weights not materialized)")
        if t.layout != torch.strided:
            raise TypeError(f"cannot fingerprint a tensor with layout {t.layout}; convert it to a dense tensor first")
        if t.is_quantized:
            t = t.int_repr()
        self._raw(b"T", str(t.dtype).encode())
        self.update(list(t.shape))
        flat = t.to("cpu").contiguous().reshape(-1)
        if flat.dtype == torch.bool:
            flat = flat.to(torch.uint8)
        raw = flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, dtype=np.uint8)
        self._stream(memoryview(raw))

    def update_array(self, array: np.ndarray) -> None:
        if array.dtype.hasobject:
            raise TypeError("cannot fingerprint a numpy array of Python objects; convert it to a list first")
        array = np.ascontiguousarray(array)
        self._raw(b"A", array.dtype.str.encode())
        self.update(list(array.shape))
        self._stream(memoryview(array.reshape(-1).view(np.uint8)))

    def _stream(self, raw: memoryview) -> None:
        self._count(b"R", len(raw))
        for start in range(0, len(raw), _HASH_CHUNK):
            self._sha.update(raw[start : start + _HASH_CHUNK])


def fingerprint(*parts: Any) -> str:
    """Stable SHA-256 hex digest (64 characters) of ``parts``.

    Supported parts, nested freely: ``None``, ``bool``, ``int``, ``float`` (hashed exactly, via ``float.hex``),
    ``str`` (and ``os.PathLike``, hashed as its string), ``bytes``, dicts with string keys (key order does not
    matter), lists and tuples (hashed alike, as JSON would), sets, dataclass instances (class name and fields),
    ``torch.Tensor`` and ``numpy.ndarray`` (dtype, shape and raw bytes; device and strides do not matter) and
    ``datasets.Dataset`` / ``DatasetDict`` (via :func:`fingerprint_dataset`). Anything else raises ``TypeError``
    rather than falling back to ``repr``, which may contain memory addresses.

    The digest is stable across processes, machines and Python hash seeds. Types are part of the encoding: ``1``,
    ``1.0``, ``True`` and ``"1"`` all give different digests.
    """
    hasher = _CanonicalHasher()
    hasher.update(list(parts))
    return hasher.hexdigest()


_TOKENIZER_BACKEND_IGNORED = ("padding", "truncation")


def fingerprint_tokenizer(tokenizer: Any) -> str:
    """Digest of everything that decides which ids a tokenizer produces for a text or a conversation.

    Hashed: the class name, the vocabulary, the full backend definition of a fast tokenizer (model incl. merges,
    normalizer, pre-tokenizer, post-processor, added tokens with their flags), the special tokens and their ids, the
    chat template(s), and the BOS/EOS flags. Not hashed, because they do not change the ids of a single example:
    padding and truncation settings and sides, ``model_max_length``, the name or path it was loaded from.

    A processor (multimodal) is fingerprinted through its ``.tokenizer``. Cost: a few milliseconds, dominated by
    serializing the vocabulary.
    """
    tok = getattr(tokenizer, "tokenizer", None) if not hasattr(tokenizer, "get_vocab") else tokenizer
    if tok is None or not hasattr(tok, "get_vocab"):
        raise TypeError(f"expected a transformers tokenizer or processor, got {type(tokenizer).__name__}")

    parts: dict[str, Any] = {"class": type(tok).__name__}
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        definition = json.loads(backend.to_str())
        for name in _TOKENIZER_BACKEND_IGNORED:
            definition.pop(name, None)
        parts["backend"] = definition
    else:  # slow tokenizer: the vocabulary is the best available description
        parts["vocab"] = sorted(tok.get_vocab().items())
    parts["special_tokens"] = {
        name: str(value) for name, value in sorted(getattr(tok, "special_tokens_map", {}).items())
    }
    parts["special_token_ids"] = {
        name: getattr(tok, f"{name}_id", None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    added = getattr(tok, "added_tokens_decoder", {}) or {}
    parts["added_tokens"] = [
        [int(index), str(token), bool(getattr(token, "special", False))] for index, token in sorted(added.items())
    ]
    chat_template = getattr(tok, "chat_template", None)
    parts["chat_template"] = dict(chat_template) if isinstance(chat_template, Mapping) else chat_template
    for flag in ("add_bos_token", "add_eos_token"):
        value = getattr(tok, flag, None)
        parts[flag] = value if isinstance(value, (bool, type(None))) else str(value)
    return fingerprint("tokenizer", parts)


# PEFT config fields that do not change what an adapter computes (where it was loaded from, train/eval flag).
_PEFT_CONFIG_IGNORED = ("base_model_name_or_path", "revision", "inference_mode")


def fingerprint_module(
    module: torch.nn.Module,
    trainable_only: bool = False,
    *,
    adapter_name: str | None = None,
    include_buffers: bool = True,
) -> str:
    """Digest of a module's weights: the name, shape, dtype and bytes of every parameter.

    Args:
        module: any ``torch.nn.Module`` (a transformers model, a PEFT model, ...).
        trainable_only: hash only parameters with ``requires_grad=True`` (for a PEFT model in training mode, the
            adapter weights). Raises ``ValueError`` when there are none, rather than returning the digest of nothing
            that every frozen model would share.
        adapter_name: for a PEFT model, hash only that adapter: its weights (``peft.get_peft_model_state_dict``,
            names without the adapter name, so a renamed copy hashes the same) and its config (minus
            ``base_model_name_or_path``, ``revision``, ``inference_mode``), whatever ``requires_grad`` says.
        include_buffers: also hash persistent buffers (those in ``state_dict``, e.g. normalization statistics).
            Non-persistent buffers such as rotary ``inv_freq`` are derived from the config and never hashed.

    Tied parameters are hashed once. Parameter names are part of the digest, so a model and its PEFT-wrapped version
    (names prefixed with ``base_model.model.``) differ; the model config is not hashed (add the relevant settings
    to the key yourself). Under ZeRO-3 / FSDP, parameters are sharded and each rank would see its shard: gather them
    or fingerprint before wrapping.

    Cost: one streamed SHA-256 pass over the weights, one tensor at a time (GPU tensors are copied to CPU one at a
    time, so the extra memory is the largest single tensor). SHA-256 runs at roughly 0.5-2 GB/s per core, so a 0.5B
    model in bfloat16 (1 GB) takes about 1-2 s, a 7B model (14 GB) 10-30 s; an adapter alone takes milliseconds.
    """
    hasher = _CanonicalHasher()
    if adapter_name is not None:
        try:
            from peft import get_peft_model_state_dict
        except ImportError as exc:  # pragma: no cover - peft is a dependency
            raise ImportError("fingerprint_module(adapter_name=...) requires peft") from exc
        peft_config = getattr(module, "peft_config", None)
        if not isinstance(peft_config, Mapping) or adapter_name not in peft_config:
            available = sorted(peft_config) if isinstance(peft_config, Mapping) else []
            raise ValueError(f"module has no PEFT adapter named {adapter_name!r} (adapters: {available})")
        config = peft_config[adapter_name].to_dict()
        for name in _PEFT_CONFIG_IGNORED:
            config.pop(name, None)
        hasher.update("peft_adapter")
        hasher.update(_jsonable(config))
        state = get_peft_model_state_dict(module, adapter_name=adapter_name)
        named: Iterator[tuple[str, torch.Tensor]] = iter(sorted(state.items()))
    else:
        hasher.update("module_trainable" if trainable_only else "module")
        named = _named_weights(module, trainable_only=trainable_only, include_buffers=include_buffers)

    count = 0
    for name, tensor in named:
        hasher.update(name)
        hasher.update_tensor(tensor)
        count += 1
    if count == 0:
        what = "trainable parameters" if trainable_only else "parameters"
        raise ValueError(f"module {type(module).__name__} has no {what} to fingerprint")
    return hasher.hexdigest()


# Config keys that do not change what a model computes from given weights: versions, dtype (the weights carry it),
# the architecture list and every private key (`_name_or_path`, `_attn_implementation`, ...).
# Config keys that do not change what the model computes for a given input: versions, dtype (the weights' dtypes are
# hashed), and runtime switches that trainers flip (TRL sets `use_cache=False`)
_CONFIG_IGNORED = (
    "transformers_version", "dtype", "torch_dtype", "architectures", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict",
)  # fmt: skip
_PEFT_PREFIX = "base_model.model."


def _unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a ``PeftModel`` / PEFT tuner (adapter layers still injected), else ``model``."""
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError:  # pragma: no cover - peft is a dependency
        return model
    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, BaseTuner):
        model = model.model
    return model


def _base_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Sorted (normalized name, tensor) of every parameter and persistent buffer of the base model, leaving out what
    PEFT adds: adapter weights (``lora_A``, ``lora_B``, ``lora_embedding_*``, ``lora_magnitude_vector``, and the
    layers of other tuners), the ``modules_to_save`` copies; ``.base_layer`` / ``.original_module`` segments are
    removed and a ``base_model.model.`` prefix stripped, so the names are those of the plain model."""
    excluded: list[str] = []
    wrappers: set[str] = set()
    for prefix, module in model.named_modules():
        adapter_names = getattr(module, "adapter_layer_names", None)
        if adapter_names is None or not prefix:
            continue
        wrappers.add(prefix)
        excluded.extend(f"{prefix}.{name}." for name in adapter_names)
    weights = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if any(name.startswith(e) for e in excluded) or tensor is None:
            continue
        parts = name.split(".")
        kept = [
            part
            for i, part in enumerate(parts)
            if not (part in ("base_layer", "original_module") and ".".join(parts[:i]) in wrappers)
        ]
        name = ".".join(kept)
        if name.startswith(_PEFT_PREFIX):
            name = name[len(_PEFT_PREFIX) :]
        weights.append((name, tensor))
    weights.sort(key=lambda item: item[0])
    return weights


def fingerprint_base_model(model: torch.nn.Module) -> str:
    """Digest of a model's base weights, the same for a plain model and for it wrapped with PEFT adapters.

    Hashed: the class of the (unwrapped) model, its config (``to_dict()`` without private keys such as
    ``_name_or_path``, ``transformers_version``, ``dtype`` / ``torch_dtype`` and ``architectures``), and the name,
    dtype, shape and bytes of every parameter and persistent buffer (``state_dict``; tied weights appear under each
    of their names). Adapter parameters and ``modules_to_save`` copies are left out and the names are normalized
    (``base_model.model.`` prefix, ``.base_layer`` and ``.original_module`` segments removed), so that
    ``peft.get_peft_model(model, LoraConfig(...))`` with fresh adapters, or a ``PeftModel`` loaded on ``model``, gives
    the digest of ``model`` itself. Merged adapters are part of the weights: the digest then changes, as it should.

    Cost: one streamed SHA-256 pass over the weights, as :func:`fingerprint_module`.
    """
    model = _unwrap_peft(model)
    hasher = _CanonicalHasher()
    hasher.update("base_model/2")
    hasher.update(type(model).__name__)
    config = getattr(model, "config", None)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else {}
    hasher.update(
        _jsonable({k: v for k, v in config_dict.items() if not k.startswith("_") and k not in _CONFIG_IGNORED})
    )
    weights = _base_weights(model)
    if not weights:
        raise ValueError(f"model {type(model).__name__} has no weights to fingerprint")
    for name, tensor in weights:
        hasher.update(name)
        hasher.update_tensor(tensor)
    return hasher.hexdigest()


def reference_fingerprint(model: torch.nn.Module, processing_class: Any) -> str:
    """Digest identifying precomputed reference log-probs: what produced them (the base weights of ``model``, see
    :func:`fingerprint_base_model`) and how the text was tokenized (:func:`fingerprint_tokenizer`). A trainer
    recomputes it from its own reference model and tokenizer and refuses stored ``*_ref_logps`` on a mismatch."""
    return fingerprint("reference-logps-v1", fingerprint_base_model(model), fingerprint_tokenizer(processing_class))


def _named_weights(
    module: torch.nn.Module, *, trainable_only: bool, include_buffers: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, param in module.named_parameters():
        if not trainable_only or param.requires_grad:
            yield name, param
    if include_buffers and not trainable_only:
        for prefix, submodule in module.named_modules():
            non_persistent = getattr(submodule, "_non_persistent_buffers_set", set())
            for name, buffer in submodule.named_buffers(recurse=False):
                if buffer is not None and name not in non_persistent:
                    yield (f"{prefix}.{name}" if prefix else name), buffer


def _jsonable(obj: Any) -> Any:
    """Turn a config dict into fingerprintable data: unknown leaves become their string form."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(_jsonable(v) for v in obj) if all(isinstance(v, str) for v in obj) else [str(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _is_hf_dataset(obj: Any) -> bool:
    try:
        from datasets import Dataset, DatasetDict
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(obj, (Dataset, DatasetDict))


def fingerprint_dataset(dataset: Any) -> str:
    """Digest of a dataset's content.

    * ``datasets.Dataset``: uses ``dataset._fingerprint``, which ``datasets`` maintains for its own cache: a hash of
      the data for in-memory tables and of the source files for memory-mapped ones, updated by every transform
      (``map``, ``filter``, ``select``, ...) from a hash of the transform and its arguments. Free to compute. Caveat:
      when ``datasets`` cannot hash a transform (for example a ``map`` function closing over a model or a lock), it
      logs "couldn't be hashed properly, a random hash was used instead" and the fingerprint, and hence this digest,
      changes on every run: the cache then never hits. Make such transforms hashable, or pass ``new_fingerprint=``
      to ``map``.
    * ``datasets.DatasetDict``: the digests of its splits by name.
    * a list of dicts or a dict of lists: hashed by content with :func:`fingerprint`.
    * ``IterableDataset`` has no stable fingerprint and is refused.
    """
    try:
        from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
    except ImportError:  # pragma: no cover - datasets is a dependency
        Dataset = DatasetDict = IterableDataset = IterableDatasetDict = ()  # type: ignore[assignment]
    if isinstance(dataset, Dataset):
        return fingerprint("datasets.Dataset", dataset._fingerprint, dataset.num_rows)
    if isinstance(dataset, DatasetDict):
        return fingerprint("datasets.DatasetDict", {split: fingerprint_dataset(d) for split, d in dataset.items()})
    if isinstance(dataset, (IterableDataset, IterableDatasetDict)):
        raise TypeError(
            "an IterableDataset has no stable fingerprint; materialize it (e.g. Dataset.from_generator) or build the "
            "key from your own description of the data"
        )
    if isinstance(dataset, (list, tuple, Mapping)):
        return fingerprint("rows", dataset)
    raise TypeError(f"cannot fingerprint a dataset of type {type(dataset).__name__}")


# ----------------------------------------------------------------------------------------------------------------------
# Atomic files
# ----------------------------------------------------------------------------------------------------------------------

_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.(?P<rand>[0-9a-f]+)\.tmp$")


def _temp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_bytes(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` so that readers see the old file, nothing, or the whole new file."""
    tmp = _temp_path(target)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(target.parent)


def _atomic_write_json(target: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default, ensure_ascii=False, allow_nan=False)
    _atomic_write_bytes(target, (text + "\n").encode("utf-8"))


def _json_default(obj: Any) -> Any:
    """JSON fallback for human-readable metadata: arrays/tensors summarized, other objects as their string form."""
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return f"<{type(obj).__name__} shape={tuple(obj.shape)} dtype={obj.dtype}>"
    if isinstance(obj, (set, frozenset)):
        return sorted(str(v) for v in obj)
    if isinstance(obj, (bytes, bytearray)):
        return f"<{len(obj)} bytes sha256={hashlib.sha256(obj).hexdigest()}>"
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


def _read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None if it is absent or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # exists but not ours, or cannot tell: assume alive
    return True


# ----------------------------------------------------------------------------------------------------------------------
# Sharded cache
# ----------------------------------------------------------------------------------------------------------------------


class CacheError(Exception):
    """Base class of the errors raised by :class:`ShardedScoreCache`."""


class CacheLayoutError(CacheError, ValueError):
    """The directory of this key was created with a different ``num_rows`` / ``shard_size``."""


class MissingShardError(CacheError, LookupError):
    """The shard is not stored (never written, or removed after being found corrupt)."""


class CorruptShardError(CacheError):
    """The shard failed verification (checksum mismatch, truncated, unreadable, inconsistent) and was deleted.

    The shard is reported by :meth:`ShardedScoreCache.missing_shards` again and must be recomputed.
    """


class IncompleteCacheError(CacheError):
    """:meth:`ShardedScoreCache.load_all` or :meth:`~ShardedScoreCache.finalize` found shards missing or corrupt.

    Attributes:
        missing: indices of every shard that is not available now (including the corrupt ones, which were deleted).
        corrupt: indices of the shards that were found corrupt during this call.
    """

    def __init__(self, message: str, missing: Sequence[int], corrupt: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.missing = list(missing)
        self.corrupt = list(corrupt)


_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DTYPES = {"float32": np.float32, "float64": np.float64}


class ShardedScoreCache:
    """On-disk store of variable-length float lists per row, in shards, resumable and verifiable.

    Rows ``[0, num_rows)`` are split into ``ceil(num_rows / shard_size)`` shards; shard ``i`` holds rows
    ``shard_rows(i)``. A shard holds named columns (e.g. ``"chosen_token_rewards"``, ``"rejected_token_rewards"``),
    each a list with one variable-length list of floats per row.

    Storage: each shard is an uncompressed ``.npz`` (no pickle) with, per column, the concatenated values and the row
    offsets, plus a JSON sidecar holding its rows, columns, size and SHA-256. The ``.npz`` is written first and the
    sidecar second, both atomically, so a shard exists exactly when its sidecar does; a kill at any point leaves at
    worst a temporary file (ignored, cleaned when its writer is gone) or a data file without sidecar (ignored,
    overwritten by the next write of that shard).

    Verification: :meth:`read_shard` and :meth:`load_all` hash every file they read; :meth:`missing_shards` does too
    unless ``verify=False`` (then it only checks sidecars and file sizes). Whatever method detects a corrupt shard
    deletes it (data and sidecar) and logs a warning, so the shard is missing again and gets recomputed; a corrupt
    shard's contents are never returned.

    Args:
        root: cache root directory (created if needed).
        key: the cache key, typically a :func:`fingerprint`; a directory name of letters, digits, ``.``, ``_``, ``-``.
        num_rows: number of rows of the scored dataset.
        shard_size: rows per shard (the last shard may be shorter).
        columns: if given, every shard must have exactly these columns.
        dtype: ``"float32"`` (default; the scorer's numbers are float32, so this is lossless for them) or
            ``"float64"``. Values read back are Python floats.
        request: what the key was computed from (fingerprint parts, model names, settings), written to
            ``request.json`` for humans; never read back.
        stale_temp_after: a temporary file whose writer cannot be checked (another host) is deleted when older than
            this many seconds. Temporary files of dead processes on this host are deleted at once.

    Raises:
        CacheLayoutError: the key's directory exists with a different ``num_rows`` or ``shard_size``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        key: str,
        num_rows: int,
        shard_size: int,
        *,
        columns: Sequence[str] | None = None,
        dtype: str = "float32",
        request: Mapping[str, Any] | None = None,
        stale_temp_after: float = 3600.0,
    ) -> None:
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise ValueError(
                f"invalid cache key {key!r}: use 1-128 letters, digits, '.', '_' or '-' starting with a letter or "
                "digit (e.g. a fingerprint() digest)"
            )
        if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0:
            raise ValueError(f"num_rows must be a non-negative int, got {num_rows!r}")
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if columns is not None:
            columns = list(columns)
            if not columns or len(set(columns)) != len(columns) or not all(isinstance(c, str) for c in columns):
                raise ValueError(f"columns must be distinct strings, got {columns!r}")

        self.root = Path(root)
        self.key = key
        self.num_rows = num_rows
        self.shard_size = shard_size
        self.columns = columns
        self.dtype = dtype
        self.stale_temp_after = float(stale_temp_after)
        self._request = dict(request) if request is not None else None
        self._setup()

    # -- layout --------------------------------------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        """``root / key``: everything of this cache lives here."""
        return self.root / self.key

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_size)

    @property
    def manifest_path(self) -> Path:
        return self.directory / "manifest.json"

    def shard_rows(self, i: int) -> range:
        """The dataset rows stored in shard ``i``."""
        i = self._check_index(i)
        start = i * self.shard_size
        return range(start, min(start + self.shard_size, self.num_rows))

    def shard_path(self, i: int) -> Path:
        """Path of shard ``i``'s data file."""
        return self.directory / f"shard-{self._check_index(i):05d}.npz"

    def sidecar_path(self, i: int) -> Path:
        """Path of shard ``i``'s sidecar (rows, columns, size, sha256)."""
        return self.directory / f"shard-{self._check_index(i):05d}.json"

    def _check_index(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.num_shards:
            raise IndexError(f"shard index {i!r} out of range: this cache has {self.num_shards} shards")
        return int(i)

    def _layout(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "key": self.key,
            "num_rows": self.num_rows,
            "shard_size": self.shard_size,
        }

    def _setup(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        layout_path = self.directory / "layout.json"
        existing = _read_json(layout_path)
        if existing is not None and existing != self._layout():
            raise CacheLayoutError(
                f"cache {self.directory} was created with num_rows={existing.get('num_rows')}, "
                f"shard_size={existing.get('shard_size')} (format {existing.get('format_version')}), but this cache "
                f"has num_rows={self.num_rows}, shard_size={self.shard_size}: use the same shard_size, or delete "
                "the directory to start over"
            )
        if existing is None:
            _atomic_write_json(layout_path, self._layout())
        if self._request is not None:
            _atomic_write_json(self.directory / "request.json", self._request)
        self.cleanup_temp_files()

    def cleanup_temp_files(self) -> list[Path]:
        """Delete temporary files left by interrupted writes; returns the deleted paths.

        A temporary file is deleted when its writer is known dead (same host, process gone) or, when that cannot be
        checked, when it is older than ``stale_temp_after`` seconds. Files of live writers are left alone, so it is
        safe to call while other ranks write. Called by the constructor.
        """
        removed = []
        now = time.time()
        for path in self.directory.glob(".*.tmp"):
            match = _TEMP_RE.match(path.name)
            try:
                if match and match["host"] == _HOST:
                    pid = int(match["pid"])
                    stale = pid != os.getpid() and not _pid_alive(pid)
                else:
                    stale = now - path.stat().st_mtime > self.stale_temp_after
                if stale:
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:  # finished or cleaned concurrently
                continue
        if removed:
            logger.info("removed %d leftover temporary file(s) from %s", len(removed), self.directory)
        return removed

    # -- shards ----------------------------------------------------------------------------------------------------------

    def missing_shards(self, verify: bool = True) -> list[int]:
        """Indices of the shards that are not stored (yet), in increasing order.

        With ``verify=True`` every stored shard's checksum is checked (one read of the cache); with ``verify=False``
        only its sidecar and file size. Shards found corrupt are deleted and listed as missing.
        """
        missing = []
        for i in range(self.num_shards):
            if self._stored_sidecar(i, verify=verify) is None:
                missing.append(i)
        return missing

    def is_stored(self, i: int, verify: bool = True) -> bool:
        """Whether shard ``i`` is stored (and, with ``verify``, passes its checksum)."""
        return self._stored_sidecar(i, verify=verify) is not None

    def _stored_sidecar(self, i: int, verify: bool) -> dict | None:
        """Shard ``i``'s sidecar if the shard is stored and valid; deletes it when found corrupt."""
        i = self._check_index(i)
        if not self.sidecar_path(i).exists():
            return None
        try:
            sidecar = self._load_sidecar(i)
            if verify:
                self._read_verified_bytes(i, sidecar)
            else:
                size = self.shard_path(i).stat().st_size
                if size != sidecar["size"]:
                    raise CorruptShardError(f"shard {i}: file has {size} bytes, sidecar says {sidecar['size']}")
        except MissingShardError:
            return None
        except (CorruptShardError, FileNotFoundError) as exc:
            self._discard(i, exc)
            return None
        return sidecar

    def _load_sidecar(self, i: int) -> dict:
        sidecar = _read_json(self.sidecar_path(i))
        rows = self.shard_rows(i)
        if sidecar is None:
            if not self.sidecar_path(i).exists():  # removed meanwhile (its writer is rewriting the shard)
                raise MissingShardError(f"shard {i} of cache {self.directory} is not stored")
            raise CorruptShardError(f"shard {i}: sidecar is unreadable")
        expected = {
            "key": self.key,
            "shard": i,
            "start": rows.start,
            "stop": rows.stop,
            "file": self.shard_path(i).name,
        }
        for field, value in expected.items():
            if sidecar.get(field) != value:
                raise CorruptShardError(f"shard {i}: sidecar has {field}={sidecar.get(field)!r}, expected {value!r}")
        if not isinstance(sidecar.get("sha256"), str) or not isinstance(sidecar.get("size"), int):
            raise CorruptShardError(f"shard {i}: sidecar lacks sha256/size")
        if not isinstance(sidecar.get("columns"), list):
            raise CorruptShardError(f"shard {i}: sidecar lacks columns")
        return sidecar

    def _read_verified_bytes(self, i: int, sidecar: dict) -> bytes:
        try:
            data = self.shard_path(i).read_bytes()
        except FileNotFoundError as exc:
            raise CorruptShardError(f"shard {i}: data file {self.shard_path(i).name} is missing") from exc
        if len(data) != sidecar["size"]:
            raise CorruptShardError(
                f"shard {i}: file has {len(data)} bytes, sidecar says {sidecar['size']} (truncated?)"
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest != sidecar["sha256"]:
            raise CorruptShardError(f"shard {i}: sha256 {digest} does not match the recorded {sidecar['sha256']}")
        return data

    def _discard(self, i: int, reason: BaseException) -> None:
        logger.warning("discarding shard %d of cache %s: %s", i, self.directory, reason)
        # Sidecar first: without it the shard reads as missing even if removing the data file fails.
        _remove(self.sidecar_path(i))
        _remove(self.shard_path(i))
        _remove(self.manifest_path)

    def write_shard(self, i: int, columns: Mapping[str, Sequence[Sequence[float]]]) -> None:
        """Store shard ``i``: ``columns`` maps each column name to one float sequence per row of ``shard_rows(i)``.

        Rows may be lists, tuples, 1-D numpy arrays or 1-D tensors, of any length (including 0). Overwrites a stored
        shard ``i`` and invalidates the manifest (the cache is no longer finalized).

        Raises:
            IndexError: ``i`` is out of range.
            ValueError: a column does not have one entry per row of the shard, a row is not 1-D, or the column
                names differ from the ``columns`` given to the constructor.
        """
        i = self._check_index(i)
        rows = self.shard_rows(i)
        if not isinstance(columns, Mapping) or not columns:
            raise ValueError("write_shard needs a non-empty mapping of column name -> list of rows")
        names = list(columns)
        if not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"column names must be non-empty strings, got {names!r}")
        if self.columns is not None and sorted(names) != sorted(self.columns):
            raise ValueError(f"shard {i}: got columns {sorted(names)}, this cache stores {sorted(self.columns)}")

        np_dtype = _DTYPES[self.dtype]
        arrays: dict[str, np.ndarray] = {}
        for c, name in enumerate(names):
            values = columns[name]
            if len(values) != len(rows):
                raise ValueError(
                    f"shard {i} covers rows {rows.start}..{rows.stop - 1} ({len(rows)} rows), but column {name!r} "
                    f"has {len(values)} rows"
                )
            flat, offsets = [], np.zeros(len(rows) + 1, dtype=np.int64)
            for r, row in enumerate(values):
                if isinstance(row, torch.Tensor):
                    row = row.detach().to("cpu", torch.float64).numpy()
                arr = np.asarray(row, dtype=np.float64)
                if arr.ndim != 1:
                    raise ValueError(
                        f"shard {i}, column {name!r}, row {rows.start + r}: expected a 1-D sequence of floats, got "
                        f"shape {arr.shape}"
                    )
                flat.append(arr.astype(np_dtype))
                offsets[r + 1] = offsets[r] + arr.shape[0]
            arrays[f"values_{c}"] = np.concatenate(flat) if flat else np.zeros(0, dtype=np_dtype)
            arrays[f"offsets_{c}"] = offsets
        header = {
            "format_version": FORMAT_VERSION,
            "key": self.key,
            "shard": i,
            "start": rows.start,
            "stop": rows.stop,
            "columns": names,
            "dtype": self.dtype,
        }
        arrays["header"] = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        data = buffer.getvalue()

        # Sidecar out first: while the data file is replaced the shard reads as missing, never as a mismatch.
        _remove(self.manifest_path)
        _remove(self.sidecar_path(i))
        _atomic_write_bytes(self.shard_path(i), data)
        sidecar = {
            **header,
            "file": self.shard_path(i).name,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "num_values": {name: int(arrays[f"offsets_{c}"][-1]) for c, name in enumerate(names)},
            "written_at": _now(),
            "writer": {"host": socket.gethostname(), "pid": os.getpid()},
        }
        _atomic_write_json(self.sidecar_path(i), sidecar)

    def read_shard(self, i: int) -> dict[str, list[list[float]]]:
        """The columns of shard ``i`` (one list of floats per row), after verifying its checksum.

        Raises:
            MissingShardError: shard ``i`` is not stored.
            CorruptShardError: shard ``i`` failed verification (checksum mismatch, truncated, unreadable or
                inconsistent); it has been deleted and is missing from now on.
        """
        i = self._check_index(i)
        if not self.sidecar_path(i).exists():
            raise MissingShardError(f"shard {i} of cache {self.directory} is not stored")
        try:
            sidecar = self._load_sidecar(i)
            data = self._read_verified_bytes(i, sidecar)
            return self._decode(i, data, sidecar)
        except CorruptShardError as exc:
            self._discard(i, exc)
            raise

    def _decode(self, i: int, data: bytes, sidecar: dict) -> dict[str, list[list[float]]]:
        rows = self.shard_rows(i)
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                header = json.loads(npz["header"].tobytes().decode())
                names = header["columns"]
                position = (header["shard"], header["start"], header["stop"])
                if names != sidecar["columns"] or position != (i, rows.start, rows.stop):
                    raise CorruptShardError(f"shard {i}: header does not match its sidecar/layout")
                out: dict[str, list[list[float]]] = {}
                for c, name in enumerate(names):
                    values, offsets = npz[f"values_{c}"], npz[f"offsets_{c}"]
                    if (
                        offsets.ndim != 1
                        or len(offsets) != len(rows) + 1
                        or offsets[0] != 0
                        or offsets[-1] != len(values)
                        or np.any(np.diff(offsets) < 0)
                    ):
                        raise CorruptShardError(f"shard {i}: inconsistent offsets for column {name!r}")
                    flat = values.tolist()
                    out[name] = [flat[offsets[r] : offsets[r + 1]] for r in range(len(rows))]
                return out
        except CorruptShardError:
            raise
        except Exception as exc:  # a file that passed its checksum but cannot be parsed: written by a broken writer
            raise CorruptShardError(f"shard {i}: cannot be decoded ({type(exc).__name__}: {exc})") from exc

    # -- whole cache ---------------------------------------------------------------------------------------------------

    def load_all(self) -> dict[str, list[list[float]]]:
        """All columns, concatenated in row order (``len == num_rows``), every shard verified.

        Raises:
            IncompleteCacheError: some shards are missing or were found corrupt (and deleted); its ``missing``
                attribute lists them all, so the caller can recompute exactly those and call again.
            CacheError: shards disagree on their column names.
        """
        out: dict[str, list[list[float]]] = {}
        missing, corrupt = [], []
        names: list[str] | None = None
        for i in range(self.num_shards):
            try:
                shard = self.read_shard(i)
            except MissingShardError:
                missing.append(i)
                continue
            except CorruptShardError:
                missing.append(i)
                corrupt.append(i)
                continue
            if names is None:
                names = list(shard)
                out = {name: [] for name in names}
            elif sorted(shard) != sorted(names):
                raise CacheError(f"shard {i} has columns {sorted(shard)}, earlier shards have {sorted(names)}")
            for name in names:
                out[name].extend(shard[name])
        if missing:
            raise IncompleteCacheError(
                f"cache {self.directory} is incomplete: shards {missing} of {self.num_shards} are missing"
                + (f" (shards {corrupt} were corrupt and have been deleted)" if corrupt else ""),
                missing=missing,
                corrupt=corrupt,
            )
        if names is None:  # no shards at all (num_rows == 0): columns from the manifest or the constructor
            manifest = _read_json(self.manifest_path) or {}
            out = {name: [] for name in manifest.get("columns", self.columns or [])}
        return out

    def finalize(self, meta: Mapping[str, Any] | None = None, verify: bool = True) -> dict[str, Any]:
        """Mark the cache complete: write ``manifest.json`` (atomically) and return its content.

        The manifest records the key, num_rows, shard_size, column names, every shard's rows/size/sha256, the
        creation time (UTC, ISO 8601) and ``meta`` (anything JSON-able, e.g. the estimator's settings and timings).
        Call it from one process, after all shards are written. With ``verify=True`` every shard's checksum is
        checked first (one read of the cache).

        Raises:
            IncompleteCacheError: shards are missing or corrupt (corrupt ones are deleted).
            CacheError: shards disagree on their column names.
        """
        sidecars, missing = [], []
        for i in range(self.num_shards):
            sidecar = self._stored_sidecar(i, verify=verify)
            if sidecar is None:
                missing.append(i)
            else:
                sidecars.append(sidecar)
        if missing:
            raise IncompleteCacheError(
                f"cannot finalize cache {self.directory}: shards {missing} of {self.num_shards} are missing",
                missing=missing,
            )
        names = sidecars[0]["columns"] if sidecars else list(self.columns or [])
        for s in sidecars:
            if sorted(s["columns"]) != sorted(names):
                raise CacheError(f"shard {s['shard']} has columns {sorted(s['columns'])}, shard 0 has {sorted(names)}")
        manifest = {
            **self._layout(),
            "complete": True,
            "columns": names,
            "dtype": self.dtype,
            "num_shards": self.num_shards,
            "shards": [
                {"shard": s["shard"], "start": s["start"], "stop": s["stop"], "size": s["size"], "sha256": s["sha256"]}
                for s in sidecars
            ],
            "created_at": _now(),
            "meta": dict(meta or {}),
        }
        _atomic_write_json(self.manifest_path, manifest)
        return manifest

    def manifest(self) -> dict[str, Any] | None:
        """The manifest written by :meth:`finalize`, or None."""
        return _read_json(self.manifest_path)

    def is_complete(self) -> bool:
        """Whether :meth:`finalize` ran and every shard is still stored as it recorded.

        Cheap: compares the manifest with the sidecars and file sizes, without hashing the data (``load_all`` does
        that). Any write after ``finalize`` makes this False until ``finalize`` runs again.
        """
        manifest = self.manifest()
        if manifest is None or not manifest.get("complete"):
            return False
        if any(manifest.get(k) != v for k, v in self._layout().items()):
            return False
        shards = manifest.get("shards")
        if not isinstance(shards, list) or len(shards) != self.num_shards:
            return False
        for i, entry in enumerate(shards):
            sidecar = _read_json(self.sidecar_path(i))
            if sidecar is None or sidecar.get("sha256") != entry.get("sha256"):
                return False
            try:
                if self.shard_path(i).stat().st_size != entry.get("size"):
                    return False
            except FileNotFoundError:
                return False
        return True

    def clear(self) -> None:
        """Delete everything stored under this key; the object stays usable (an empty cache with the same layout)."""
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self._setup()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(directory={str(self.directory)!r}, num_rows={self.num_rows}, "
            f"shard_size={self.shard_size}, num_shards={self.num_shards})"
        )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
