"""Tests of the on-disk score cache and the fingerprints (trl_tokenpo/estimator/cache.py)."""

import json
import multiprocessing
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from trl_tokenpo.estimator.cache import (
    CacheLayoutError,
    CorruptShardError,
    IncompleteCacheError,
    MissingShardError,
    ShardedScoreCache,
    fingerprint,
    fingerprint_dataset,
    fingerprint_module,
    fingerprint_tokenizer,
)


COLUMNS = ("chosen_token_rewards", "rejected_token_rewards")


def make_rows(num_rows: int, seed: int = 0) -> dict[str, list[list[float]]]:
    """Variable-length rows of float32-representable values (the cache stores float32 by default)."""
    rng = random.Random(seed)
    out = {}
    for name in COLUMNS:
        out[name] = [[float(np.float32(rng.gauss(0, 1))) for _ in range(rng.randint(0, 7))] for _ in range(num_rows)]
    return out


def shard_of(rows: dict[str, list], cache: ShardedScoreCache, i: int) -> dict[str, list]:
    r = cache.shard_rows(i)
    return {name: values[r.start : r.stop] for name, values in rows.items()}


def fill(cache: ShardedScoreCache, rows: dict[str, list], shards=None) -> None:
    for i in range(cache.num_shards) if shards is None else shards:
        cache.write_shard(i, shard_of(rows, cache, i))


# ----------------------------------------------------------------------------------------------------------------------
# Layout, round trip, resume
# ----------------------------------------------------------------------------------------------------------------------


def test_shard_layout(tmp_path):
    cache = ShardedScoreCache(tmp_path, "key", num_rows=10, shard_size=4)
    assert cache.num_shards == 3
    assert [cache.shard_rows(i) for i in range(3)] == [range(0, 4), range(4, 8), range(8, 10)]
    assert cache.missing_shards() == [0, 1, 2]
    with pytest.raises(IndexError, match="3 shards"):
        cache.shard_rows(3)
    assert ShardedScoreCache(tmp_path, "empty", num_rows=0, shard_size=4).num_shards == 0


def test_round_trip(tmp_path):
    rows = make_rows(10)
    cache = ShardedScoreCache(tmp_path, "key", num_rows=10, shard_size=4, request={"model": "tiny", "seed": 0})
    fill(cache, rows)
    assert cache.missing_shards() == []
    assert cache.read_shard(1) == shard_of(rows, cache, 1)
    assert cache.load_all() == rows
    assert json.loads((tmp_path / "key" / "request.json").read_text()) == {"model": "tiny", "seed": 0}


def test_round_trip_float64_and_array_rows(tmp_path):
    cache = ShardedScoreCache(tmp_path, "key", num_rows=3, shard_size=3, dtype="float64")
    cache.write_shard(
        0, {"r": [np.array([0.1, -2.5]), torch.tensor([1e-7], dtype=torch.float64), []], "s": [[1], [2.0], (3.5,)]}
    )
    assert cache.load_all() == {"r": [[0.1, -2.5], [1e-7], []], "s": [[1.0], [2.0], [3.5]]}


def test_resume_sees_missing_shards(tmp_path):
    rows = make_rows(14)
    first = ShardedScoreCache(tmp_path, "key", num_rows=14, shard_size=4)
    fill(first, rows, shards=[0, 2])

    resumed = ShardedScoreCache(tmp_path, "key", num_rows=14, shard_size=4)
    assert resumed.missing_shards() == [1, 3]
    with pytest.raises(IncompleteCacheError) as info:
        resumed.load_all()
    assert info.value.missing == [1, 3] and info.value.corrupt == []
    with pytest.raises(MissingShardError):
        resumed.read_shard(1)
    fill(resumed, rows, shards=resumed.missing_shards())
    assert resumed.load_all() == rows


def test_different_key_misses(tmp_path):
    rows = make_rows(8)
    fill(ShardedScoreCache(tmp_path, fingerprint("a"), num_rows=8, shard_size=4), rows)
    other = ShardedScoreCache(tmp_path, fingerprint("b"), num_rows=8, shard_size=4)
    assert other.missing_shards() == [0, 1]
    assert not other.is_complete()


