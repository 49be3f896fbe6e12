"""``moe-train``'s expected failures: one line naming the bad value, checked at validation where possible."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from train.test_train_cli import tiny_args

from moe.train import validate
from moe.train.config import saved_config


def check(overrides: dict):
    return validate(OmegaConf.create(overrides))


def test_a_missing_data_path_is_refused_at_validation(tmp_path):
    with pytest.raises(ValueError, match=r"data.path='/no/such/corpus' does not exist"):
        check({"data": {"source": "text", "path": "/no/such/corpus"}})
    with pytest.raises(ValueError, match=r"data.val_path='/no/such.bin' does not exist"):
        check({"data": {"source": "bin", "path": str(tmp_path), "val_path": "/no/such.bin", "vocab_size": 50}})


def test_a_data_path_with_a_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "corpus.txt").write_text("some text")
    cfg = check({"data": {"source": "text", "path": "~/corpus.txt"}})
    assert cfg.data.path == str(tmp_path / "corpus.txt")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"load_balancing_coef": -1}, r"router.kwargs.load_balancing_coef must be a finite number >= 0, got -1"),
        ({"score_function": "tanh"}, r"router.kwargs.score_function must be one of"),
    ],
)
def test_router_keyword_values_are_checked_at_validation_naming_the_key_path(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check({"router": {"name": "topk", "kwargs": kwargs}})


def test_a_checkpoint_config_of_before_the_dispatch_rename_loads():
    old = OmegaConf.to_container(OmegaConf.structured(check({})))
    for kernels, dispatch in ((False, "local"), (None, "local"), (True, "triton")):
        saved = {**old, "experts": {"impl": "grouped", "kernels": kernels}}
        assert saved_config(saved).dispatch.name == dispatch
    with pytest.raises(ValueError, match="experts.kernels was renamed"):
        check({"experts": {"kernels": False}})


def moe_train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    command = [sys.executable, "-m", "moe.train", *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=240, cwd=cwd)


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra,message",
    [
        (["data.path={small}"], "moe-train: invalid data: data.path='{small}' gives "),
        (["trainer.resume=/missing.pt"], "moe-train: invalid config: trainer.resume='/missing.pt': no such checkpoint"),
        (["router.kwargs.load_balancing_coef=-1"], "moe-train: invalid config: router.kwargs.load_balancing_coef"),
    ],
)
def test_expected_failures_end_in_one_line(corpus, tmp_path, extra, message):
    """The corpus of 10 bytes is too small for model.seq_len=32 (a fact of the data, known once it is read)."""
    small = tmp_path / "small.txt"
    small.write_text("0123456789")
    extra = [e.format(small=small) for e in extra]
    result = moe_train(tiny_args(corpus, tmp_path / "run", *extra), tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(small=small)), result.stderr
    if "small" in message:
        assert "model.seq_len=32 needs at least 33 tokens in each split" in lines[0]
    assert not (tmp_path / "run").exists()


def test_help_names_the_command(tmp_path):
    result = moe_train(["--help"], tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("moe-train: train a GPT-style")
    assert "powered by Hydra" not in result.stdout


def test_validation_builds_the_router_without_moving_the_callers_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    check({"router": {"name": "topk"}})
    assert torch.equal(torch.rand(3), expected)
