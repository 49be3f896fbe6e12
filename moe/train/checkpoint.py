"""Checkpoints: atomic writes with a SHA-256 sidecar, newest-N rotation, config checks, safetensors export.

A checkpoint ``ckpt-00001000.pt`` (``torch.save`` of a dict) lives next to ``ckpt-00001000.pt.sha256``.
Both are written to temporary files, fsync'ed and renamed into place, the digest first, so a crash leaves
either a complete pair or no checkpoint file at all. Loading verifies the digest and that the file
unpickles; any failure raises ``CorruptCheckpointError`` naming the file. Nothing is silently skipped or
deleted: a corrupt checkpoint is only renamed aside (``*.corrupt``, with a message) when the run resumes from
an older one the user named.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_PATTERN = re.compile(r"^ckpt-(\d{8})\.pt$")
FORMAT_VERSION = 1


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file is missing its digest, fails it, or does not load."""


class CheckpointMismatchError(ValueError):
    """A checkpoint was written for a different model configuration."""


def checkpoint_path(directory: Path, step: int) -> Path:
    """Path of the checkpoint for ``step`` inside ``directory``."""
    return Path(directory) / f"ckpt-{step:08d}.pt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in ``directory``, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsync'ed temporary file and ``os.replace``."""
    path = Path(path)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(f.name, 0o644)
    os.replace(f.name, path)
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_state() -> dict:
    """RNG states of torch (CPU and the current CUDA device), numpy and Python's ``random``.

    Only the current device: every rank is seeded alike and uses its own device, so rank 0's device state
    is every rank's (saving all devices would also create a CUDA context on each of them).
    """
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(directory: Path, step: int, state: dict, keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``step`` atomically, then delete all but the newest ``keep``.

    Cost: one serialisation of the state, one write and one read-back of the file (for the digest).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    if path.exists():
        raise FileExistsError(f"checkpoint {path} already exists; refusing to overwrite a saved checkpoint")
    with tempfile.NamedTemporaryFile(dir=directory, prefix=f".{path.name}.", suffix=".tmp", delete=False) as f:
        torch.save({"format": FORMAT_VERSION, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(f.name, 0o644)
    atomic_write_bytes(path.with_name(path.name + ".sha256"), (_sha256(Path(f.name)) + "\n").encode())
    os.replace(f.name, path)
    _fsync_dir(directory)
    for old in [p for p in list_checkpoints(directory)[:-keep] if p != path]:
        old.unlink()
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)
    return path


def verify_checkpoint(path: Path) -> None:
    """Check ``path`` against its SHA-256 sidecar; raises ``CorruptCheckpointError`` naming the fault."""
    path = Path(path)
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        raise CorruptCheckpointError(f"checkpoint {path} has no digest file {sidecar.name}; refusing to load it")
    expected = sidecar.read_text().strip()
    actual = _sha256(path)
    if actual != expected:
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt: SHA-256 {actual[:16]}... does not match the recorded {expected[:16]}..."
        )


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint after checking its SHA-256 sidecar; raises ``CorruptCheckpointError`` on any fault."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    verify_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # any unpickling failure means the file cannot be trusted
        raise CorruptCheckpointError(f"checkpoint {path} does not load: {error}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CorruptCheckpointError(f"checkpoint {path} is not a moe-train checkpoint of format {FORMAT_VERSION}")
    return state


def _fault(path: Path) -> str | None:
    """Why ``path`` fails verification, None if it verifies; a file gone meanwhile (another rank set it aside)
    counts as a fault."""
    try:
        verify_checkpoint(path)
    except CorruptCheckpointError as error:
        return str(error)
    except FileNotFoundError:
        return f"checkpoint {path} was set aside"
    return None


def set_aside(path: Path) -> Path:
    """Rename a checkpoint that fails verification (and its digest) to ``*.corrupt``, out of resume and rotation,
    never deleting it; returns the new path."""
    path = Path(path)
    for file in (path.with_name(path.name + ".sha256"), path):
        if file.exists():
            os.replace(file, file.with_name(file.name + ".corrupt"))
    return path.with_name(path.name + ".corrupt")


def check_architecture(saved: dict, current: dict, path: Path) -> None:
    """Raise ``CheckpointMismatchError`` listing every key whose value differs between the two configs."""
    keys = sorted(set(saved) | set(current))
    missing = object()
    diffs = [
        f"{k}: checkpoint={saved.get(k, '<absent>')!r}, config={current.get(k, '<absent>')!r}"
        for k in keys
        if saved.get(k, missing) != current.get(k, missing)
    ]
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written for a different model config; mismatched keys:\n  " + "\n  ".join(diffs)
        )


def check_same_optimizer(saved: dict, current: dict, path: Path) -> None:
    """Refuse to resume with different ``optim.*`` values: the restored optimizer would silently keep the saved
    ones (learning rate, betas, weight decay, schedule), so a changed value would not take effect."""
    diffs = [f"optim.{k}: checkpoint {saved.get(k)!r}, config {v!r}" for k, v in current.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint {path} was trained with other optimizer settings; resume with the same values or start a "
            "new run directory:\n  " + "\n  ".join(diffs)
        )


def check_no_later_checkpoints(directory: Path, start_step: int, set_aside_corrupt: bool = True) -> list[str]:
    """Refuse to start at ``start_step`` when ``directory`` holds later checkpoints that verify (of another run or
    a newer point of this one): this run would rotate them away or mix two histories in one directory.

    Later checkpoints that fail verification are renamed to ``*.corrupt`` (by the caller that
    ``set_aside_corrupt``: rank 0) and kept; returns one message per such file.
    """
    later = [p for p in list_checkpoints(directory) if int(CHECKPOINT_PATTERN.match(p.name).group(1)) > start_step]
    faults = {p: _fault(p) for p in later}
    valid = [p.name for p in later if faults[p] is None]
    if valid:
        raise CheckpointMismatchError(
            f"the run directory's checkpoints {Path(directory)} already hold later steps ({', '.join(valid)}) than "
            f"this run starts from (step {start_step}); use trainer.resume=auto to continue the newest, or "
            "run=<new name> to start another run"
        )
    messages = []
    for path, fault in faults.items():
        aside = set_aside(path) if set_aside_corrupt else path.with_name(path.name + ".corrupt")
        messages.append(f"{fault}; kept as {aside.name}")
    return messages


def resolve_resume(resume: str, directory: Path) -> Path | None:
    """The checkpoint to resume from: ``auto`` = newest in ``directory`` (None if none), ``none``, or a path.

    ``auto`` refuses a newest checkpoint that fails verification, naming the newest one that verifies.
    """
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(directory)
        if not found:
            return None
        fault = _fault(found[-1])
        if fault is not None:
            good = next((p for p in reversed(found[:-1]) if _fault(p) is None), None)
            way = (
                f"resume from the newest checkpoint that verifies with trainer.resume={good} (the later, corrupt "
                "ones are then kept as *.corrupt)"
                if good
                else "no checkpoint of this run verifies; start another run with run=<new name>"
            )
            raise CorruptCheckpointError(f"{fault}; {way}")
        return found[-1]
    return check_resume(resume)


def check_resume(resume: str) -> Path | None:
    """The checkpoint file ``trainer.resume`` names (None for ``auto`` and ``none``); raises FileNotFoundError
    naming it when there is no such file."""
    if resume in ("auto", "none"):
        return None
    path = Path(resume).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"trainer.resume={resume!r}: no such checkpoint file (valid: auto, none, or a path)")
    return path


def export_safetensors(model: torch.nn.Module, path: Path, metadata: dict) -> Path:
    """Write the model's parameters and persistent buffers (router state included) as safetensors, atomically.

    Tied tensors are stored once (``safetensors.torch.save_model`` drops the aliases); ``metadata`` is
    stored as JSON strings in the header.
    """
    from safetensors.torch import save_model

    path = Path(path)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as f:
        tmp = Path(f.name)
    save_model(model, str(tmp), metadata={k: json.dumps(v) for k, v in metadata.items()})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path