def test_layout_change_is_refused(tmp_path):
    ShardedScoreCache(tmp_path, "key", num_rows=8, shard_size=4)
    with pytest.raises(CacheLayoutError, match="shard_size=4"):
        ShardedScoreCache(tmp_path, "key", num_rows=8, shard_size=2)


@pytest.mark.parametrize("key", ["", "../escape", "a/b", ".hidden", "x" * 200])
def test_invalid_key(tmp_path, key):
    with pytest.raises(ValueError, match="invalid cache key"):
        ShardedScoreCache(tmp_path, key, num_rows=1, shard_size=1)


# ----------------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------------


def test_row_count_validation_is_clear(tmp_path):
    cache = ShardedScoreCache(tmp_path, "key", num_rows=10, shard_size=4)
    with pytest.raises(ValueError, match=r"shard 2 covers rows 8\.\.9 \(2 rows\), but column 'c' has 3 rows"):
        cache.write_shard(2, {"c": [[1.0]] * 3})
    with pytest.raises(ValueError, match="1-D"):
        cache.write_shard(0, {"c": [[1.0], [[1.0, 2.0]], [], []]})
    with pytest.raises(ValueError, match="non-empty mapping"):
        cache.write_shard(0, {})
    with pytest.raises(IndexError):
        cache.write_shard(3, {"c": [[1.0]] * 4})
    assert cache.missing_shards() == [0, 1, 2]  # nothing was written


def test_fixed_columns_are_enforced(tmp_path):
    cache = ShardedScoreCache(tmp_path, "key", num_rows=2, shard_size=2, columns=COLUMNS)
    with pytest.raises(ValueError, match="this cache stores"):
        cache.write_shard(0, {"chosen_token_rewards": [[1.0], [2.0]]})


# ----------------------------------------------------------------------------------------------------------------------
# Atomicity and corruption
# ----------------------------------------------------------------------------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftover_temp_files_are_ignored_and_cleaned(tmp_path):
    rows = make_rows(8)
    cache = ShardedScoreCache(tmp_path, "key", num_rows=8, shard_size=4)
    fill(cache, rows, shards=[0])
    directory = cache.directory
    # A writer on this host that was killed mid-write, and one whose host is unknown and which is long gone.
    from trl_tokenpo.estimator import cache as cache_module

    dead = directory / f".shard-00001.npz.{cache_module._HOST}.{dead_pid()}.0badc0de.tmp"
    dead.write_bytes(b"partial")
    foreign = directory / ".shard-00001.json.otherhost.12345.0badc0de.tmp"
    foreign.write_text("{")
    os.utime(foreign, (0, 0))
    live = directory / f".shard-00001.npz.{cache_module._HOST}.{os.getpid()}.0badc0de.tmp"
    live.write_bytes(b"being written")

    assert cache.missing_shards() == [1]  # temp files never count as shards
    resumed = ShardedScoreCache(tmp_path, "key", num_rows=8, shard_size=4)
    assert not dead.exists() and not foreign.exists()
    assert live.exists()  # its writer (this process) is alive: left alone
    assert resumed.missing_shards() == [1]
    assert resumed.read_shard(0) == shard_of(rows, resumed, 0)


def test_data_file_without_sidecar_is_ignored(tmp_path):
    """A kill between writing the data file and its sidecar leaves an orphan that does not count."""
    rows = make_rows(8)
    cache = ShardedScoreCache(tmp_path, "key", num_rows=8, shard_size=4)
    fill(cache, rows)
    cache.sidecar_path(1).unlink()
    assert cache.missing_shards() == [1]
    fill(cache, rows, shards=[1])
    assert cache.load_all() == rows


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete_data", "garbage_sidecar"])
def test_corrupt_shard_is_detected_removed_and_never_returned(tmp_path, damage):
    rows = make_rows(12)
    cache = ShardedScoreCache(tmp_path, "key", num_rows=12, shard_size=4)
    fill(cache, rows)
    cache.finalize({})
    path = cache.shard_path(1)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip_byte":
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "delete_data":
        path.unlink()
    else:
        cache.sidecar_path(1).write_text("{not json")

    with pytest.raises(CorruptShardError):
        cache.read_shard(1)
    assert not cache.shard_path(1).exists() and not cache.sidecar_path(1).exists()
    assert not cache.is_complete()
    assert cache.missing_shards() == [1]
    with pytest.raises(MissingShardError):
        cache.read_shard(1)


