"""moe-report: sweep directories become a sorted markdown table and a loss-curve PNG."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from moe.report import main, report

from train_runs import TINY_MODEL


def fake_run(run_dir: Path, overrides: list[str], val_loss: float, stopped_by=None) -> None:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    records = [
        {
            "kind": "train",
            "step": 10,
            "loss": val_loss + 1,
            "lr": 1e-3,
            "aux_loss": 0.01,
            "tokens_per_s": 100.0,
            "expert_load": {},
            "load_imbalance": 1.5,
        },
        {"kind": "eval", "step": 10, "val_loss": val_loss},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {
        "steps": 10,
        "final_val_loss": val_loss,
        "val_bits_per_byte": val_loss / 0.6931471805599453,
        "val_unigram_entropy_bits": 5.0,
        "tokens_per_s": 1234.5,
        "num_params": 2_000_000,
        "num_active_params": 1_000_000,
        "final_load_imbalance": 1.25,
        "stopped_by": stopped_by,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_table_is_sorted_by_validation_loss_and_files_are_written(tmp_path, capsys):
    fake_run(tmp_path / "0", ["router=topk", "hydra.run.dir=x", "trainer.max_steps=10"], 2.0)
    fake_run(tmp_path / "1", ["router=relu", "trainer.max_steps=10"], 1.5, stopped_by="SIGTERM")
    fake_run(tmp_path / "2", ["model=dense", "trainer.max_steps=10"], 1.8)
    main([str(tmp_path)])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| router=relu", "| model=dense", "| router=topk"]
    relu = rows[0].split(" | ")
    assert relu[1] == "2.00M (1.00M)" and relu[2] == "10 (unfinished)" and relu[3] == "1.5000"
    assert relu[4] == f"{1.5 / 0.6931471805599453:.3f}" and relu[5] == f"{1.5 / 0.6931471805599453 / 5:.3f}"
    assert relu[6] == "1,234" and relu[7] == "1.25 |"
    assert "Common overrides: `trainer.max_steps=10`" in out
    assert (tmp_path / "report.md").read_text().count("| router=") == 2
    assert (tmp_path / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_empty_or_missing_sweep_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no run directories"):
        report(tmp_path)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing")])


@pytest.mark.slow
def test_local_multirun_sweep_then_report(tmp_path):
    corpus = tmp_path / "corpus.txt"
    folder = Path(sysconfig.get_paths()["stdlib"]) / "json"
    corpus.write_bytes(b"".join(p.read_bytes() for p in sorted(folder.glob("*.py"))))
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "router=topk,expert_choice",
        "data=text",
        f"data.path={corpus}",
        f"data.cache_dir={tmp_path / 'c'}",
        *TINY_MODEL,
        "trainer.max_steps=3",
        "trainer.threads=1",
        "trainer.export_safetensors=false",
        "logger.progress=lines",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "moe.train", *args], check=False, capture_output=True, text=True, env=env, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = report(sweep)
    assert "| router=topk |" in table and "| router=expert_choice |" in table
    assert (sweep / "loss_curves.png").is_file()
