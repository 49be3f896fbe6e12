"""moe.data: file-level split, cache reuse/rebuild, .bin memmaps, rank-sharded resumable sampler, errors."""

import hashlib
import json
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from moe import data


def make_corpus(folder: Path, num_files: int = 40) -> dict[str, bytes]:
    """A folder of small distinct text files (some nested, one hidden that must be ignored)."""
    contents = {}
    for i in range(num_files):
        relative = f"pkg{i % 3}/module_{i}.py" if i % 2 else f"top_{i}.txt"
        body = (f"# file {i}\n" + f"value_{i} = {i * 7}\n" * (i % 5 + 1)).encode()
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(body)
        contents[relative] = body
    (folder / ".hidden").write_bytes(b"never read")
    return contents


def cache_folders(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir())


def test_split_is_by_file_deterministic_and_disjoint(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    contents = make_corpus(src)
    first = data.prepare_tokens(src, tmp_path / "cache_a", val_fraction=0.2)
    second = data.prepare_tokens(src, tmp_path / "cache_b", val_fraction=0.2)
    assert first.is_bytes and first.vocab_size == 256
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)

    (folder,) = cache_folders(tmp_path / "cache_a")
    meta = json.loads((folder / "meta.json").read_text())
    train_files, val_files = meta["train_files"], meta["val_files"]
    assert set(train_files).isdisjoint(val_files)
    assert set(train_files) | set(val_files) == set(contents)
    # Independent statement of the rule: sha256 of the relative path, as a fraction of 2**64, < 0.2.
    expected_val = sorted(p for p in contents if int(hashlib.sha256(p.encode()).hexdigest()[:16], 16) / 2**64 < 0.2)
    assert val_files == expected_val and 0 < len(val_files) < len(contents)
    assert bytes(first.train) == b"".join(contents[p] for p in sorted(train_files))
    assert bytes(first.val) == b"".join(contents[p] for p in sorted(val_files))


def test_split_files_fallback_keeps_both_sides_non_empty():
    names = ["a.py", "b.py", "c.py"]
    train, val = data.split_files(names, 1e-9)
    assert len(val) == 1 and sorted(train + val) == names
    train, val = data.split_files(names, 0.999999999)
    assert len(train) == 1 and sorted(train + val) == names


def test_single_text_file_is_split_by_position(tmp_path):
    text = tmp_path / "book.txt"
    payload = bytes(range(256)) * 40
    text.write_bytes(payload)
    splits = data.prepare_tokens(text, tmp_path / "cache", val_fraction=0.1)
    cut = len(payload) - math.ceil(len(payload) * 0.1)
    assert bytes(splits.train) == payload[:cut] and bytes(splits.val) == payload[cut:]


def test_cache_is_reused_and_rebuilt_when_the_source_changes(tmp_path):
    src, cache = tmp_path / "src", tmp_path / "cache"
    src.mkdir()
    contents = make_corpus(src)
    first = data.prepare_tokens(src, cache, val_fraction=0.2)
    (folder,) = cache_folders(cache)
    train_inode = os.stat(folder / "train.u8").st_ino
    old_train = bytes(first.train)

    again = data.prepare_tokens(src, cache, val_fraction=0.2)
    assert cache_folders(cache) == [folder] and os.stat(folder / "train.u8").st_ino == train_inode
    assert bytes(again.train) == old_train

    changed = min(contents)
    (src / changed).write_bytes(contents[changed] + b"# appended line\n")
    rebuilt = data.prepare_tokens(src, cache, val_fraction=0.2)
    assert len(cache_folders(cache)) == 2
    assert len(rebuilt.train) + len(rebuilt.val) == len(first.train) + len(first.val) + len(b"# appended line\n")
    assert b"# appended line" in bytes(rebuilt.train) + bytes(rebuilt.val)
    assert bytes(np.memmap(folder / "train.u8", dtype=np.uint8, mode="r")) == old_train  # old cache kept
    assert not list(cache.rglob("*.tmp"))


