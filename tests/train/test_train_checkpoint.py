"""Checkpoint files: atomic pairs with digests, rotation, corruption and config-mismatch detection, safetensors."""

import os

import pytest
import torch
from safetensors.torch import load_file

from moe.train.checkpoint import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    check_architecture,
    export_safetensors,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _state(value: float) -> dict:
    return {"step": int(value), "weights": torch.full((3, 4), value), "rng": rng_state()}


def test_save_then_load_round_trips_and_leaves_no_temporary_files(tmp_path):
    path = save_checkpoint(tmp_path, 7, _state(7.0), keep=3)
    assert path.name == "ckpt-00000007.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000007.pt", "ckpt-00000007.pt.sha256"]
    state = load_checkpoint(path)
    assert state["step"] == 7 and torch.equal(state["weights"], torch.full((3, 4), 7.0))


def test_rotation_keeps_the_newest_n(tmp_path):
    for step in (1, 2, 10, 11, 30):
        save_checkpoint(tmp_path, step, _state(step), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000011.pt", "ckpt-00000030.pt"]
    assert len(list(tmp_path.glob("*.sha256"))) == 2


def test_flipped_byte_is_reported(tmp_path):
    path = save_checkpoint(tmp_path, 3, _state(3.0), keep=3)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="ckpt-00000003.pt is corrupt"):
        load_checkpoint(path)


def test_truncated_file_with_matching_digest_is_reported(tmp_path):
    path = save_checkpoint(tmp_path, 3, _state(3.0), keep=3)
    path.write_bytes(path.read_bytes()[:100])
    import hashlib

    path.with_name(path.name + ".sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest())
    with pytest.raises(CorruptCheckpointError, match="does not load"):
        load_checkpoint(path)


def test_missing_digest_is_reported(tmp_path):
    path = save_checkpoint(tmp_path, 3, _state(3.0), keep=3)
    os.remove(path.with_name(path.name + ".sha256"))
    with pytest.raises(CorruptCheckpointError, match="no digest"):
        load_checkpoint(path)


def test_architecture_mismatch_lists_every_differing_key(tmp_path):
    saved = {"model.hidden_size": 128, "model.num_experts": 4, "router.name": "topk"}
    current = {"model.hidden_size": 64, "model.num_experts": 4, "router.name": "relu", "router.kwargs.x": 1}
    with pytest.raises(CheckpointMismatchError) as error:
        check_architecture(saved, current, tmp_path / "ckpt.pt")
    text = str(error.value)
    assert "model.hidden_size: checkpoint=128, config=64" in text
    assert "router.name: checkpoint='topk', config='relu'" in text
    assert "router.kwargs.x: checkpoint='<absent>', config=1" in text
    assert "model.num_experts" not in text
    check_architecture(saved, dict(saved), tmp_path / "ckpt.pt")


def test_resolve_resume(tmp_path):
    assert resolve_resume("auto", tmp_path / "none-yet") is None
    assert resolve_resume("none", tmp_path) is None
    save_checkpoint(tmp_path, 4, _state(4.0), keep=3)
    newest = save_checkpoint(tmp_path, 9, _state(9.0), keep=3)
    assert resolve_resume("auto", tmp_path) == newest
    assert resolve_resume(str(newest), tmp_path / "elsewhere") == newest
    with pytest.raises(FileNotFoundError, match="auto, none, or a path"):
        resolve_resume(str(tmp_path / "missing.pt"), tmp_path)


def test_rng_state_restores_every_generator():
    import random

    import numpy as np

    state = rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def test_safetensors_export_keeps_tied_weights_and_buffers(tmp_path):
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    model.register_buffer("router_bias", torch.arange(3.0))
    path = export_safetensors(model, tmp_path / "model.safetensors", {"architecture": {"a": 1}})
    tensors = load_file(path)
    assert torch.equal(tensors["router_bias"], torch.arange(3.0))
    stored = [t for name, t in tensors.items() if name != "router_bias"]
    assert len(stored) == 1 and torch.equal(stored[0], model[0].weight.detach())


def test_a_saved_checkpoint_is_never_overwritten(tmp_path):
    path = save_checkpoint(tmp_path, 5, _state(5.0), keep=3)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        save_checkpoint(tmp_path, 5, _state(6.0), keep=3)
    assert torch.equal(load_checkpoint(path)["weights"], torch.full((3, 4), 5.0))