def test_load_all_reports_corruption_as_missing(tmp_path):
    rows = make_rows(12)
    cache = ShardedScoreCache(tmp_path, "key", num_rows=12, shard_size=4)
    fill(cache, rows)
    data = bytearray(cache.shard_path(2).read_bytes())
    data[-10] ^= 0xFF
    cache.shard_path(2).write_bytes(bytes(data))
    with pytest.raises(IncompleteCacheError) as info:
        cache.load_all()
    assert info.value.missing == [2] and info.value.corrupt == [2]
    assert cache.missing_shards() == [2]
    fill(cache, rows, shards=[2])
    assert cache.load_all() == rows


@pytest.mark.parametrize("verify", [True, False])
def test_missing_shards_detects_truncation(tmp_path, verify):
    rows = make_rows(8)
    cache = ShardedScoreCache(tmp_path, "key", num_rows=8, shard_size=4)
    fill(cache, rows)
    path = cache.shard_path(0)
    path.write_bytes(path.read_bytes()[:-5])
    assert cache.missing_shards(verify=verify) == [0]
    assert not path.exists()


def test_flipped_byte_needs_verification(tmp_path):
    """verify=False only checks sizes; the default (verify=True) hashes."""
    rows = make_rows(8)
    cache = ShardedScoreCache(tmp_path, "key", num_rows=8, shard_size=4)
    fill(cache, rows)
    data = bytearray(cache.shard_path(1).read_bytes())
    data[100] ^= 0x10
    cache.shard_path(1).write_bytes(bytes(data))
    assert cache.missing_shards(verify=False) == []
    assert cache.missing_shards() == [1]


def _write_rank(root: str, rank: int, world_size: int, rows: dict) -> None:
    cache = ShardedScoreCache(root, "key", num_rows=16, shard_size=2)
    for i in range(rank, cache.num_shards, world_size):
        cache.write_shard(i, shard_of(rows, cache, i))


@pytest.mark.skipif(sys.platform != "linux", reason="uses the fork start method to keep the test fast")
def test_concurrent_writers_on_different_shards(tmp_path):
    """Two processes write disjoint shards of the same cache at the same time; one finalizes."""
    rows = make_rows(16, seed=3)
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_write_rank, args=(str(tmp_path), rank, 2, rows)) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    cache = ShardedScoreCache(tmp_path, "key", num_rows=16, shard_size=2)
    assert cache.missing_shards() == []
    cache.finalize({"world_size": 2})
    assert cache.is_complete()
    assert cache.load_all() == rows


# ----------------------------------------------------------------------------------------------------------------------
# Finalize, clear
# ----------------------------------------------------------------------------------------------------------------------


