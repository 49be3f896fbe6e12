"""moe-compress end to end: train a tiny model, compress its checkpoint, compare against random pruning, resume."""

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

pytest.importorskip("hydra", reason="moe-train needs hydra-core (pip install -e .[train])")
pytest.importorskip("scipy", reason="moe.compress merging needs scipy")

from omegaconf import OmegaConf

from moe.compress.cli import CompressConfig, compress_checkpoint
from moe.train import train, validate


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-layer, 8-expert top-2 model trained 200 steps on the ``email`` package's sources (bytes).

    The corpus is copied (``.py`` files only) so it does not change while the repository does.
    """
    root = tmp_path_factory.mktemp("compress_e2e")
    corpus = root / "corpus"
    corpus.mkdir()
    package = Path(sysconfig.get_paths()["stdlib"]) / "email"
    for path in sorted(package.rglob("*.py")):
        shutil.copy(path, corpus / str(path.relative_to(package)).replace("/", "_"))
    cfg = validate(
        OmegaConf.create(
            {
                "model": {
                    "seq_len": 32,
                    "num_layers": 2,
                    "hidden_size": 32,
                    "num_heads": 2,
                    "ffn_hidden_size": 64,
                    "num_experts": 8,
                    "top_k": 2,
                },
                "data": {
                    "source": "text",
                    "path": str(corpus),
                    "cache_dir": str(root / "cache"),
                    "batch_size": 16,
                    "eval_batches": 4,
                    "val_fraction": 0.2,
                },
                "optim": {"lr": 1e-2, "warmup_steps": 20},
                "trainer": {
                    "max_steps": 200,
                    "eval_interval": 0,
                    "ckpt_interval": 0,
                    "log_interval": 100,
                    "device": "cpu",
                    "export_safetensors": False,
                },
                "logger": {"progress": "lines"},
            }
        )
    )
    torch.manual_seed(0)
    summary = train(cfg, root / "train")
    return root, Path(summary["last_checkpoint"])


def _compress(root, source, name, **overrides):
    ccfg = CompressConfig(source=str(source), calibration_batches=4, device="cpu", **overrides)
    return compress_checkpoint(ccfg, root / name)


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.slow
def test_methods_beat_the_median_random_pruning(trained):
    root, source = trained
    source_digest = _digest(source)
    random_losses = [
        _compress(root, source, f"random{s}", method="random", num_experts=6, seed=s)["after"]["val_loss"]
        for s in range(3)
    ]
    baseline = statistics.median(random_losses)
    results = {
        "frequency": _compress(root, source, "frequency", method="frequency", num_experts=6),
        "reconstruction": _compress(root, source, "reconstruction", method="reconstruction", num_experts=6),
        "hc_smoe": _compress(root, source, "hc_smoe", action="merge", method="hc_smoe", num_experts=6),
    }
    for name, summary in results.items():
        assert summary["num_experts_after"] == 6
        assert summary["after"]["val_loss"] <= baseline, (name, summary["after"]["val_loss"], random_losses)
    assert _digest(source) == source_digest
    pruned = results["frequency"]
    per_expert = pruned["before"]["expert_params"] // (2 * 8)
    assert pruned["before"]["params"] - pruned["after"]["params"] == 2 * 2 * (per_expert + 32)
    assert set(json.loads((root / "frequency" / "summary.json").read_text())) >= {"before", "after", "timings_s"}


@pytest.mark.slow
def test_compressed_checkpoint_resumes_in_moe_train(trained):
    root, source = trained
    summary = _compress(root, source, "merged_resume", action="merge", method="msmoe", fraction=0.75)
    config = OmegaConf.load(root / "merged_resume" / "config.yaml")
    config.pop("defaults")
    cfg = validate(config)
    assert cfg.router.name == "merged" and cfg.model.num_experts == 6
    evaluated = train(cfg, root / "merged_eval")
    assert evaluated["final_val_loss"] == pytest.approx(summary["after"]["val_loss"], rel=1e-6)
    with pytest.raises(ValueError, match="below model.top_k=2"):
        _compress(root, source, "dense", action="merge", method="average", num_experts=1)
    with pytest.raises(FileExistsError, match="never overwrites"):
        _compress(root, source, "merged_resume", action="merge", method="msmoe", fraction=0.75)


@pytest.mark.slow
def test_hydra_entry_point_writes_summary(trained):
    root, source = trained
    out = root / "hydra_run"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from moe.compress.cli import main; main()",
            f"source={source}",
            "method=score",
            "num_experts=4",
            "calibration_batches=2",
            "device=cpu",
            f"hydra.run.dir={out}",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_experts_after"] == 4 and "val loss" in result.stdout


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="exactly one of num_experts and fraction"):
        CompressConfig(source="x", num_experts=4, fraction=0.5)
    with pytest.raises(ValueError, match="valid for action='merge'"):
        CompressConfig(source="x", action="merge", method="frequency", num_experts=4)
    with pytest.raises(ValueError, match="action="):
        CompressConfig(source="x", action="distill", num_experts=4)
    with pytest.raises(ValueError, match="budget='fleet'"):
        CompressConfig(source="x", action="merge", method="msmoe", num_experts=4, budget="fleet")
    assert CompressConfig(source="x", action="prune", method="reap", num_experts=4).method == "reap"


def _moe_compress(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "from moe.compress.cli import main; main()", *args]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        ((), "moe-compress: invalid config: source is required: "),
        (("source=/no/such/run", "num_experts=2"), "moe-compress: source='/no/such/run' is neither"),
        (("source=x", "num_experts=2", "fraction=0.5"), "moe-compress: invalid config: give exactly one of"),
    ],
)
def test_expected_failures_end_in_one_line(tmp_path, args, message):
    result = _moe_compress(*args, cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert not (tmp_path / "outputs").exists()


def test_help_names_the_command(tmp_path):
    result = _moe_compress("--help", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("moe-compress")
    assert "cli is powered by Hydra" not in result.stdout


@pytest.mark.slow
def test_too_many_experts_names_the_valid_range(trained):
    root, source = trained
    expected = r"num_experts=9 is not valid for .*: above the 8 experts it has; choose num_experts in \[2, 8\]"
    with pytest.raises(ValueError, match=expected):
        _compress(root, source, "too_many", num_experts=9)


@pytest.mark.slow
def test_a_checkpoint_of_before_the_dispatch_rename_compresses(trained, tmp_path):
    from moe.train.checkpoint import load_checkpoint, save_checkpoint

    root, source = trained
    state = load_checkpoint(source)
    state["config"]["experts"] = {"impl": "grouped", "kernels": False}
    state.pop("format")
    old = save_checkpoint(tmp_path / "old", state["step"], state, keep=1)
    summary = _compress(root, old, "from_old", method="frequency", num_experts=4)
    assert summary["num_experts_after"] == 4
