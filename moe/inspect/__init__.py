"""``moe-inspect run=DIR``: a look inside a trained ``moe-train`` run, as pictures (see docs/inspect.md).

For each MoE layer: the tokens each expert receives most often, routing entropy, how often experts are
chosen together, and the expert load over training; PNG figures and ``<run>/inspect/report.md``.
"""

from __future__ import annotations

from moe.inspect.report import InspectConfig, collect_routing, inspect_run
from moe.inspect.run import RunError


def _run(cfg) -> None:
    """Check the config and inspect; expected failures exit with status 1 and one ``moe-inspect: ...`` line."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from moe.train.checkpoint import CorruptCheckpointError

    if OmegaConf.is_missing(cfg, "run"):
        raise SystemExit("moe-inspect: run is required, e.g. run=outputs/<date>/<time>")
    try:
        checked = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(InspectConfig), cfg))
    except (ValueError, OmegaConfBaseException) as error:
        raise SystemExit(f"moe-inspect: {str(error).splitlines()[0]}") from None
    try:
        report = inspect_run(checked)
    except (ValueError, FileNotFoundError, CorruptCheckpointError) as error:
        raise SystemExit(f"moe-inspect: {str(error).splitlines()[0]}") from None
    print(f"moe-inspect: wrote {report} and its figures")


def main() -> None:
    """Console entry point: compose ``configs/inspect.yaml`` with command-line overrides and inspect."""
    import hydra
    from hydra.core.config_store import ConfigStore

    from moe.train import CONFIG_DIR

    if not (CONFIG_DIR / "inspect.yaml").is_file():
        raise SystemExit(f"moe-inspect: config not found at {CONFIG_DIR / 'inspect.yaml'}; install editable")
    ConfigStore.instance().store(name="inspect_schema", node=InspectConfig)
    hydra.main(config_path=str(CONFIG_DIR), config_name="inspect", version_base="1.3")(_run)()


__all__ = ["InspectConfig", "RunError", "collect_routing", "inspect_run", "main"]