def test_finalize_and_is_complete(tmp_path):
    rows = make_rows(10)
    cache = ShardedScoreCache(tmp_path, "key", num_rows=10, shard_size=4)
    fill(cache, rows, shards=[0, 1])
    assert not cache.is_complete()
    with pytest.raises(IncompleteCacheError) as info:
        cache.finalize({"note": "too early"})
    assert info.value.missing == [2]
    assert cache.manifest() is None

    fill(cache, rows, shards=[2])
    manifest = cache.finalize({"estimator": "contrastive", "seconds": 1.5})
    assert cache.is_complete()
    on_disk = json.loads(cache.manifest_path.read_text())
    assert on_disk == manifest
    assert on_disk["key"] == "key" and on_disk["num_rows"] == 10 and on_disk["complete"] is True
    assert sorted(on_disk["columns"]) == sorted(COLUMNS)
    assert [s["sha256"] for s in on_disk["shards"]] == [
        json.loads(cache.sidecar_path(i).read_text())["sha256"] for i in range(3)
    ]
    assert on_disk["meta"] == {"estimator": "contrastive", "seconds": 1.5}
    assert "created_at" in on_disk

    # A new object on the same directory sees it complete; rewriting a shard invalidates the manifest.
    assert ShardedScoreCache(tmp_path, "key", num_rows=10, shard_size=4).is_complete()
    fill(cache, rows, shards=[1])
    assert not cache.is_complete()
    cache.finalize({})
    assert cache.is_complete()
    cache.shard_path(0).unlink()
    assert not cache.is_complete()


def test_empty_cache_finalizes(tmp_path):
    cache = ShardedScoreCache(tmp_path, "key", num_rows=0, shard_size=4, columns=COLUMNS)
    assert cache.missing_shards() == []
    cache.finalize({})
    assert cache.is_complete()
    assert cache.load_all() == {name: [] for name in COLUMNS}


def test_clear(tmp_path):
    rows = make_rows(8)
    cache = ShardedScoreCache(tmp_path, "key", num_rows=8, shard_size=4)
    fill(cache, rows)
    cache.finalize({})
    cache.clear()
    assert not cache.is_complete()
    assert cache.missing_shards() == [0, 1]
    fill(cache, rows)
    assert cache.load_all() == rows


# ----------------------------------------------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------------------------------------------


# The digest of GOLDEN_PARTS, computed once and fixed here: it must not depend on the process, the hash seed or the
# machine, and must not change between releases (a change silently invalidates every user's cache).
GOLDEN_PARTS = {
    "b": [1, 2.5, None, True],
    "a": "x",
    "s": {"q", "p", "r"},
    "t": torch.arange(4),
    "n": np.ones(2),
    "y": b"\x00",
}
GOLDEN_DIGEST = "8432dc3acd53cd4eb53cdad0147a51ad9ea74ff11e6abec230f15613ce9a0dca"


def test_fingerprint_is_stable_and_canonical():
    digest = fingerprint(GOLDEN_PARTS)
    assert digest == GOLDEN_DIGEST
    reordered = {k: GOLDEN_PARTS[k] for k in reversed(list(GOLDEN_PARTS))}
    assert fingerprint(reordered) == digest
    assert fingerprint({**GOLDEN_PARTS, "t": torch.arange(4), "b": (1, 2.5, None, True)}) == digest  # same content
    assert fingerprint({**GOLDEN_PARTS, "t": torch.arange(8)[::2] // 2}) == digest  # strides do not matter


def test_fingerprint_is_sensitive():
    base = fingerprint("a", 1)
    others = [
        fingerprint("a", 1.0),
        fingerprint("a", True),
        fingerprint("a", "1"),
        fingerprint(["a", 1]),
        fingerprint("a1"),
        fingerprint("a", 1, None),
        fingerprint(torch.zeros(2)),
        fingerprint(torch.zeros(2, dtype=torch.float64)),
        fingerprint(torch.zeros(1, 2)),
        fingerprint(torch.zeros(2, dtype=torch.bfloat16)),
    ]
    assert len({base, *others}) == len(others) + 1
    with pytest.raises(TypeError, match="cannot fingerprint"):
        fingerprint(object())


def make_tokenizer(chat_template=None) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2, "hello": 3, "world": 4, "good": 5, "bad": 6}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
    tok.chat_template = chat_template
    return tok


def test_fingerprint_tokenizer():
    template = "{% for m in messages %}{{ m['content'] }}<eos>{% endfor %}"
    digest = fingerprint_tokenizer(make_tokenizer(template))
    assert fingerprint_tokenizer(make_tokenizer(template)) == digest
    # Padding and truncation settings do not change what ids an example gets.
    tok = make_tokenizer(template)
    tok.padding_side, tok.truncation_side = "left", "left"
    tok.backend_tokenizer.enable_truncation(max_length=3)
    assert fingerprint_tokenizer(tok) == digest
    # The chat template, the vocabulary and the special tokens do.
    assert fingerprint_tokenizer(make_tokenizer(template.replace("<eos>", "\n"))) != digest
    assert fingerprint_tokenizer(make_tokenizer(None)) != digest
    tok = make_tokenizer(template)
    tok.add_tokens(["extra"])
    assert fingerprint_tokenizer(tok) != digest
    tok = make_tokenizer(template)
    tok.eos_token = "<pad>"
    assert fingerprint_tokenizer(tok) != digest


def make_module(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))


