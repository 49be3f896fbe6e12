"""moe-generate on a trained run (checkpoint, safetensors, run directory) and moe-train's closing sample."""

import sysconfig
from pathlib import Path

import pytest
import torch

pytest.importorskip("hydra", reason="moe-train needs hydra-core (pip install -e .[train])")

from omegaconf import OmegaConf  # noqa: E402 (after the importorskip call)

from moe.generate import generate  # noqa: E402 (after the importorskip call)
from moe.generate_cli import main, parse_args, run_generate  # noqa: E402 (after the importorskip call)
from moe.train import train, validate  # noqa: E402 (after the importorskip call)
from moe.train.config import to_dict  # noqa: E402 (after the importorskip call)
from moe.train.loading import load_run  # noqa: E402 (after the importorskip call)


def tiny_config(root: Path, router: str = "topk"):
    corpus = root / "corpus.txt"
    corpus.write_bytes((Path(sysconfig.get_paths()["stdlib"]) / "json" / "encoder.py").read_bytes())
    return validate(
        OmegaConf.create(
            {
                "model": {"seq_len": 48, "num_layers": 2, "hidden_size": 32, "num_heads": 2, "ffn_hidden_size": 32},
                "router": {"name": router},
                "data": {"source": "text", "path": str(corpus), "cache_dir": str(root / "cache"), "batch_size": 4},
                "optim": {"warmup_steps": 1},
                "trainer": {"max_steps": 3, "eval_interval": 0, "device": "cpu", "threads": 1},
                "logger": {"progress": "lines"},
            }
        )
    )


def train_run(root: Path, router: str = "topk") -> Path:
    """Train in-process and write the ``.hydra/config.yaml`` that the moe-train CLI would."""
    cfg = tiny_config(root, router)
    run_dir = root / "run"
    train(cfg, run_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(to_dict(cfg)), run_dir / ".hydra" / "config.yaml")
    return run_dir


@pytest.fixture(scope="module")
def run_and_output(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    return train_run(root)


def test_training_ends_with_a_greedy_sample_of_the_trained_model(tmp_path, capsys):
    run_dir = train_run(tmp_path)
    printed = capsys.readouterr().out
    model = load_run(run_dir).model
    expected = generate(model, list(b"The"), 45, temperature=0)
    line = f"sample         greedy, 45 tokens: {'The' + bytes(expected).decode('utf-8', errors='replace')!r}"
    assert printed.rstrip().endswith(line)


def test_training_with_expert_choice_skips_the_sample_and_says_why(tmp_path, capsys):
    train_run(tmp_path, router="expert_choice")
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last.startswith("sample         skipped: layer 'blocks.0.ffn' (ExpertChoiceRouter): expert choice is not")


def test_every_source_form_gives_the_same_greedy_text(run_and_output):
    run_dir = run_and_output
    (checkpoint,) = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))
    model = load_run(checkpoint).model
    expected = bytes(generate(model, list(b"def "), 20, temperature=0)).decode("utf-8", errors="replace")
    for source in (run_dir, checkpoint, run_dir / "model.safetensors"):
        (text,) = run_generate(parse_args([f"source={source}", "prompts=def ", "max_new_tokens=20", "temperature=0"]))
        assert text == expected, source


def test_cli_prints_each_prompt_with_a_seeded_sample(run_and_output, capsys):
    args = [f"source={run_and_output}", "prompts=[ab,cd]", "max_new_tokens=10", "top_k=5", "top_p=0.9", "seed=3"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first
    lines = first.splitlines()
    assert lines[0] == "==== sample 1/2 ====" and lines[1].startswith("ab")
    assert "==== sample 2/2 ====" in lines and any(line.startswith("cd") for line in lines)
    generator = torch.Generator().manual_seed(3)
    model = load_run(run_and_output).model
    expected = generate(model, list(b"ab"), 10, top_k=5, top_p=0.9, temperature=0.8, generator=generator)
    assert first.startswith("==== sample 1/2 ====\nab" + bytes(expected).decode("utf-8", errors="replace"))


@pytest.mark.parametrize(
    "args,message",
    [
        (["prompts=x"], "missing mandatory value: source"),
        (["source=x", "tempreature=0"], "Key 'tempreature' not in 'GenerateConfig'"),
        (["source=x", "top_p=0"], "top_p=0.0 is not valid; it must be in (0, 1]"),
        (["source=x", "device=tpu"], "device='tpu' is not valid; valid: ['auto', 'cpu', 'cuda']"),
        (["source"], "arguments must be key=value, got ['source']"),
    ],
)
def test_bad_arguments_exit_with_one_line_naming_them(args, message):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert str(info.value).startswith("moe-generate: ") and message in str(info.value)


def test_too_long_a_request_is_refused_with_the_limit(run_and_output):
    with pytest.raises(SystemExit, match="prompt of 3 tokens plus max_new_tokens=46 exceeds the model's seq_len=48"):
        main([f"source={run_and_output}", "prompts=abc", "max_new_tokens=46"])
