"""moe-compress end to end: train a tiny model, compress its checkpoint, compare against random pruning, resume."""

import hashlib
import json
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
