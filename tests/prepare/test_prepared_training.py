"""moe-train data=prepared: the vocabulary comes from meta.json and bits/byte from its bytes per token."""

import json
import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from moe.data import prepare_tokens
from moe.prepare import PrepareConfig, prepare
from moe.train.checkpoint import list_checkpoints, load_checkpoint

from train_runs import TINY_MODEL, run_moe_train


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A moe-prepare folder of this Python's json package sources (a 300-token BPE)."""
    folder = Path(sysconfig.get_paths()["stdlib"]) / "json"
    out = tmp_path_factory.mktemp("prepared") / "json"
    prepare(PrepareConfig(input=str(folder), out=str(out), suffixes=[".py"], vocab_size=300, workers=1))
    return out


def test_prepare_tokens_opens_the_folder_with_its_meta(prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    splits = prepare_tokens(prepared, kind="prepared")
    assert splits.vocab_size == meta["vocab_size"] and not splits.is_bytes
    assert splits.train.dtype == np.uint16 and len(splits.val) == meta["splits"]["val"]["tokens"]
    assert splits.bytes_per_token == meta["splits"]["val"]["bytes"] / meta["splits"]["val"]["tokens"]
    assert splits.tokenizer_path == prepared / "tokenizer.json"
    assert prepare_tokens(prepared, kind="prepared", vocab_size=320).vocab_size == 320
    with pytest.raises(ValueError, match="vocab_size=100 is smaller than the prepared vocabulary"):
        prepare_tokens(prepared, kind="prepared", vocab_size=100)


def test_a_truncated_bin_is_refused(prepared, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("meta.json", "tokenizer.json", "train.bin"):
        (copy / name).write_bytes((prepared / name).read_bytes())
    (copy / "val.bin").write_bytes((prepared / "val.bin").read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"val\.bin has \d+ bytes, meta.json says \d+ uint16 tokens"):
        prepare_tokens(copy, kind="prepared")


@pytest.mark.slow
def test_training_on_a_prepared_folder_reports_bits_per_byte(prepared, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        "data=prepared",
        f"data.path={prepared}",
        *TINY_MODEL,
        "optim.warmup_steps=2",
        "trainer.max_steps=4",
        "trainer.log_interval=2",
        "trainer.eval_interval=0",
        "trainer.threads=1",
        "logger.progress=lines",
    ]
    records = run_moe_train(run_dir, 1, overrides)
    assert [r["step"] for r in records] == [2, 4]
    meta = json.loads((prepared / "meta.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    val = meta["splits"]["val"]
    expected = summary["final_val_loss"] / math.log(2) * val["tokens"] / val["bytes"]
    assert summary["val_bits_per_byte"] == pytest.approx(expected, rel=1e-12)
    assert summary["val_unigram_entropy_bits"] is not None and summary["tokenizer"] == str(prepared / "tokenizer.json")
    (checkpoint,) = list_checkpoints(run_dir / "checkpoints")
    assert load_checkpoint(checkpoint)["architecture"]["data.vocab_size"] == meta["vocab_size"]


def test_data_source_prepared_needs_a_path():
    from omegaconf import OmegaConf

    from moe.train.config import TrainConfig, validate

    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"data": {"source": "prepared"}})
    with pytest.raises(ValueError, match="data.path is required when data.source='prepared'"):
        validate(cfg)


def test_inspect_spells_prepared_tokens_with_the_run_tokenizer(prepared):
    from tokenizers import Tokenizer

    from moe.inspect.run import token_speller

    spell = token_speller(prepare_tokens(prepared, kind="prepared"))
    tokenizer = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    merged = max(tokenizer.get_vocab().values())
    assert spell(merged) == tokenizer.decode([merged]).replace(" ", "·").replace("\n", "\\n")
    assert spell(0) == "<|endoftext|>"
    # Byte 0xC3 alone is half a UTF-8 character: its vocabulary entry is shown instead of U+FFFD.
    half = tokenizer.token_to_id("Ã")
    assert spell(half) == "Ã"
