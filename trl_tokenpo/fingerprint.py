"""Content fingerprints: the one hashing scheme of the package.

A fingerprint is a SHA-256 hex digest of a canonical, type-tagged encoding of its parts, stable across processes,
machines and Python hash seeds. The trainers use it to check where precomputed reference log-probs came from
(:func:`reference_fingerprint`), the estimator to key its saved adapters and its score cache, the built-in task to
name its cache directory.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


__all__ = [
    "ModelFingerprint",
    "fingerprint",
    "fingerprint_base_model",
    "fingerprint_dataset",
    "fingerprint_tokenizer",
    "jsonable",
    "reference_fingerprint",
]

_HASH_CHUNK = 64 * 1024 * 1024  # bytes fed to hashlib per call when hashing large tensors


class _Hasher:
    """SHA-256 over a type-tagged, length-prefixed encoding: `["ab"]` and `["a", "b"]` differ, and so do `1`, `1.0`,
    `True` and `"1"`; dict key order does not matter."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def hexdigest(self) -> str:
        return self._sha.hexdigest()

    def _tagged(self, tag: bytes, payload: bytes | memoryview = b"") -> None:
        self._sha.update(tag + struct.pack("<Q", len(payload)))
        for start in range(0, len(payload), _HASH_CHUNK):
            self._sha.update(payload[start : start + _HASH_CHUNK])

    def update(self, obj: Any) -> None:
        if isinstance(obj, enum.Enum):
            obj = obj.value
        if obj is None:
            self._tagged(b"N")
        elif isinstance(obj, bool):
            self._tagged(b"B", b"1" if obj else b"0")
        elif isinstance(obj, int):
            self._tagged(b"I", str(obj).encode())
        elif isinstance(obj, float):
            self._tagged(b"F", obj.hex().encode())
        elif isinstance(obj, (str, os.PathLike)):
            self._tagged(b"S", os.fspath(obj).encode("utf-8", "surrogatepass"))
        elif isinstance(obj, (bytes, bytearray, memoryview)):
            self._tagged(b"Y", memoryview(obj).cast("B"))
        elif isinstance(obj, torch.Tensor):
            self.update_tensor(obj)
        elif isinstance(obj, np.generic):
            self.update(obj.item())
        elif isinstance(obj, Mapping):
            if not all(isinstance(k, str) for k in obj):
                raise TypeError(f"cannot fingerprint a mapping with non-string keys: {list(obj)!r}")
            self._tagged(b"D", struct.pack("<Q", len(obj)))
            for key in sorted(obj):
                self.update(key)
                self.update(obj[key])
        elif isinstance(obj, (list, tuple)):  # a tuple hashes like the list it becomes in JSON
            self._tagged(b"L", struct.pack("<Q", len(obj)))
            for item in obj:
                self.update(item)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            self._tagged(b"C", f"{type(obj).__module__}.{type(obj).__qualname__}".encode())
            self.update({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
        else:
            raise TypeError(
                f"cannot fingerprint an object of type {type(obj).__qualname__}; pass JSON-able data, bytes, a tensor, "
                "or a fingerprint_* digest of it"
            )

    def update_tensor(self, tensor: torch.Tensor) -> None:
        """dtype, shape and raw bytes (copied to CPU one tensor at a time)."""
        t = tensor.detach()
        if t.is_meta:
            raise ValueError("cannot fingerprint a tensor on the meta device (weights not materialized)")
        if t.is_quantized:
            t = t.int_repr()
        self._tagged(b"T", f"{t.dtype}{list(t.shape)}".encode())
        flat = t.to("cpu").contiguous().reshape(-1)
        if flat.dtype == torch.bool:
            flat = flat.to(torch.uint8)
        raw = flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, dtype=np.uint8)
        self._tagged(b"R", memoryview(raw))


def fingerprint(*parts: Any) -> str:
    """Stable SHA-256 hex digest of `parts`: nested `None`, `bool`, `int`, `float` (exactly, via `float.hex`), `str`,
    paths, `bytes`, enums (by value), dicts with string keys, lists and tuples, dataclasses and tensors (dtype, shape
    and bytes; not the device). Anything else raises `TypeError` (a `repr` may hold memory addresses)."""
    hasher = _Hasher()
    hasher.update(list(parts))
    return hasher.hexdigest()


def jsonable(value: Any) -> Any:
    """`value` as JSON-able data for a fingerprint or a JSON file: enums by value, sets sorted, other objects by their
    string form."""
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(str(v) for v in value)
    return str(value)


def fingerprint_tokenizer(tokenizer: Any) -> str:
    """Digest of everything that decides the ids of a text or a conversation: the class, the backend definition of a
    fast tokenizer (model and merges, normalizer, pre-tokenizer, post-processor, added tokens; not the padding and
    truncation settings) or the vocabulary of a slow one, the special tokens and their ids, the chat template(s) and
    the BOS/EOS flags. A processor is fingerprinted through its `.tokenizer`."""
    tok = tokenizer if hasattr(tokenizer, "get_vocab") else getattr(tokenizer, "tokenizer", None)
    if tok is None or not hasattr(tok, "get_vocab"):
        raise TypeError(f"expected a transformers tokenizer or processor, got {type(tokenizer).__name__}")
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        definition = json.loads(backend.to_str())
        definition.pop("padding", None)
        definition.pop("truncation", None)
        vocabulary = json.dumps(definition, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
    else:  # slow tokenizer: the vocabulary is the best available description
        vocabulary = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode("utf-8", "surrogatepass")
    added = getattr(tok, "added_tokens_decoder", {}) or {}
    chat_template = getattr(tok, "chat_template", None)
    return fingerprint(
        "tokenizer/2",
        type(tok).__name__,
        hashlib.sha256(vocabulary).hexdigest(),
        {name: str(value) for name, value in (getattr(tok, "special_tokens_map", {}) or {}).items()},
        {name: getattr(tok, f"{name}_id", None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")},
        [[int(i), str(t), bool(getattr(t, "special", False))] for i, t in sorted(added.items())],
        dict(chat_template) if isinstance(chat_template, Mapping) else chat_template,
        {flag: jsonable(getattr(tok, flag, None)) for flag in ("add_bos_token", "add_eos_token")},
    )


# Config keys that do not change what a model computes from given weights and inputs: versions, dtype (the weights
# carry it), the architecture list, runtime switches trainers flip (TRL sets `use_cache=False`); private keys
# (`_name_or_path`, `_attn_implementation`, ...) are left out too.
_CONFIG_IGNORED = (
    "transformers_version", "dtype", "torch_dtype", "architectures", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict",
)  # fmt: skip
_PEFT_PREFIX = "base_model.model."


def _unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a `PeftModel` / PEFT tuner (adapter layers still injected), else `model`."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, BaseTuner):
        model = model.model
    return model


def _base_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Sorted (name, tensor) of every parameter and persistent buffer of the base model without what PEFT adds (adapter
    weights, `modules_to_save` copies); `.base_layer` / `.original_module` segments and a `base_model.model.` prefix
    are removed, so the names are those of the plain model."""
    excluded, wrappers = [], set()
    for prefix, module in model.named_modules():
        adapter_names = getattr(module, "adapter_layer_names", None)
        if adapter_names is not None and prefix:
            wrappers.add(prefix)
            excluded.extend(f"{prefix}.{name}." for name in adapter_names)
    weights = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor is None or any(name.startswith(e) for e in excluded):
            continue
        parts = name.split(".")
        kept = [
            part
            for i, part in enumerate(parts)
            if not (part in ("base_layer", "original_module") and ".".join(parts[:i]) in wrappers)
        ]
        name = ".".join(kept)
        weights.append((name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name, tensor))
    return sorted(weights, key=lambda item: item[0])


def fingerprint_base_model(model: torch.nn.Module) -> str:
    """Digest of a model's base weights, the same for a plain model and for it wrapped with PEFT adapters: the class,
    the config (without private keys, versions and dtype) and the name, dtype, shape and bytes of every parameter and
    persistent buffer. A merged adapter is part of the weights. Cost: one streamed SHA-256 pass over the weights
    (roughly 1 GB/s)."""
    model = _unwrap_peft(model)
    config = getattr(model, "config", None)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else {}
    hasher = _Hasher()
    hasher.update(["base_model/2", type(model).__name__])
    hasher.update(jsonable({k: v for k, v in config_dict.items() if not k.startswith("_") and k not in _CONFIG_IGNORED}))
    weights = _base_weights(model)
    if not weights:
        raise ValueError(f"model {type(model).__name__} has no weights to fingerprint")
    for name, tensor in weights:
        hasher.update(name)
        hasher.update_tensor(tensor)
    return hasher.hexdigest()


def reference_fingerprint(model: torch.nn.Module, processing_class: Any, base_digest: str | None = None) -> str:
    """Digest identifying per-token reference log-probs: the base weights of `model` and the tokenizer. A trainer
    recomputes it from its own reference model and tokenizer and refuses stored `*_ref_logps` on a mismatch.
    `base_digest`: `fingerprint_base_model(model)` when already known."""
    base_digest = base_digest or fingerprint_base_model(model)
    return fingerprint("reference-logps-v1", base_digest, fingerprint_tokenizer(processing_class))


def fingerprint_dataset(dataset: Any) -> str:
    """Digest of a `datasets.Dataset`'s content, from the fingerprint `datasets` maintains for its own cache (a hash of
    the data or of its source files, updated by every transform) and the row count. When `datasets` cannot hash a
    transform (it logs "a random hash was used instead"), the digest changes on every run and caches never hit."""
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        raise TypeError(f"cannot fingerprint a dataset of type {type(dataset).__name__}")
    return fingerprint("datasets.Dataset", dataset._fingerprint, dataset.num_rows)


class ModelFingerprint:
    """`fingerprint_base_model(model)`, recomputed only when the weights may have changed.

    The digest is reused while every parameter and persistent buffer is the same tensor object with the same storage,
    dtype, shape, device and version counter: an optimizer step or any in-place change (version counter), a new
    `Parameter`, `load_state_dict(..., assign=True)`, `model.to(dtype)` or a move to another device all trigger a
    recomputation. Not seen: in-place edits through `tensor.data` (they bypass the version counter).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._state: list[tuple] | None = None
        self._digest: str | None = None

    def _current_state(self) -> list[tuple]:
        return [
            (name, t, t.data_ptr(), t.dtype, tuple(t.shape), t.device, t._version)
            for name, t in self.model.state_dict(keep_vars=True).items()
            if t is not None
        ]

    def __call__(self) -> str:
        state = self._current_state()
        old = self._state
        same = old is not None and len(old) == len(state) and all(
            a[0] == b[0] and a[1] is b[1] and a[2:] == b[2:] for a, b in zip(old, state)
        )
        if not same:
            self._digest = fingerprint_base_model(self.model)
            self._state = state
        return self._digest
