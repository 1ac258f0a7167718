"""The estimator's score store (trl_tokenpo/estimator/store.py): round trip, resume, damage, concurrency."""

import json
import multiprocessing
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from trl_tokenpo.estimator.store import CacheError, IncompleteCacheError, ShardedScoreCache
from trl_tokenpo.files import HOST


COLUMNS = ("chosen_token_rewards", "rejected_token_rewards")


def make_rows(num_rows: int, seed: int = 0) -> dict[str, list[list[float]]]:
    """Variable-length rows of float32-representable values."""
    rng = random.Random(seed)
    return {
        name: [[float(np.float32(rng.gauss(0, 1))) for _ in range(rng.randint(0, 7))] for _ in range(num_rows)]
        for name in COLUMNS
    }


def store(root, num_rows=10, shard_size=4, key="key", **kwargs) -> ShardedScoreCache:
    return ShardedScoreCache(root, key, num_rows, shard_size, COLUMNS, **kwargs)


def shard_of(rows, cache, i):
    r = cache.shard_rows(i)
    return {name: values[r.start : r.stop] for name, values in rows.items()}


def fill(cache, rows, shards=None) -> None:
    for i in range(cache.num_shards) if shards is None else shards:
        cache.write_shard(i, shard_of(rows, cache, i))


def test_layout_round_trip_and_resume(tmp_path):
    rows = make_rows(10)
    cache = store(tmp_path, request={"model": "tiny"})
    assert [cache.shard_rows(i) for i in range(3)] == [range(0, 4), range(4, 8), range(8, 10)]
    assert cache.missing_shards() == [0, 1, 2] and not cache.directory.exists()  # nothing written by reading
    fill(cache, rows, shards=[0, 2])
    resumed = store(tmp_path)
    assert resumed.missing_shards() == [1]
    with pytest.raises(IncompleteCacheError) as info:
        resumed.load_all()
    assert info.value.missing == [1]
    fill(resumed, rows, shards=[1])
    assert resumed.load_all() == rows
    assert (cache.directory / "request.json").read_text().strip().startswith("{")
    assert store(tmp_path, num_rows=0, key="empty").load_all() == {name: [] for name in COLUMNS}


def test_layout_change_and_bad_input_are_refused(tmp_path):
    fill(store(tmp_path), make_rows(10), shards=[0])
    with pytest.raises(CacheError, match="shard_size=4"):
        store(tmp_path, shard_size=2)
    with pytest.raises(ValueError, match="invalid store key"):
        store(tmp_path, key="../escape")
    cache = store(tmp_path)
    with pytest.raises(ValueError, match="shard 2 has 2 rows, column 'chosen_token_rewards' has 3"):
        cache.write_shard(2, {name: [[1.0]] * 3 for name in COLUMNS})
    with pytest.raises(ValueError, match="the store holds"):
        cache.write_shard(2, {"chosen_token_rewards": [[1.0]] * 2})


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftover_temp_files_are_ignored_and_cleaned_on_the_next_write(tmp_path):
    rows = make_rows(8)
    cache = store(tmp_path, num_rows=8)
    fill(cache, rows, shards=[0])
    dead = cache.directory / f".shard-00001.npz.{HOST}.{dead_pid()}.0badc0de.tmp"
    dead.write_bytes(b"partial")
    foreign = cache.directory / ".shard-00001.json.otherhost.12345.0badc0de.tmp"
    foreign.write_text("{")
    os.utime(foreign, (0, 0))
    live = cache.directory / f".shard-00001.npz.{HOST}.{os.getpid()}.0badc0de.tmp"
    live.write_bytes(b"being written")
    resumed = store(tmp_path, num_rows=8)
    assert resumed.missing_shards() == [1] and dead.exists()  # reading removes nothing
    fill(resumed, rows, shards=[1])
    assert not dead.exists() and not foreign.exists() and live.exists()  # a live writer's file is left alone
    assert resumed.load_all() == rows


