"""moe-inspect on a tiny trained run: the statistics match a plain recount of the routing, and the figures
and the report are written and linked."""

import json
import math
import shutil
import sys
import sysconfig
from collections import Counter
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch

from moe.data import eval_batches
from moe.inspect import InspectConfig, collect_routing, inspect_run
from moe.inspect.run import byte_spelling, load_run
from moe.layer import moe_layers

from train_runs import TINY_MODEL, run_moe_train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 4-step byte-level run: 2 MoE layers of 4 experts, top-2."""
    folder = Path(sysconfig.get_paths()["stdlib"]) / "json"
    root = tmp_path_factory.mktemp("inspect")
    corpus = root / "json.txt"
    corpus.write_bytes(b"".join(p.read_bytes() for p in sorted(folder.glob("*.py"))))
    overrides = [
        "data=text",
        f"data.path={corpus}",
        f"data.cache_dir={root / 'cache'}",
        *TINY_MODEL,
        "optim.warmup_steps=2",
        "trainer.max_steps=4",
        "trainer.log_interval=1",
        "trainer.eval_interval=0",
        "trainer.threads=1",
        "logger.progress=lines",
    ]
    run_moe_train(root / "run", 1, overrides)
    return root / "run"


def reference_stats(run: Path, batches: int, batch_size: int) -> dict:
    """The statistics recounted with plain loops from each layer's last routing."""
    loaded = load_run(run, torch.device("cpu"))
    layers = moe_layers(loaded.model)
    result = {name: {"entropy": [], "pairs": Counter(), "both": Counter(), "load": Counter()} for name, _ in layers}
    with torch.no_grad():
        for x, _ in eval_batches(loaded.splits.val, batch_size, loaded.cfg.model.seq_len, batches):
            loaded.model(x)
            ids = x.reshape(-1).tolist()
            for name, layer in layers:
                routing, ref = layer.last_routing, result[name]
                for row in routing.logits.double():
                    p = np.exp(row.numpy() - row.numpy().max())
                    p /= p.sum()
                    ref["entropy"].append(-sum(v * math.log2(v) for v in p if v > 0))
                chosen: dict[int, set] = {}
                for t, e in zip(routing.token_index.tolist(), routing.expert_index.tolist()):
                    ref["pairs"][(e, ids[t])] += 1
                    ref["load"][e] += 1
                    chosen.setdefault(t, set()).add(e)
                for experts in chosen.values():
                    for i, j in combinations(sorted(experts), 2):
                        ref["both"][(i, j)] += 1
    return result


def test_routing_statistics_match_a_plain_recount(run_dir):
    loaded = load_run(run_dir, torch.device("cpu"))
    stats = collect_routing(loaded, batches=2, batch_size=3)
    reference = reference_stats(run_dir, 2, 3)
    assert set(stats) == set(reference) == {"blocks.0.ffn", "blocks.1.ffn"}
    for name, s in stats.items():
        ref = reference[name]
        assert s.tokens == len(ref["entropy"]) == 2 * 3 * 32
        assert s.mean_token_entropy == pytest.approx(np.mean(ref["entropy"]), rel=1e-9)
        total = sum(ref["load"].values())
        load = np.array([ref["load"][e] / total for e in range(4)])
        assert s.load.numpy() == pytest.approx(load)
        assert s.load_entropy == pytest.approx(-sum(v * math.log2(v) for v in load if v > 0))
        for i in range(4):
            for j in range(4):
                expected = ref["load"][i] if i == j else ref["both"][(min(i, j), max(i, j))]
                assert int(s.coselection[i, j]) == expected
        for e, row in enumerate(s.top_tokens(5)):
            counts = sorted(((-n, t) for (ex, t), n in ref["pairs"].items() if ex == e))[:5]
            assert [(t, n) for t, n, _ in row] == [(t, -n) for n, t in counts]


def test_inspect_writes_figures_and_a_report_linking_them(run_dir, tmp_path):
    report = inspect_run(InspectConfig(run=str(run_dir), batches=2, out=str(tmp_path / "inspect")))
    text = report.read_text()
    numbers = json.loads((tmp_path / "inspect" / "routing.json").read_text())
    expected = {
        "routing_entropy.png",
        "expert_load_over_training.png",
        *(f"{kind}_blocks.{i}.ffn.png" for kind in ("top_tokens", "coselection") for i in (0, 1)),
    }
    assert {p.name for p in (tmp_path / "inspect").glob("*.png")} == expected
    for name in expected:
        assert (tmp_path / "inspect" / name).read_bytes()[:4] == b"\x89PNG"
        assert f"]({name})" in text
    assert numbers["step"] == 4 and numbers["tokens"] == 2 * 4 * 32
    for layer in numbers["layers"].values():
        assert sum(layer["load"]) == pytest.approx(1.0)
        assert layer["max_entropy_bits"] == pytest.approx(2.0)
        first = layer["top_tokens"][0][0]
        assert first["token"] == byte_spelling(first["id"]) and f"`{first['token']}` {first['count']}" in text


def test_a_run_with_only_safetensors_gives_the_same_statistics(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoints", "inspect"))
    from_checkpoint = collect_routing(load_run(run_dir, torch.device("cpu")), 1, 2)
    from_safetensors = collect_routing(load_run(copy, torch.device("cpu")), 1, 2)
    for name, s in from_checkpoint.items():
        assert torch.equal(s.coselection, from_safetensors[name].coselection)
        assert s.mean_token_entropy == pytest.approx(from_safetensors[name].mean_token_entropy, rel=1e-12)


def test_moe_report_links_the_inspect_report(run_dir, tmp_path):
    from moe.report import report

    sweep = tmp_path / "sweep"
    shutil.copytree(run_dir, sweep / "0", ignore=shutil.ignore_patterns("checkpoints"))
    inspect_run(InspectConfig(run=str(sweep / "0"), batches=1))
    report(sweep)
    text = (sweep / "report.md").read_text()
    assert "## Inside the runs (moe-inspect)" in text
    assert "[report](0/inspect/report.md)" in text and "[routing_entropy](0/inspect/routing_entropy.png)" in text


def test_byte_tokens_are_spelt_visibly():
    assert [byte_spelling(b) for b in b"a \n\t\x00"] == ["a", "·", "\\n", "\\t", "\\x00"]
    assert byte_spelling(0xFF) == "\\xff"


def test_cli_errors_are_one_line(tmp_path, monkeypatch):
    from moe.inspect import main

    (tmp_path / "empty-run").mkdir()
    cases = [
        ([f"run={tmp_path / 'missing'}"], "is not a directory"),
        ([f"run={tmp_path / 'empty-run'}"], "has neither checkpoints/ckpt-*.pt nor model.safetensors"),
        ([f"run={tmp_path}", "batches=0"], "batches=0 is not valid"),
        ([], "run is required"),
    ]
    for args, fragment in cases:
        monkeypatch.setattr(sys, "argv", ["moe-inspect", *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
        message = exit_info.value.code
        assert message.startswith("moe-inspect: ") and "\n" not in message and fragment in message, message
