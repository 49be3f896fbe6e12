"""The documented chain a new user runs, each step as its own command: prepare a folder of text with a trained
BPE tokenizer, train on it, sample, export, load in transformers and generate the same greedy text, inspect."""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytest.importorskip("tokenizers", reason="moe-prepare trains a tokenizer with Hugging Face tokenizers")
pytest.importorskip("hydra", reason="the commands are Hydra apps (pip install -e .[train])")
transformers = pytest.importorskip("transformers", reason="the export is loaded with transformers")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
PROMPT = "def "


def command(module: str, *args: str, cwd: Path) -> str:
    """Run ``module``'s console entry point as the installed command would; return its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", f"from {module} import main; main()", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{module} {args} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.slow
def test_prepare_train_generate_export_transformers_inspect(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("encoder.py", "decoder.py", "scanner.py", "__init__.py", "tool.py"):
        shutil.copy(STDLIB / "json" / name, corpus / name)

    data = tmp_path / "data"
    command("moe.prepare", f"input={corpus}", f"out={data}", "vocab_size=320", "workers=1", cwd=tmp_path)
    assert {"train.bin", "val.bin", "tokenizer.json", "meta.json"} <= {p.name for p in data.iterdir()}

    run_dir = tmp_path / "run"
    tiny = [
        "model.seq_len=48",
        "model.num_layers=2",
        "model.hidden_size=32",
        "model.num_heads=2",
        "model.ffn_hidden_size=32",
        "data.batch_size=4",
        "data.eval_batches=2",
        "trainer.max_steps=30",
        "trainer.eval_interval=0",
        "trainer.device=cpu",
        "trainer.threads=1",
        "logger.progress=lines",
    ]
    summary = command(
        "moe.train", "data=prepared", f"data.path={data}", *tiny, f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert "bits/byte" in summary

    sample = command(
        "moe.generate_cli",
        f"source={run_dir}",
        f"prompt={PROMPT}",
        "max_new_tokens=12",
        "temperature=0",
        "device=cpu",
        cwd=tmp_path,
    )
    ours = sample.rstrip("\n")
    assert ours.startswith(PROMPT) and len(ours) > len(PROMPT)

    folder = tmp_path / "hf"
    command("moe.export_cli", f"source={run_dir}", f"output={folder}", cwd=tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    new = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :].tolist()
    assert PROMPT + tokenizer.decode(new) == ours

    command("moe.inspect", f"run={run_dir}", "batches=2", cwd=tmp_path)
    report = (run_dir / "inspect" / "report.md").read_text()
    assert "expert" in report.lower()
    assert list((run_dir / "inspect").glob("*.png"))