def test_corrupt_cache_is_reported(tmp_path):
    src, cache = tmp_path / "src", tmp_path / "cache"
    src.mkdir()
    make_corpus(src)
    data.prepare_tokens(src, cache)
    (folder,) = cache_folders(cache)
    with open(folder / "val.u8", "ab") as f:
        f.write(b"junk")
    with pytest.raises(ValueError, match="corrupt data cache"):
        data.prepare_tokens(src, cache)


def test_stdlib_corpus_files_and_cache(tmp_path):
    files = data.default_corpus_files()
    root = data.stdlib_root()
    assert files == sorted(files) and len(files) > 100
    for path in files:
        parts = path.relative_to(root).parts[:-1]
        assert path.suffix == ".py" and data.STDLIB_EXCLUDED_DIRS.isdisjoint(parts)
    splits = data.prepare_tokens("stdlib", tmp_path)
    assert len(splits.train) + len(splits.val) == sum(p.stat().st_size for p in files)
    assert splits.train.dtype == np.uint8 and len(splits.val) > 10_000


def test_cache_dir_defaults_to_moe_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_CACHE", str(tmp_path / "envcache"))
    assert data.default_cache_dir() == tmp_path / "envcache"
    monkeypatch.delenv("MOE_CACHE")
    assert data.default_cache_dir() == Path.home() / ".cache" / "moe"


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_pretokenised_bin_memmaps(tmp_path, dtype):
    tokens = (np.arange(5000, dtype=np.int64) * 7919 % (60000 if dtype == "uint16" else 100_000)).astype(dtype)
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    splits = data.prepare_tokens(path, tmp_path / "cache", val_fraction=0.1, dtype=dtype)
    assert splits.train.dtype == np.dtype(dtype) and not splits.is_bytes
    assert np.array_equal(splits.train, tokens[:4500]) and np.array_equal(splits.val, tokens[4500:])
    assert splits.vocab_size == int(tokens.max()) + 1

    val_path = tmp_path / "val.bin"
    tokens[:100].tofile(val_path)
    separate = data.prepare_tokens(path, tmp_path / "cache", dtype=dtype, val_source=val_path, vocab_size=100_000)
    assert np.array_equal(separate.train, tokens) and np.array_equal(separate.val, tokens[:100])
    assert separate.vocab_size == 100_000
    assert not (tmp_path / "cache").exists()  # .bin files are read in place

    no_suffix = tmp_path / "tokens.u"
    tokens.tofile(no_suffix)
    forced = data.prepare_tokens(no_suffix, tmp_path / "cache", val_fraction=0.1, dtype=dtype, kind="bin")
    assert np.array_equal(forced.val, tokens[4500:])