def test_fingerprint_module():
    module = make_module()
    digest = fingerprint_module(module)
    assert fingerprint_module(make_module()) == digest
    assert fingerprint_module(make_module(seed=1)) != digest
    changed = make_module()
    with torch.no_grad():
        changed[2].bias[1] += 1e-6  # one parameter, one element
    assert fingerprint_module(changed) != digest
    assert fingerprint_module(make_module().to(torch.float64)) != digest  # dtype matters

    # trainable_only hashes only what requires grad, and refuses to hash nothing.
    frozen_tail = make_module()
    frozen_tail[0].requires_grad_(False)
    trainable = fingerprint_module(frozen_tail, trainable_only=True)
    other_head = make_module(seed=1)
    other_head[0].requires_grad_(False)
    other_head.load_state_dict({k: v for k, v in make_module().state_dict().items() if not k.startswith("0.")}, False)
    assert fingerprint_module(other_head, trainable_only=True) == trainable
    assert fingerprint_module(other_head) != fingerprint_module(frozen_tail)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fingerprint_module(make_module().requires_grad_(False), trainable_only=True)


def test_fingerprint_module_hashes_persistent_buffers():
    a, b = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    assert fingerprint_module(a) == fingerprint_module(b)
    b.running_mean += 1
    assert fingerprint_module(a) != fingerprint_module(b)
    assert fingerprint_module(a, include_buffers=False) == fingerprint_module(b, include_buffers=False)


def test_fingerprint_peft_adapter():
    peft = pytest.importorskip("peft")

    def wrapped(seed):
        model = make_module()
        config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False)
        torch.manual_seed(seed)
        return peft.get_peft_model(model, config, adapter_name="plus")

    a, b, c = wrapped(0), wrapped(0), wrapped(1)
    digest = fingerprint_module(a, adapter_name="plus")
    assert fingerprint_module(b, adapter_name="plus") == digest
    assert fingerprint_module(c, adapter_name="plus") != digest
    assert fingerprint_module(a, trainable_only=True) == fingerprint_module(b, trainable_only=True)
    assert fingerprint_module(a, trainable_only=True) != fingerprint_module(c, trainable_only=True)
    b.peft_config["plus"].lora_alpha = 8  # same weights, different scaling
    assert fingerprint_module(b, adapter_name="plus") != digest
    with pytest.raises(ValueError, match="no PEFT adapter named 'minus'"):
        fingerprint_module(a, adapter_name="minus")


def test_fingerprint_dataset():
    data = {"prompt": ["p1", "p2"], "chosen": ["a", "b"], "rejected": ["c", "d"]}
    digest = fingerprint_dataset(Dataset.from_dict(data))
    assert fingerprint_dataset(Dataset.from_dict(data)) == digest
    assert fingerprint_dataset(Dataset.from_dict({**data, "chosen": ["a", "B"]})) != digest
    assert fingerprint_dataset(Dataset.from_dict(data).select([1, 0])) != digest
    assert fingerprint(Dataset.from_dict(data)) == fingerprint(Dataset.from_dict(data))
    assert fingerprint_dataset([{"a": 1}]) != fingerprint_dataset([{"a": 2}])
    with pytest.raises(TypeError, match="IterableDataset"):
        fingerprint_dataset(Dataset.from_dict(data).to_iterable_dataset())
