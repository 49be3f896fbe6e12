"""Interruption, resume and run records in-process: Ctrl-C, corrupt checkpoints, max_steps, time, the summary."""

import io
import os
import signal
import sys
from types import SimpleNamespace

import pytest
import torch
from train.test_train_loop import tiny

import moe.train.trainer as trainer_module
from moe.train import train
from moe.train.checkpoint import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    list_checkpoints,
    load_checkpoint,
)
from moe.train.logging import read_metrics


def corrupt(path):
    data = bytearray(path.read_bytes())
    data[-200] ^= 0x01
    path.write_bytes(bytes(data))


def interrupt_at(monkeypatch, step: int, during_save: bool = False):
    """Send this process SIGINT during optimizer step ``step`` (1-based), and again inside the checkpoint save."""
    accumulate, save = trainer_module._accumulate_gradients, trainer_module.save_checkpoint

    def accumulate_then_interrupt(run, batches, layers):
        if run.step + 1 == step:
            os.kill(os.getpid(), signal.SIGINT)
        return accumulate(run, batches, layers)

    def save_interrupted(directory, at, state, keep):
        os.kill(os.getpid(), signal.SIGINT)
        return save(directory, at, state, keep)

    monkeypatch.setattr(trainer_module, "_accumulate_gradients", accumulate_then_interrupt)
    if during_save:
        monkeypatch.setattr(trainer_module, "save_checkpoint", save_interrupted)


def test_ctrl_c_saves_a_checkpoint_even_when_pressed_again_during_the_save(corpus, tmp_path, monkeypatch):
    interrupt_at(monkeypatch, step=3, during_save=True)
    run = tmp_path / "run"
    summary = train(tiny(corpus, tmp_path, trainer={"max_steps": 50, "ckpt_interval": 0}), run)
    assert summary["stopped_by"] == "SIGINT" and summary["steps"] == 3
    (checkpoint,) = list_checkpoints(run / "checkpoints")
    assert load_checkpoint(checkpoint)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.undo()
    assert train(tiny(corpus, tmp_path, trainer={"max_steps": 5}), run)["steps"] == 5


def test_corrupt_newest_checkpoint_names_the_newest_good_one_and_resuming_from_it_sets_the_corrupt_aside(
    corpus, tmp_path
):
    run = tmp_path / "run"
    train(tiny(corpus, tmp_path, trainer={"max_steps": 4, "ckpt_interval": 2}), run)
    older, newest = list_checkpoints(run / "checkpoints")
    corrupt(newest)
    with pytest.raises(CorruptCheckpointError, match=f"trainer.resume={older}"):
        train(tiny(corpus, tmp_path, trainer={"max_steps": 6}), run)
    summary = train(tiny(corpus, tmp_path, trainer={"max_steps": 6, "resume": str(older)}), run)
    assert summary["steps"] == 6
    aside = newest.with_name(newest.name + ".corrupt")
    assert aside.is_file() and aside.with_name(newest.name + ".sha256.corrupt").is_file()
    with pytest.raises(CorruptCheckpointError):
        load_checkpoint(aside)
    assert [p.name for p in list_checkpoints(run / "checkpoints")][-1] == "ckpt-00000006.pt"


def test_max_steps_below_the_checkpoint_step_is_refused_naming_both(corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny(corpus, tmp_path, trainer={"max_steps": 4}), run)
    with pytest.raises(CheckpointMismatchError, match=r"trainer.max_steps=2 is below step 4 of the checkpoint"):
        train(tiny(corpus, tmp_path, trainer={"max_steps": 2}), run)


def test_throughput_counts_the_training_time_of_every_invocation(corpus, tmp_path, monkeypatch):
    """A fake clock: each optimizer step takes exactly 1 s, so tokens/s is tokens per step, across resumes."""
    clock = iter(range(10**6))
    monkeypatch.setattr(trainer_module, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    run = tmp_path / "run"
    cfg = tiny(corpus, tmp_path, trainer={"max_steps": 3})
    tokens_per_step = cfg.data.batch_size * cfg.model.seq_len
    first = train(cfg, run)
    assert first["train_time_s"] == 3.0 and first["tokens_per_s"] == tokens_per_step
    resumed = train(tiny(corpus, tmp_path, trainer={"max_steps": 5}), run)
    assert resumed["train_time_s"] == 5.0 and resumed["tokens_per_s"] == tokens_per_step
    again = train(tiny(corpus, tmp_path, trainer={"max_steps": 5}), run)
    assert again["train_time_s"] == 5.0 and again["tokens_per_s"] == tokens_per_step
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    assert torch.isfinite(torch.tensor(again["final_val_loss"]))


def test_the_summary_is_printed_after_the_last_progress_bar(corpus, tmp_path, monkeypatch):
    """On a terminal (progress=bar) the bar is closed before the summary, so the summary is the last thing shown."""
    screen = io.StringIO()
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    train(tiny(corpus, tmp_path, logger={"progress": "bar"}, trainer={"max_steps": 3}), tmp_path / "run")
    shown = screen.getvalue()
    assert "3/3" in shown
    assert shown.rindex("3/3") < shown.index("==== moe-train summary ====")


def test_run_names_come_from_the_name_or_the_overrides_and_fit_a_file_name():
    import hashlib

    from moe.train.run_dir import MAX_NAME, run_name

    assert run_name(None, "") == "default"
    assert run_name("exp1", "router=relu") == "exp1"
    assert run_name(None, "data.path=/tmp/a.txt,router=relu") == "data.path=_tmp_a.txt,router=relu"
    long = "model.hidden_size=64," * 20
    name = run_name(None, long)
    assert len(name) == MAX_NAME and name.startswith(long[:100])
    assert name.endswith(hashlib.sha256(long.encode()).hexdigest()[:12])
    assert run_name(None, long + "x") != name


def test_train_restores_the_thread_count(corpus, tmp_path):
    before = torch.get_num_threads()
    threads = 2 if before == 1 else 1
    train(tiny(corpus, tmp_path, trainer={"max_steps": 1, "threads": threads}), tmp_path / "run")
    assert torch.get_num_threads() == before