def test_bad_inputs_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="nowhere"):
        data.prepare_tokens(tmp_path / "nowhere", tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no input files.*empty"):
        data.prepare_tokens(empty, tmp_path / "cache")
    path = tmp_path / "t.bin"
    np.arange(11, dtype=np.uint16).tofile(path)
    with pytest.raises(ValueError, match="uint16.*got 'int8'"):
        data.prepare_tokens(path, tmp_path, dtype="int8")
    with pytest.raises(ValueError, match="22 bytes, not a positive multiple of uint32"):
        data.prepare_tokens(path, tmp_path, dtype="uint32", val_fraction=0.5)
    with pytest.raises(ValueError, match="token id 10 .* vocab_size=5"):
        data.prepare_tokens(path, tmp_path, val_fraction=0.5, vocab_size=5)
    with pytest.raises(ValueError, match="kind must be .* got 'csv'"):
        data.prepare_tokens(path, tmp_path, kind="csv")
    with pytest.raises(ValueError, match="val_fraction .* got 1.5"):
        data.prepare_tokens(path, tmp_path, val_fraction=1.5)
    tokens = np.arange(50, dtype=np.uint16)
    with pytest.raises(ValueError, match="seq_len=64 needs at least 65 tokens, but the split has 50"):
        data.BatchSampler(tokens, 2, 64)
    with pytest.raises(ValueError, match="seq_len=64"):
        data.eval_batches(tokens, 2, 64, 1)
    with pytest.raises(ValueError, match="rank must be in \\[0, world_size=2\\), got 2"):
        data.BatchSampler(tokens, 2, 8, rank=2, world_size=2)


def windows_are_real(tokens: np.ndarray, x: torch.Tensor, y: torch.Tensor) -> bool:
    """With tokens = arange, a window starting at s is exactly s, s+1, ..., and y is x shifted by one."""
    starts = x[:, :1]
    expected = starts + torch.arange(x.shape[1])
    return bool(torch.equal(x, expected) and torch.equal(y, expected + 1) and (x[:, -1] + 1 < len(tokens)).all())


def test_ranks_take_disjoint_parts_of_the_single_process_batch():
    tokens = np.arange(10_000, dtype=np.uint32)
    world, per_rank = 3, 4
    single = data.BatchSampler(tokens, per_rank * world, 16, seed=7)
    ranks = [data.BatchSampler(tokens, per_rank, 16, rank=r, world_size=world, seed=7) for r in range(world)]
    for _ in range(4):
        x, y = next(single)
        parts = [next(sampler) for sampler in ranks]
        assert x.dtype == torch.int64 and x.shape == (per_rank * world, 16)
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        assert windows_are_real(tokens, x, y)
    other_seed = next(data.BatchSampler(tokens, 12, 16, seed=8))[0]
    assert not torch.equal(other_seed, x)


def test_sampler_state_round_trip_continues_identically():
    tokens = np.arange(5_000, dtype=np.uint16)
    sampler = data.BatchSampler(tokens, 4, 8, seed=3)
    for _ in range(5):
        next(sampler)
    state = sampler.state_dict()
    expected = [next(sampler) for _ in range(3)]

    resumed = data.BatchSampler(tokens, 4, 8, seed=3)
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip([next(resumed) for _ in range(3)], expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)

    halves = [data.BatchSampler(tokens, 2, 8, rank=r, world_size=2, seed=3) for r in range(2)]
    for half in halves:
        half.load_state_dict(state)
    assert torch.equal(torch.cat([next(h)[0] for h in halves]), expected[0][0])

    with pytest.raises(ValueError, match="seed=3.*seed=4"):
        data.BatchSampler(tokens, 4, 8, seed=4).load_state_dict(state)


def test_eval_batches_are_deterministic_and_rank_sharded():
    tokens = np.arange(3_000, dtype=np.uint16)
    full = data.eval_batches(tokens, 6, 32, 3)
    assert len(full) == 3
    again = data.eval_batches(tokens, 6, 32, 3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, again))
    shards = [data.eval_batches(tokens, 2, 32, 3, rank=r, world_size=3) for r in range(3)]
    for i, (x, y) in enumerate(full):
        assert torch.equal(torch.cat([s[i][0] for s in shards]), x)
        assert windows_are_real(tokens, x, y)
    every = data.eval_batches(tokens, 4, 32, None)
    starts = torch.cat([x[:, 0] for x, _ in every]).numpy()
    assert len(every) == (3_000 - 1) // 32 // 4 and np.all(np.diff(starts) >= 32)  # non-overlapping


def test_unigram_entropy_matches_counter():
    rng = np.random.default_rng(0)
    tokens = rng.choice(256, size=20_000, p=np.linspace(1, 3, 256) / np.linspace(1, 3, 256).sum()).astype(np.uint8)
    counts = Counter(tokens.tolist())
    expected = -sum(c / len(tokens) * math.log2(c / len(tokens)) for c in counts.values())
    assert data.unigram_entropy_bits(tokens, chunk=999) == pytest.approx(expected, rel=1e-12)
    assert data.unigram_entropy_bits(np.zeros(10, dtype=np.uint8)) == 0.0
