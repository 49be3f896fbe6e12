"""``moe-train``: the Hydra app that trains a GPT-style MoE model (see docs/training.md).

The YAML config tree is the repository's ``configs/`` directory, passed to Hydra as an absolute path
computed from this file; the package is meant to be installed editable (``pip install -e .``), which is
what ``make setup`` does. Extra config directories can be added with Hydra's ``--config-dir``.
"""

from __future__ import annotations

from pathlib import Path

from moe.train.checkpoint import CheckpointMismatchError, CorruptCheckpointError
from moe.train.config import TrainConfig, register_configs, validate
from moe.train.distributed import DeviceChoiceError
from moe.train.trainer import NonFiniteLossError, train

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def _run(cfg) -> None:
    """Validate, then train; expected failures (bad config, non-finite loss, unusable checkpoint) exit with
    status 1 and their message alone, without a traceback."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf.errors import OmegaConfBaseException

    try:
        checked = validate(cfg)
    except (ValueError, OmegaConfBaseException) as error:
        raise SystemExit(f"moe-train: invalid config: {error}") from None
    try:
        train(checked, HydraConfig.get().runtime.output_dir)
    except DeviceChoiceError as error:
        raise SystemExit(f"moe-train: invalid config: {error}") from None
    except (NonFiniteLossError, CheckpointMismatchError, CorruptCheckpointError) as error:
        raise SystemExit(f"moe-train: {type(error).__name__}: {error}") from None


def main() -> None:
    """Console entry point: compose ``configs/config.yaml`` with command-line overrides and train."""
    import hydra

    if not (CONFIG_DIR / "config.yaml").is_file():
        raise SystemExit(
            f"moe-train: config tree not found at {CONFIG_DIR}; install the repository editable (pip install -e .)"
        )
    register_configs()
    hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")(_run)()


__all__ = ["CONFIG_DIR", "NonFiniteLossError", "TrainConfig", "main", "train", "validate"]
