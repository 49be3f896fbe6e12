"""``moe-train``: the Hydra app that trains a GPT-style MoE model (see docs/training.md).

The YAML config tree is the repository's ``configs/`` directory, passed to Hydra as an absolute path
computed from this file; the package is meant to be installed editable (``pip install -e .``), which is
what ``make setup`` does. Extra config directories can be added with Hydra's ``--config-dir``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from moe.train.checkpoint import CheckpointMismatchError, CorruptCheckpointError
from moe.train.config import TrainConfig, register_configs, validate
from moe.train.distributed import DeviceChoiceError
from moe.train.run_dir import register_resolver, remove_if_empty, write_run_record
from moe.train.trainer import NonFiniteLossError, train

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


INTERRUPTED_STATUS = 130  # 128 + SIGINT, the shell's status for a Ctrl-C


def _run(cfg) -> None:
    """Validate, then train; expected failures (bad config, non-finite loss, unusable checkpoint) exit with
    status 1 and their message alone, without a traceback. A Ctrl-C exits with status 130 after the checkpoint
    (a SIGTERM, the scheduler's pre-emption, with 0). A refused start leaves the run directory as it was, and
    removes it if Hydra created it empty."""
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = _checked_train(cfg, run_dir)
    except BaseException:
        remove_if_empty(run_dir, Path.cwd())
        raise
    if summary["stopped_by"] == "SIGINT":
        raise SystemExit(INTERRUPTED_STATUS)


def _checked_train(cfg, run_dir: Path) -> dict:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf.errors import OmegaConfBaseException

    try:
        checked = validate(cfg)
    except (ValueError, OmegaConfBaseException) as error:
        raise SystemExit(f"moe-train: invalid config: {error}") from None
    hydra_config = HydraConfig.get()
    try:
        return train(checked, run_dir, on_accepted=lambda path: write_run_record(path, cfg, hydra_config))
    except DeviceChoiceError as error:
        raise SystemExit(f"moe-train: invalid config: {error}") from None
    except (NonFiniteLossError, CheckpointMismatchError, CorruptCheckpointError) as error:
        raise SystemExit(f"moe-train: {type(error).__name__}: {error}") from None
    except KeyboardInterrupt:
        print(
            "moe-train: interrupted (Ctrl-C) outside the training steps; rerun the same command to continue "
            "from the last checkpoint",
            file=sys.stderr,
        )
        raise SystemExit(INTERRUPTED_STATUS) from None


def main() -> None:
    """Console entry point: compose ``configs/config.yaml`` with command-line overrides and train."""
    import hydra

    if not (CONFIG_DIR / "config.yaml").is_file():
        raise SystemExit(
            f"moe-train: config tree not found at {CONFIG_DIR}; install the repository editable (pip install -e .)"
        )
    register_configs()
    register_resolver()
    hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")(_run)()


__all__ = ["CONFIG_DIR", "NonFiniteLossError", "TrainConfig", "main", "train", "validate"]