# Every kind of damage to a stored shard: the shard reads as missing (and is deleted), never as wrong values.
DAMAGES = ["truncate", "flip_byte", "delete_data", "empty_data", "garbage_sidecar", "empty_sidecar", "sidecar_of_other",
           "sidecar_wrong_size", "sidecar_wrong_sha", "data_of_other_shard", "not_an_npz"]  # fmt: skip


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_shard_is_deleted_and_recomputed_never_returned(tmp_path, damage):
    rows = make_rows(12)
    cache = store(tmp_path, num_rows=12)
    fill(cache, rows)
    data_path, sidecar_path = cache.shard_path(1), cache.sidecar_path(1)
    data = bytearray(data_path.read_bytes())
    if damage == "truncate":
        data_path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip_byte":
        data[len(data) // 2] ^= 0x01
        data_path.write_bytes(bytes(data))
    elif damage == "delete_data":
        data_path.unlink()
    elif damage == "empty_data":
        data_path.write_bytes(b"")
    elif damage == "garbage_sidecar":
        sidecar_path.write_text("{not json")
    elif damage == "empty_sidecar":
        sidecar_path.write_text("{}")
    elif damage == "sidecar_of_other":
        sidecar_path.write_text(cache.sidecar_path(2).read_text())
    elif damage in ("sidecar_wrong_size", "sidecar_wrong_sha"):
        sidecar = json.loads(sidecar_path.read_text())
        if damage == "sidecar_wrong_size":
            sidecar["size"] += 1
        else:
            sidecar["sha256"] = "0" * 64
        sidecar_path.write_text(json.dumps(sidecar))
    elif damage == "data_of_other_shard":
        data_path.write_bytes(cache.shard_path(0).read_bytes())
    else:
        data_path.write_bytes(b"x" * len(data))
    assert cache.read_shard(1) is None
    assert not data_path.exists() and not sidecar_path.exists()
    assert cache.missing_shards() == [1]
    fill(cache, rows, shards=[1])
    assert cache.load_all() == rows


def test_unverified_check_sees_sizes_verified_check_sees_bytes(tmp_path):
    rows = make_rows(8)
    cache = store(tmp_path, num_rows=8)
    fill(cache, rows)
    data = bytearray(cache.shard_path(1).read_bytes())
    data[100] ^= 0x10
    cache.shard_path(1).write_bytes(bytes(data))
    assert cache.missing_shards(verify=False) == [] and cache.has_shard(1)
    assert cache.missing_shards(verify=True) == [1]
    with pytest.raises(IncompleteCacheError):
        cache.load_all()


def _fill_under_locks(root: str, rows: dict, barrier) -> None:
    """One of several processes filling the same store: each shard is written under its lock, only when missing."""
    cache = store(root, num_rows=16, shard_size=1)
    barrier.wait(timeout=60)
    for i in range(cache.num_shards):
        with cache.lock(i, wait=True):
            if not cache.has_shard(i):
                cache.write_shard(i, shard_of(rows, cache, i))
    assert cache.load_all() == rows


@pytest.mark.skipif(sys.platform != "linux", reason="uses the fork start method to keep the test fast")
def test_processes_filling_one_store_under_locks_all_read_it_complete(tmp_path):
    rows = make_rows(16, seed=3)
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(4)
    procs = [context.Process(target=_fill_under_locks, args=(str(tmp_path), rows, barrier)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 4
    assert store(tmp_path, num_rows=16, shard_size=1).load_all() == rows


def test_a_held_lock_is_reported_and_released_when_its_holder_ends(tmp_path):
    cache = store(tmp_path)
    other = store(tmp_path)
    with cache.lock(0, wait=False) as held:
        assert held
        with other.lock(0, wait=False) as held_too:
            assert not held_too
        with other.lock(1, wait=False) as held_other_shard:
            assert held_other_shard
    with other.lock(0, wait=False) as held_after:
        assert held_after
