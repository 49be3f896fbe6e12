"""``moe-train``: the Hydra app that trains a GPT-style MoE model (see docs/training.md).

The YAML config tree is the repository's ``configs/`` directory, passed to Hydra as an absolute path
computed from this file; the package is meant to be installed editable (``pip install -e .``), which is
what ``make setup`` does. Extra config directories can be added with Hydra's ``--config-dir``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from moe.train.checkpoint import CheckpointMismatchError, CorruptCheckpointError, check_resume
from moe.train.config import TrainConfig, register_configs, validate
from moe.train.distributed import DeviceChoiceError
from moe.train.run_dir import register_resolver, remove_if_empty, write_run_record
from moe.train.trainer import InvalidDataError, NonFiniteLossError, train

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
STARTED = time.time()  # before Hydra creates the run directory: what is newer and empty, a refused start left
# At import, not in main(): a launcher's job process (hydra-submitit) unpickles _run and resolves the run
# directory's ${moe_run_name:...} without calling main().
register_resolver()


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
    except SystemExit as error:
        remove_if_empty(run_dir, STARTED)
        if isinstance(error.code, str) and os.environ.get("RANK", "0") != "0":
            # Under torchrun every rank fails alike and rank 0 alone prints why; the pause lets it do so before
            # torchrun, seeing this rank's exit, stops the others.
            time.sleep(2)
            raise SystemExit(1) from None
        raise
    except BaseException:
        remove_if_empty(run_dir, STARTED)
        raise
    if summary["stopped_by"] == "SIGINT":
        raise SystemExit(INTERRUPTED_STATUS)


def _check_layout(cfg: TrainConfig) -> None:
    """``parallel.ep_size`` against this launch's world size (torchrun or submitit) and the expert count."""
    from moe.parallel import check_layout
    from moe.train.distributed import export_submitit_env

    export_submitit_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        check_layout(world_size, cfg.parallel.ep_size, cfg.model.num_experts if cfg.model.moe_every else ())
    except ValueError as error:
        raise ValueError(f"parallel.ep_size={cfg.parallel.ep_size}: {error}") from None


def _checked_train(cfg, run_dir: Path) -> dict:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf.errors import OmegaConfBaseException

    try:
        checked = validate(cfg)
        check_resume(checked.trainer.resume)
        _check_layout(checked)
    except (ValueError, FileNotFoundError, OmegaConfBaseException) as error:
        raise SystemExit(f"moe-train: invalid config: {error}") from None
    hydra_config = HydraConfig.get()
    try:
        return train(checked, run_dir, on_accepted=lambda path: write_run_record(path, cfg, hydra_config))
    except DeviceChoiceError as error:
        raise SystemExit(f"moe-train: invalid config: {error}") from None
    except InvalidDataError as error:
        raise SystemExit(f"moe-train: invalid data: {error}") from None
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
    hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")(_run)()


__all__ = ["CONFIG_DIR", "NonFiniteLossError", "TrainConfig", "main", "train", "validate"]
