"""moe-prepare: each input kind round-trips through the tokenizer, meta.json counts what was written, the
split follows its rule, and bad input gets one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe.prepare import PrepareConfig, PrepareError, prepare

EOT = "<|endoftext|>"
DOCUMENTS = [
    "def add(a, b):\n    return a + b\n",
    "Grüße aus Köln — 日本語のテキスト, and emoji 🙂.\n",
    "The end-of-text marker spelt in text, <|endoftext|>, stays text.\n",
    "\n\n  indented after blank lines\n\ttab\r\nwindows line\n",
    "x" * 3000 + "\n",
    "short",
    "numbers 1234567890 and punctuation !?;:\n",
    "last document without a newline",
]


def splitmix_key(index: int) -> float:
    """The row key of the split rule, in plain integers (an independent reference for moe.prepare.split)."""
    mask = (1 << 64) - 1
    z = (index + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return (z >> 11) / 2**53


def run(input_path, out, **options) -> dict:
    return prepare(PrepareConfig(input=str(input_path), out=str(out), **{"workers": 1, **options}))


def decoded_documents(out: Path) -> dict[str, list[str]]:
    """Each split's documents: the .bin decoded with the written tokenizer, cut at the end-of-text id."""
    from tokenizers import Tokenizer

    meta = json.loads((out / "meta.json").read_text())
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    eot = meta["special_tokens"]["eot"]["id"]
    documents = {}
    for name in ("train", "val"):
        ids = np.fromfile(out / f"{name}.bin", dtype=meta["dtype"]).astype(np.int64)
        assert ids[-1] == eot
        cuts = np.flatnonzero(ids == eot)
        starts = np.concatenate([[0], cuts[:-1] + 1])
        documents[name] = [tokenizer.decode(ids[s:e].tolist(), skip_special_tokens=False) for s, e in zip(starts, cuts)]
    return documents


def check_counts(out: Path, documents: dict[str, list[str]]) -> dict:
    meta = json.loads((out / "meta.json").read_text())
    itemsize = np.dtype(meta["dtype"]).itemsize
    for name, docs in documents.items():
        split = meta["splits"][name]
        assert split["tokens"] * itemsize == (out / f"{name}.bin").stat().st_size
        assert split["bytes"] == sum(len(d.encode()) for d in docs)
        assert split["documents"] == len(docs)
        assert split["bytes_per_token"] == pytest.approx(split["bytes"] / split["tokens"])
    return meta


def expected_row_split(texts: list[str], val_fraction: float) -> dict[str, list[str]]:
    val = [i for i in range(len(texts)) if splitmix_key(i) < val_fraction]
    assert 0 < len(val) < len(texts), "choose a val_fraction that needs no fallback"
    return {
        "train": [t for i, t in enumerate(texts) if i not in val and t],
        "val": [t for i, t in enumerate(texts) if i in val and t],
    }


