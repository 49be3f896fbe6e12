"""Where a ``moe-train`` run lives, and its record of how it was started.

A run's directory is named after its command (configs/config.yaml): ``run=<name>`` if given, else Hydra's
``override_dirname`` of the overrides that change what is trained (``trainer.max_steps``, ``trainer.resume``,
logging and the like are left out), else ``default``. So the same command, or the same command with a
longer ``trainer.max_steps``, finds its checkpoints and continues.

Hydra's own ``.hydra/*.yaml`` (written before the task runs) is switched off; ``write_run_record`` writes
it once the start is accepted, so a refused start leaves the directory as it was.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from omegaconf import OmegaConf

MAX_NAME = 160  # well below the usual 255-byte file-name limit, leaving room for Hydra's ".hydra" and ours


def run_name(name: str | None, override_dirname: str) -> str:
    """The directory name of a run: ``name``, else the overrides (``/`` made ``_``), else ``default``.

    Names too long for a file name keep their start and gain a digest of the whole.
    """
    chosen = name or override_dirname or "default"
    chosen = chosen.replace(os.sep, "_")
    if len(chosen) > MAX_NAME:
        digest = hashlib.sha256(chosen.encode()).hexdigest()[:12]
        chosen = f"{chosen[: MAX_NAME - 13]}-{digest}"
    return chosen


def register_resolver() -> None:
    """``${moe_run_name:<run>,<override_dirname>}`` for configs/config.yaml's hydra section."""
    if not OmegaConf.has_resolver("moe_run_name"):
        OmegaConf.register_new_resolver("moe_run_name", run_name)


def write_run_record(run_dir: Path, config, hydra_config) -> None:
    """Write ``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` (what Hydra would have written)."""
    from moe.train.checkpoint import atomic_write_bytes

    record = Path(run_dir) / ".hydra"
    record.mkdir(parents=True, exist_ok=True)
    files = {
        "config.yaml": config,
        "hydra.yaml": {"hydra": hydra_config},
        "overrides.yaml": hydra_config.overrides.task,
    }
    for name, content in files.items():
        atomic_write_bytes(record / name, OmegaConf.to_yaml(content).encode())


def remove_if_empty(run_dir: Path, created_after: float) -> None:
    """Remove ``run_dir`` if it is an empty directory last changed after ``created_after`` (a time.time()), then
    its parents below the working directory alike (``outputs/``): what Hydra created for a refused start.

    A parent outside the working directory is never removed: its time changes with its children's, so it
    could be an older, empty folder of the user's.
    """
    path, cwd = Path(run_dir).resolve(), Path.cwd().resolve()
    while path.is_dir() and path.stat().st_mtime >= created_after and not any(path.iterdir()):
        try:
            path.rmdir()
        except OSError:  # another rank of the same launch removed it, or wrote into it, meanwhile
            return
        path = path.parent
        if cwd not in path.parents:
            return
