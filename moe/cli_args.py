"""``key=value`` command-line arguments into a checked config dataclass (moe-generate, moe-export)."""

from __future__ import annotations

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


def parse_key_values(schema: type, args: list[str]):
    """An instance of the dataclass ``schema`` from ``key=value`` arguments; ValueError naming a bad key or value."""
    bad = [a for a in args if "=" not in a]
    if bad:
        raise ValueError(f"arguments must be key=value, got {bad}; keys: {list(schema.__dataclass_fields__)}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(args)))
    except OmegaConfBaseException as error:
        raise ValueError(str(error).splitlines()[0]) from None
