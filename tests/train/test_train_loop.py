"""The training loop in-process: overfitting, exact resume, metrics/summary contents and the fault paths."""

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import moe
from moe.train import NonFiniteLossError, train, validate
from moe.train.checkpoint import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    list_checkpoints,
    load_checkpoint,
)
from moe.train.logging import read_metrics
from moe.train.trainer import build_model, build_optimizer


def tiny(corpus: Path, tmp_path: Path, **sections):
    """A 2-layer, 32-wide MoE config on the corpus: a few milliseconds per step."""
    base = {
        "data": {
            "source": "text",
            "path": str(corpus),
            "batch_size": 4,
            "eval_batches": 2,
            "cache_dir": str(tmp_path / "cache"),
        },
        "model": {"seq_len": 32, "num_layers": 2, "hidden_size": 32, "num_heads": 2, "ffn_hidden_size": 32},
        "trainer": {
            "max_steps": 4,
            "log_interval": 1,
            "eval_interval": 0,
            "ckpt_interval": 2,
            "threads": 1,
            "export_safetensors": False,
            "device": "cpu",  # chosen, not inherited from device=auto: the hand-written references run on the CPU
        },
        "optim": {"warmup_steps": 2},
        "logger": {"progress": "lines"},
    }
    return validate(OmegaConf.merge(base, sections))


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


def test_overfits_one_batch(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path, optim={"lr": 5e-3, "weight_decay": 0.0})
    torch.manual_seed(0)
    model = build_model(cfg, 256)
    optimizer = build_optimizer(model, cfg)
    data = torch.frombuffer(bytearray(corpus.read_bytes()[: 2 * 33]), dtype=torch.uint8).long().view(2, 33)
    x, y = data[:, :-1], data[:, 1:]
    losses = []
    for _ in range(80):
        _, loss = model(x, y)
        (loss + moe.aux_loss(model)).backward()
        optimizer.step()
        optimizer.zero_grad()
        moe.update_routers(model)
        losses.append(loss.item())
    assert losses[0] > math.log(256) - 0.5
    assert max(losses[-5:]) < 0.1, losses[-10:]


@pytest.mark.slow
def test_resume_is_exact(corpus, tmp_path):
    """10 steps + resume + 10 steps gives bit-identical losses to 20 uninterrupted steps (with router state:
    jitter uses the RNG, aux-loss-free bias is a buffer)."""

    def config(max_steps):
        return tiny(
            corpus,
            tmp_path,
            router={"kwargs": {"bias_update_rate": 1e-3, "jitter_eps": 0.01}},
            trainer={"max_steps": max_steps, "ckpt_interval": 10, "eval_interval": 10},
            optim={"decay_steps": 20},
        )

    whole, split = tmp_path / "whole", tmp_path / "split"
    train(config(20), whole)
    train(config(10), split)
    summary = train(config(20), split)
    assert summary["steps"] == 20
    assert len(train_losses(whole)) == 20
    assert train_losses(split) == train_losses(whole)
    a, b = (
        load_checkpoint(list_checkpoints(whole / "checkpoints")[-1]),
        load_checkpoint(list_checkpoints(split / "checkpoints")[-1]),
    )
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert any(key.endswith("expert_bias") and value.abs().sum() > 0 for key, value in a["model"].items())


