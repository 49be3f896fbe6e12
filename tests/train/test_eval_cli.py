"""``moe-eval``: the validation loss of a run or checkpoint, on its own data or another source, writing nothing."""

import math

import pytest
import torch
from train.test_train_loop import tiny

from moe.data import eval_batches, prepare_tokens
from moe.eval_cli import main
from moe.train import train
from moe.train.checkpoint import list_checkpoints, load_checkpoint
from moe.train.config import saved_config
from moe.train.trainer import build_model


def snapshot(directory):
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    summary = train(tiny(corpus, root, trainer={"max_steps": 3}), root / "run")
    return root, summary


def reference_loss(checkpoint, tokens, batch_size, seq_len, batches) -> float:
    """Mean cross-entropy of the checkpoint's model over the fixed validation batches, written out by hand."""
    state = load_checkpoint(checkpoint)
    model = build_model(saved_config(state["config"]), state["architecture"]["data.vocab_size"])
    model.load_state_dict(state["model"])
    model.eval()
    losses = []
    with torch.no_grad():
        for x, y in eval_batches(tokens, batch_size, seq_len, batches):
            logits, _ = model(x)
            losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item())
    return sum(losses) / len(losses)


def test_the_run_loss_on_its_own_data_is_the_final_validation_loss(run, capsys):
    root, summary = run
    before = snapshot(root / "run")
    main([f"source={root / 'run'}", "device=cpu"])
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1
    assert f"val loss {summary['final_val_loss']:.4f} nats/token" in line
    assert f"{summary['final_val_loss'] / math.log(2):.3f} bits/byte" in line
    assert snapshot(root / "run") == before


def test_another_data_source_and_batch_count(run, tmp_path, capsys):
    root, _ = run
    other = tmp_path / "other.txt"
    other.write_bytes(bytes(range(32, 127)) * 40)
    checkpoint = list_checkpoints(root / "run" / "checkpoints")[-1]
    args = ["data=text", f"data.path={other}", f"data.cache_dir={tmp_path}", "data.batch_size=4", "eval_batches=3"]
    main([f"source={checkpoint}", *args])
    line = capsys.readouterr().out.strip()
    val = prepare_tokens(str(other), tmp_path).val
    expected = reference_loss(checkpoint, val, 4, 32, 3)
    loss = float(line.split("val loss ")[1].split()[0])
    assert loss == pytest.approx(expected, abs=1e-4)
    assert "(3 batches of 4 x 32 tokens)" in line


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "moe-eval: invalid config: source is required"),
        (["source=/no/such/run"], "moe-eval: source='/no/such/run' is neither"),
        (["source={run}", "eval_batches=0"], "moe-eval: invalid config: eval_batches=0"),
        (["source={run}", "data.path=/no/such.txt"], "moe-eval: invalid config: data.path='/no/such.txt' does not"),
        (["source={run}", "steps=3"], "moe-eval: invalid config: "),
    ],
)
def test_expected_failures_end_in_one_line(run, args, message):
    root, _ = run
    with pytest.raises(SystemExit) as error:
        main([a.format(run=root / "run") for a in args])
    assert str(error.value.code).startswith(message) and "\n" not in str(error.value.code)