def test_text_file_round_trips_with_a_position_split(tmp_path):
    corpus = tmp_path / "corpus.txt"
    text = "".join(DOCUMENTS)
    corpus.write_text(text, encoding="utf-8")
    meta = run(corpus, tmp_path / "out", vocab_size=300, val_fraction=0.1)
    raw = text.encode()
    cut = len(raw) - -(-len(raw) // 10)
    while raw[cut] & 0xC0 == 0x80:
        cut -= 1
    assert decoded_documents(tmp_path / "out") == {"train": [raw[:cut].decode()], "val": [raw[cut:].decode()]}
    check_counts(tmp_path / "out", {"train": [raw[:cut].decode()], "val": [raw[cut:].decode()]})
    assert meta["dtype"] == "uint16" and meta["vocab_size"] <= 300
    assert meta["tokenizer"]["origin"] == "trained" and meta["special_tokens"]["eot"]["token"] == EOT
    import hashlib

    assert meta["source"]["sha256"] == hashlib.sha256(raw).hexdigest()
    assert f"cut at byte {cut}" in meta["split"]["rule"]


def test_folder_of_text_files_splits_by_file_and_round_trips(tmp_path):
    from moe.data import split_files

    folder = tmp_path / "docs"
    names = [f"part{i}/doc{i}.txt" for i in range(len(DOCUMENTS))]
    for name, doc in zip(names, DOCUMENTS):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(doc, encoding="utf-8", newline="")
    (folder / ".hidden.txt").write_text("never read")
    meta = run(folder, tmp_path / "out", vocab_size=400, val_fraction=0.3, workers=2)
    train, val = split_files(sorted(names), 0.3)
    by_name = dict(zip(names, DOCUMENTS))
    expected = {"train": [by_name[n] for n in train], "val": [by_name[n] for n in val]}
    assert decoded_documents(tmp_path / "out") == expected
    check_counts(tmp_path / "out", expected)
    assert meta["source"]["files"] == len(DOCUMENTS)


def test_workers_give_the_same_files_as_one_process(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(40):
        (folder / f"{i:02d}.txt").write_text(DOCUMENTS[i % len(DOCUMENTS)] * (i + 1))
    run(folder, tmp_path / "one", vocab_size=350)
    prepare(PrepareConfig(input=str(folder), out=str(tmp_path / "three"), vocab_size=350, workers=3))
    for name in ("train.bin", "val.bin", "tokenizer.json", "meta.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes(), name


def write_jsonl(path: Path, texts: list[str]) -> None:
    lines = [json.dumps({"id": i, "body": t}) for i, t in enumerate(texts)]
    lines.insert(3, "")  # a blank line is no record, but keeps its place in the numbering
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_jsonl_splits_by_record_and_round_trips(tmp_path):
    texts = DOCUMENTS * 3 + [""]
    write_jsonl(tmp_path / "data.jsonl", texts)
    rows = texts[:3] + [""] + texts[3:]
    meta = run(tmp_path / "data.jsonl", tmp_path / "out", text_field="body", vocab_size=320, val_fraction=0.25)
    expected = expected_row_split(rows, 0.25)
    assert decoded_documents(tmp_path / "out") == expected
    check_counts(tmp_path / "out", expected)
    assert meta["source"]["format"] == "jsonl" and meta["source"]["text_field"] == "body"


def test_saved_dataset_and_local_parquet_read_through_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    texts = DOCUMENTS * 3
    table = datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))})
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "pq").mkdir()
    table.to_parquet(str(tmp_path / "pq" / "data.parquet"))
    expected = expected_row_split(texts, 0.25)
    for source, fmt in ((tmp_path / "saved", "hf_disk"), (tmp_path / "pq", "parquet")):
        out = tmp_path / f"out-{fmt}"
        meta = run(source, out, format="auto" if fmt == "hf_disk" else fmt, vocab_size=320, val_fraction=0.25)
        assert meta["source"]["format"] == fmt
        assert decoded_documents(out) == expected
        check_counts(out, expected)


def test_large_loaded_vocabulary_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({f"filler{i}": len(alphabet) + i for i in range(70_000)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["</doc>"])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    write_jsonl(tmp_path / "data.jsonl", DOCUMENTS * 3)
    meta = run(
        tmp_path / "data.jsonl", tmp_path / "out", tokenizer=str(tmp_path), text_field="body", eot_token="</doc>"
    )
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == len(vocab) + 1
    assert meta["special_tokens"]["eot"]["id"] == len(vocab) > 65535
    assert meta["tokenizer"]["origin"] == "loaded"
    rows = DOCUMENTS[:3] + [""] + DOCUMENTS[3:] + DOCUMENTS * 2
    assert decoded_documents(tmp_path / "out") == expected_row_split(rows, 0.05)


def test_no_overwrite_without_the_flag_and_replacement_with_it(tmp_path):
    (tmp_path / "a.txt").write_text("first corpus\n" * 50)
    run(tmp_path / "a.txt", tmp_path / "out", vocab_size=280)
    before = (tmp_path / "out" / "train.bin").read_bytes()
    with pytest.raises(PrepareError, match="already exists; pass overwrite=true"):
        run(tmp_path / "a.txt", tmp_path / "out", vocab_size=280)
    assert (tmp_path / "out" / "train.bin").read_bytes() == before
    (tmp_path / "a.txt").write_text("a different corpus\n" * 50)
    run(tmp_path / "a.txt", tmp_path / "out", vocab_size=280, overwrite=True)
    assert decoded_documents(tmp_path / "out")["train"][0].startswith("a different corpus")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "out"]


def test_a_failure_midway_leaves_no_output_folder(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("good text\n" * 100)
    (folder / "b.txt").write_bytes(b"bad \xff\xfe bytes")
    with pytest.raises(PrepareError, match=r"b\.txt' is not UTF-8 text"):
        run(folder, tmp_path / "out", vocab_size=280)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]