def test_records_and_summary(corpus, tmp_path):
    cfg = tiny(
        corpus, tmp_path, trainer={"max_steps": 4, "eval_interval": 2, "log_interval": 2, "export_safetensors": True}
    )
    summary = train(cfg, tmp_path / "run")
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    trains = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in trains] == [2, 4] and [r["step"] for r in evals] == [2, 4]
    for r in trains:
        assert {"loss", "lr", "aux_loss", "tokens_per_s", "expert_load", "load_imbalance"} <= set(r)
        assert set(r["expert_load"]) == {"blocks.0.ffn", "blocks.1.ffn"}
        for shares in r["expert_load"].values():
            assert len(shares) == 4 and sum(shares) == pytest.approx(1.0, abs=1e-3)
        assert r["load_imbalance"] >= 1.0
    assert evals[-1]["val_loss"] == summary["final_val_loss"]
    assert summary["val_bits_per_byte"] == pytest.approx(summary["final_val_loss"] / math.log(2))
    val = (tmp_path / "cache").glob("text-*/val.u8")
    data = torch.frombuffer(bytearray(next(val).read_bytes()), dtype=torch.uint8).long()
    p = torch.bincount(data, minlength=256).double() / len(data)
    entropy = float(-(p[p > 0] * p[p > 0].log2()).sum())
    assert summary["val_unigram_entropy_bits"] == pytest.approx(entropy, rel=1e-9)
    assert summary["steps"] == 4 and summary["tokens_seen"] == 4 * 4 * 32
    assert Path(summary["last_checkpoint"]).name == "ckpt-00000004.pt"
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["final_val_loss"] == summary["final_val_loss"]
    assert (tmp_path / "run" / "expert_load.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_dense_model_trains_without_expert_load(corpus, tmp_path):
    summary = train(tiny(corpus, tmp_path, model={"moe_every": 0}), tmp_path / "run")
    assert summary["final_load_imbalance"] is None and summary["expert_load_png"] is None
    assert math.isfinite(summary["final_val_loss"])


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    cfg = tiny(
        corpus,
        tmp_path,
        optim={"lr": 1e30, "warmup_steps": 0, "grad_clip": 0.0},
        trainer={"max_steps": 50, "ckpt_interval": 1},
    )
    with pytest.raises(NonFiniteLossError, match=r"at step (\d+)") as error:
        train(cfg, tmp_path / "run")
    bad_step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
    checkpoints = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert checkpoints, "the steps before the failure were checkpointed"
    newest = load_checkpoint(checkpoints[-1])
    assert newest["step"] == bad_step - 1
    assert str(checkpoints[-1]) in str(error.value)
    assert all(torch.isfinite(t).all() for t in newest["model"].values() if t.is_floating_point())


def test_checkpoint_of_another_model_is_refused_listing_keys(corpus, tmp_path):
    train(tiny(corpus, tmp_path, trainer={"max_steps": 2}), tmp_path / "run")
    other = tiny(corpus, tmp_path, model={"hidden_size": 64, "num_experts": 2, "top_k": 1}, trainer={"max_steps": 4})
    with pytest.raises(CheckpointMismatchError) as error:
        train(other, tmp_path / "run")
    text = str(error.value)
    for key in (
        "model.hidden_size: checkpoint=32, config=64",
        "model.num_experts: checkpoint=4, config=2",
        "model.top_k: checkpoint=2, config=1",
    ):
        assert key in text
    assert "model.num_layers" not in text


def test_corrupt_checkpoint_is_reported_not_skipped(corpus, tmp_path):
    train(tiny(corpus, tmp_path, trainer={"max_steps": 4, "ckpt_interval": 2}), tmp_path / "run")
    newest = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    data = bytearray(newest.read_bytes())
    data[-200] ^= 0x01
    newest.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=newest.name):
        train(tiny(corpus, tmp_path, trainer={"max_steps": 6}), tmp_path / "run")


@pytest.mark.slow
def test_wandb_logger_runs_offline_by_default(corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    train(tiny(corpus, tmp_path, logger={"name": "wandb"}, trainer={"max_steps": 2}), tmp_path / "run")
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert list(offline.glob("*.wandb")), "the offline run holds its logged records"
    assert "WANDB_MODE" not in os.environ


def test_gradient_accumulation_matches_a_hand_written_step(corpus, tmp_path):
    """trainer.grad_accum=2: one optimizer step on the mean of two micro-batches' (task + aux) losses."""
    from moe.data import BatchSampler, prepare_tokens

    cfg = tiny(
        corpus,
        tmp_path,
        trainer={"max_steps": 1, "grad_accum": 2, "ckpt_interval": 1},
        optim={"warmup_steps": 0, "grad_clip": 0.0, "eps": 1.0},  # large eps: the update scales with the grad
        router={"kwargs": {"bias_update_rate": 1e-2}},
    )
    train(cfg, tmp_path / "run")
    trained = load_checkpoint(list_checkpoints(tmp_path / "run" / "checkpoints")[-1])["model"]

    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg, 256)
    optimizer = build_optimizer(model, cfg)
    sampler = BatchSampler(prepare_tokens(str(corpus), tmp_path / "cache").train, 4, 32, seed=cfg.trainer.seed)
    for _ in range(2):
        x, y = next(sampler)
        _, loss = model(x, y)
        ((loss + moe.aux_loss(model)) / 2).backward()
    optimizer.step()
    moe.update_routers(model)
    reference = model.state_dict()
    assert set(reference) == set(trained)
    for key, value in reference.items():
        torch.testing.assert_close(trained[key], value, rtol=1e-6, atol=1e-7, msg=key)
    assert any(key.endswith("expert_bias") and value.abs().sum() > 0 for key, value in reference.items())


