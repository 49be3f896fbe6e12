"""moe.bench.figures' bookkeeping on the CPU: the trainer's rate from its log, and stage selection."""

import json
from pathlib import Path

import pytest

from moe.bench.figures import main, stages, trainer_rate


def test_trainer_rate_is_the_median_interval_after_the_first(tmp_path):
    records = [{"kind": "train", "tokens_per_s": 10.0, "mfu": 0.01}]  # the interval that compiled
    records += [{"kind": "train", "tokens_per_s": v, "mfu": v / 1000} for v in (80.0, 83.0, 82.0)]
    records += [{"kind": "eval", "val_loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert trainer_rate(tmp_path) == {"intervals": 3, "tokens_per_s": 82.0, "mfu": 0.082}
    assert trainer_rate(tmp_path / "missing") is None


def test_every_stage_writes_into_the_output_folder_and_unknown_stages_are_refused(tmp_path):
    plan = stages(tmp_path, 80)
    assert len({name for name, _, _ in plan}) == len(plan)
    for name, command, seconds in plan:
        outs = [c.split("=")[-1] for c in command if str(tmp_path) in c]
        assert name == "profile" or outs, name  # the profile prints its table into its log
        assert all(Path(o).parent == tmp_path for o in outs) and seconds > 0
    with pytest.raises(SystemExit, match=r"unknown stage 'layers'; valid: \['profile', 'layer'"):
        main(["--out", str(tmp_path / "new"), "--only", "layers"])
    assert not (tmp_path / "new").exists()  # a refused start leaves nothing behind