def moe_prepare(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    command = [sys.executable, "-m", "moe.prepare", "workers=1", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)


def cli_error(monkeypatch, *args: str) -> str:
    """The message moe-prepare exits with (as the process would print it, with status 1), run in-process."""
    from moe.prepare import main

    monkeypatch.setattr(sys, "argv", ["moe-prepare", "workers=1", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert isinstance(exit_info.value.code, str), "a str code makes Python print it and exit with status 1"
    return exit_info.value.code


def test_cli_bad_inputs_get_one_line_and_write_nothing(tmp_path, monkeypatch):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(b"\x00\xff\xfe\x80" * 10)
    (tmp_path / "ok.txt").write_text("some text\n" * 20)
    (tmp_path / "existing").mkdir()
    (tmp_path / "empty-folder").mkdir()
    out = "out=" + str(tmp_path / "out")
    cases = [
        (["input=" + str(tmp_path / "missing.txt"), out], ["missing.txt", "does not exist"]),
        (["input=" + str(tmp_path / "empty.txt"), out], ["empty.txt", "empty corpus"]),
        (["input=" + str(tmp_path / "empty-folder"), out], ["empty-folder", "empty corpus"]),
        (["input=" + str(tmp_path / "binary.txt"), out], ["binary.txt", "not UTF-8 text"]),
        (["input=" + str(tmp_path / "ok.txt"), out, "vocab_size=100"], ["vocab_size=100", "[257,"]),
        (["input=" + str(tmp_path / "ok.txt"), "out=" + str(tmp_path / "existing")], ["existing", "overwrite=true"]),
        (["input=" + str(tmp_path / "ok.txt"), out, "format=xml"], ["format='xml'", "'jsonl'"]),
        ([out], ["input is required"]),
    ]
    for args, fragments in cases:
        message = cli_error(monkeypatch, *args)
        assert message.startswith("moe-prepare: ") and "\n" not in message, message
        for fragment in fragments:
            assert fragment in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "binary.txt",
        "empty-folder",
        "empty.txt",
        "existing",
        "ok.txt",
    ]


@pytest.mark.slow
def test_cli_exits_with_status_1_and_one_line_without_traceback(tmp_path):
    result = moe_prepare(f"input={tmp_path / 'missing.txt'}", f"out={tmp_path / 'out'}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"moe-prepare: input={str(tmp_path / 'missing.txt')!r} does not exist "
        "(expected a text file, a folder, or a dataset)"
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_cli_unreadable_file(tmp_path, monkeypatch):
    (tmp_path / "secret.txt").write_text("text\n")
    (tmp_path / "secret.txt").chmod(0)
    message = cli_error(monkeypatch, f"input={tmp_path / 'secret.txt'}", f"out={tmp_path / 'out'}")
    assert message == f"moe-prepare: cannot read input file {str(tmp_path / 'secret.txt')!r}: Permission denied"


def test_cli_writes_the_folder_and_prints_the_counts(tmp_path, monkeypatch, capsys):
    from moe.prepare import main

    (tmp_path / "ok.txt").write_text("some text to tokenise\n" * 40)
    args = [f"input={tmp_path / 'ok.txt'}", f"out={tmp_path / 'out'}", "vocab_size=260", "workers=1"]
    monkeypatch.setattr(sys, "argv", ["moe-prepare", *args])
    main()
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    stdout = capsys.readouterr().out
    assert f"vocab {meta['vocab_size']:,} (uint16)" in stdout
    assert f"train {meta['splits']['train']['tokens']:,} tokens" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.txt", "out"]


def test_tokenizer_trains_on_the_first_characters_when_limited(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.txt").write_text(("abab " if i < 3 else "xyxy ") * 200)
    meta = run(folder, tmp_path / "out", vocab_size=300, tokenizer_train_chars=500, val_fraction=0.2)
    assert meta["tokenizer"]["trained_on"] == "the training split, its first 500 characters"
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json")).get_vocab()
    assert "ab" in vocab and "xy" not in vocab


def test_row_split_matches_the_reference_key_and_keeps_both_splits_non_empty():
    from moe.prepare.split import KEY_BLOCK, RowSplit

    split = RowSplit(KEY_BLOCK + 50, 0.1)
    for index in [0, 1, 2, 17, KEY_BLOCK - 1, KEY_BLOCK, KEY_BLOCK + 49, 5]:
        assert split.is_val(index) == (splitmix_key(index) < 0.1), index
    for rows, fraction in [(3, 1e-9), (2, 0.5), (5, 0.5), (4, 0.3), (30, 0.2)]:
        keys = [splitmix_key(i) for i in range(rows)]
        val = [k < fraction for k in keys]
        if not any(val):
            val[keys.index(min(keys))] = True
        if all(val):
            val[keys.index(max(keys))] = False
        assert [RowSplit(rows, fraction).is_val(i) for i in range(rows)] == val, (rows, fraction)
    with pytest.raises(PrepareError, match="at least 2 documents, the input has 1"):
        RowSplit(1, 0.1)


def test_ctrl_c_midway_leaves_neither_the_output_nor_its_staging_folder(tmp_path, monkeypatch):
    from moe.prepare import encode

    (tmp_path / "a.txt").write_text("text to tokenise\n" * 200)

    def interrupted(self, encoded, on_progress):
        next(iter(encoded))
        (self.paths[0]).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(encode.SplitFiles, "write_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "a.txt", tmp_path / "out", vocab_size=280)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
