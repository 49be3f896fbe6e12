"""moe-generate on a trained run (checkpoint, safetensors, run directory) and moe-train's closing sample."""

import pytest
import torch

pytest.importorskip("hydra", reason="moe-train needs hydra-core (pip install -e .[train])")

from tiny_runs import train_run  # noqa: E402 (after the importorskip call)

from moe.generate import generate  # noqa: E402 (after the importorskip call)
from moe.generate_cli import main, parse_args, run_generate  # noqa: E402 (after the importorskip call)
from moe.train.loading import ByteCodec, load_run  # noqa: E402 (after the importorskip call)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
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


def test_every_source_form_gives_the_same_greedy_text(trained_run):
    run_dir = trained_run
    (checkpoint,) = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))
    model = load_run(checkpoint).model
    expected = bytes(generate(model, list(b"def "), 20, temperature=0)).decode("utf-8", errors="replace")
    for source in (run_dir, checkpoint, run_dir / "model.safetensors"):
        args = [f"source={source}", "prompt=def ", "max_new_tokens=20", "temperature=0", "device=cpu"]
        (text,) = run_generate(parse_args(args))
        assert text == expected, source


def test_cli_prints_each_prompt_with_a_seeded_sample(trained_run, capsys):
    # device=cpu: the expected draw below runs on the CPU (a GPU's float maths may pick other tokens)
    args = [
        f"source={trained_run}",
        "prompts=[ab,cd]",
        "max_new_tokens=10",
        "top_k=5",
        "top_p=0.9",
        "seed=3",
        "device=cpu",
    ]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first
    lines = first.splitlines()
    assert lines[0] == "==== sample 1/2 ====" and lines[1].startswith("ab")
    assert "==== sample 2/2 ====" in lines and any(line.startswith("cd") for line in lines)
    generator = torch.Generator().manual_seed(3)
    model = load_run(trained_run).model
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


def test_byte_runs_decode_invalid_utf8_as_replacement_characters():
    codec = ByteCodec()
    assert codec.encode("é") == [0xC3, 0xA9]
    assert codec.decode([0x41, 0xC3, 0xFF, 0x42]) == "A\ufffd\ufffdB"


def test_too_long_a_request_is_refused_with_the_limit(trained_run):
    with pytest.raises(SystemExit, match="prompt of 3 tokens plus max_new_tokens=46 exceeds the model's seq_len=48"):
        main([f"source={trained_run}", "prompts=abc", "max_new_tokens=46"])


def test_prompt_arguments_keep_their_trailing_spaces():
    gcfg = parse_args(["source=run", "prompt=def ", "prompt= x  "])
    assert gcfg.prompts == ["def ", " x  "]
    assert parse_args(["source=run", "prompts=def "]).prompts == ["def"]  # a parsed value, as documented
    with pytest.raises(ValueError, match="not both"):
        parse_args(["source=run", "prompt=a", "prompts=[b]"])
