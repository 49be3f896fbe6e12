"""``moe-prepare``: text becomes training data (see docs/data.md).

``moe-prepare input=PATH out=DIR [vocab_size=N | tokenizer=PATH] ...`` reads a text file, a folder of text
files, JSON Lines, or a dataset on local disk (Hugging Face ``datasets``), trains a byte-level BPE on its
training split (or loads a ``tokenizer.json``), and writes ``DIR/train.bin``, ``val.bin``,
``tokenizer.json`` and ``meta.json``, which ``moe-train data=prepared data.path=DIR`` reads.
"""

from __future__ import annotations

from moe.prepare.config import PrepareConfig
from moe.prepare.errors import PrepareError
from moe.prepare.job import prepare, summary_line


def _run(cfg) -> None:
    """Check the config and prepare; bad input exits with status 1 and one ``moe-prepare: ...`` line."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for key, example in (("input", "input=corpus.txt"), ("out", "out=data/corpus")):
        if OmegaConf.is_missing(cfg, key):
            raise SystemExit(f"moe-prepare: {key} is required, e.g. {example}")
    try:
        checked = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PrepareConfig), cfg))
    except (ValueError, OmegaConfBaseException) as error:
        raise SystemExit(f"moe-prepare: {str(error).splitlines()[0]}") from None
    try:
        meta = prepare(checked)
    except PrepareError as error:
        raise SystemExit(f"moe-prepare: {error}") from None
    except KeyboardInterrupt:
        raise SystemExit(f"moe-prepare: interrupted; {checked.out} was not written") from None
    print(summary_line(meta, checked.out))


def main() -> None:
    """Console entry point: compose ``configs/prepare.yaml`` with command-line overrides and prepare."""
    import hydra
    from hydra.core.config_store import ConfigStore

    from moe.train import CONFIG_DIR

    if not (CONFIG_DIR / "prepare.yaml").is_file():
        raise SystemExit(f"moe-prepare: config not found at {CONFIG_DIR / 'prepare.yaml'}; install editable")
    ConfigStore.instance().store(name="prepare_schema", node=PrepareConfig)
    hydra.main(config_path=str(CONFIG_DIR), config_name="prepare", version_base="1.3")(_run)()


__all__ = ["PrepareConfig", "PrepareError", "main", "prepare"]