def test_extending_max_steps_extends_the_schedule(corpus, tmp_path):
    """With decay_steps following max_steps, 4 steps + resume to 8 gives the 8-step run's learning rates."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(tiny(corpus, tmp_path, trainer={"max_steps": 8}), whole)
    train(tiny(corpus, tmp_path, trainer={"max_steps": 4}), split)
    train(tiny(corpus, tmp_path, trainer={"max_steps": 8}), split)
    lrs = [
        [r["lr"] for r in read_metrics(d / "metrics.jsonl") if r["kind"] == "train" and r["step"] > 4]
        for d in (whole, split)
    ]
    assert lrs[1] == pytest.approx(lrs[0], rel=1e-12)


def test_resume_with_other_optimizer_settings_is_refused(corpus, tmp_path):
    train(tiny(corpus, tmp_path, trainer={"max_steps": 2}), tmp_path / "run")
    with pytest.raises(CheckpointMismatchError, match=r"optim.lr: checkpoint 0.003, config 0.01"):
        train(tiny(corpus, tmp_path, trainer={"max_steps": 4}, optim={"lr": 0.01}), tmp_path / "run")


def test_a_run_never_rotates_away_later_checkpoints_of_its_directory(corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny(corpus, tmp_path, trainer={"max_steps": 4}), run)
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    for resume in ("none", str(run / "checkpoints" / "ckpt-00000002.pt")):
        with pytest.raises(CheckpointMismatchError, match="already hold later steps"):
            train(tiny(corpus, tmp_path, trainer={"max_steps": 4, "resume": resume}), run)
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == saved


@pytest.mark.parametrize(
    "choice,local,gpus,expected",
    [
        ("auto", 1, 0, False),
        ("auto", 1, 1, True),
        ("auto", 2, 1, False),
        ("auto", 2, 2, True),
        ("cpu", 1, 4, False),
        ("cuda", 2, 2, True),
    ],
)
def test_device_auto_takes_cuda_only_when_every_local_process_gets_a_gpu(choice, local, gpus, expected):
    from moe.train.distributed import use_cuda_for

    assert use_cuda_for(choice, local, gpus) is expected


def test_device_cuda_with_too_few_gpus_names_both_counts():
    from moe.train.distributed import DeviceChoiceError, use_cuda_for

    with pytest.raises(DeviceChoiceError, match=r"2 local processes but 1 GPU\(s\)"):
        use_cuda_for("cuda", 2, 1)
    with pytest.raises(DeviceChoiceError, match="no CUDA device is available"):
        use_cuda_for("cuda", 1, 0)


@pytest.mark.gpu
def test_gpu_training_runs_resumes_and_matches_a_continuous_run(corpus, tmp_path):
    """The trainer's CUDA path (bf16 autocast): finite falling loss, and an interrupted run resumes exactly."""
    optim = {"lr": 1e-3, "decay_steps": 6}  # one schedule for both runs
    sections = {"trainer": {"device": "cuda", "max_steps": 6, "ckpt_interval": 3}, "optim": optim}
    full = train(tiny(corpus, tmp_path, **sections), tmp_path / "full")
    first = tiny(corpus, tmp_path, trainer={"device": "cuda", "max_steps": 3, "ckpt_interval": 3}, optim=optim)
    train(first, tmp_path / "split")
    resumed = train(tiny(corpus, tmp_path, **sections), tmp_path / "split")
    assert math.isfinite(full["final_val_loss"])
    assert resumed["steps"] == 6
    # index_add's float atomics on CUDA make runs differ in the last bits: close, not bitwise.
    torch.testing.assert_close(resumed["final_val_loss"], full["final_val_loss"], rtol=1e-3, atol=0)


def test_init_from_a_dense_run_upcycles_it_and_trains(corpus, tmp_path):
    from moe.upcycle import init_model_from

    dense_cfg = tiny(corpus, tmp_path, model={"moe_every": 0, "ffn_hidden_size": 32})
    train(dense_cfg, tmp_path / "dense")
    state = load_checkpoint(list_checkpoints(tmp_path / "dense" / "checkpoints")[-1])
    vocab = state["architecture"]["data.vocab_size"]
    dense = build_model(dense_cfg, vocab)
    dense.load_state_dict(state["model"])
    moe_cfg = tiny(
        corpus, tmp_path, model={"moe_every": 1, "num_experts": 4}, trainer={"init_from": str(tmp_path / "dense")}
    )
    upcycled = init_model_from(build_model(moe_cfg, vocab), tmp_path / "dense")
    idx = torch.randint(0, vocab, (2, 16))
    torch.testing.assert_close(upcycled.eval()(idx)[0], dense.eval()(idx)[0], rtol=1e-5, atol=1e-5)
    summary = train(moe_cfg, tmp_path / "upcycled")
    assert summary["steps"] == 4 and math.isfinite(summary["final_val_loss"])
    assert summary["experts_per_token"] == 2.0 and summary["num_active_params"] == upcycled.num_active_params()
    with pytest.raises(ValueError, match="dense run"):
        init_model_from(build_model(moe_cfg, vocab), tmp_path / "upcycled")
    with pytest.raises(ValueError, match="init_drop_fraction"):
        tiny(corpus, tmp_path, trainer={"init_drop_fraction": 2.0})


def test_null_experts_report_their_measured_experts_per_token(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path, router={"name": "null_experts", "kwargs": {"num_null_experts": 2}}, model={"top_k": 2})
    summary = train(cfg, tmp_path / "run")
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert all(0 < r["experts_per_token"] <= 2 for r in records)
    measured = records[-1]["experts_per_token"]
    assert summary["experts_per_token"] == measured
    model = build_model(cfg, 256)
    assert summary["num_active_params"] == model.num_active_params(measured) < model.num_active_params()
    assert summary["flops_per_token"] == model.flops_per_token(measured)
