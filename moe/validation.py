"""Argument checks shared by the library's constructors: each returns the value or raises naming it."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise naming it."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_readable_path(name: str, value: str) -> str:
    """``value`` with ``~`` expanded, if it names an existing, readable file or folder; else raise naming it."""
    import os

    path = os.path.expanduser(value)
    if not os.path.exists(path):
        raise ValueError(f"{name}={value!r} does not exist; give the path of a readable file or folder")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{name}={value!r} is not readable by this user")
    return path


def check_top_k(top_k, num_experts: int) -> int:
    """Validate ``1 <= top_k <= num_experts``."""
    check_positive_int("top_k", top_k)
    if top_k > num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    return top_k


def check_positive_float(name: str, value) -> float:
    """Return ``value`` as float if it is a finite number > 0, else raise naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_nonnegative_float(name: str, value) -> float:
    """Return ``value`` as float if it is a finite number >= 0 (a loss coefficient), else raise naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def check_expert_indices(indices: Sequence[int], num_experts: int, what: str) -> list[int]:
    """Validate distinct expert ids in [0, num_experts) and return them as a sorted list."""
    indices = [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < num_experts]
    if bad:
        raise ValueError(f"{what}: expert ids {bad} are outside [0, {num_experts})")
    if len(set(indices)) != len(indices):
        raise ValueError(f"{what}: expert ids {indices} contain duplicates")
    if not indices:
        raise ValueError(f"{what}: at least one expert must remain")
    return sorted(indices)


# Config-style checks: messages read "key=value is not valid; ..." and name the key as the caller gives it.


class ConfigValueError(ValueError):
    """A bad config value whose message names config keys; ``under(group)`` names them ``group.key``.

    ``render(prefix)`` writes the message with ``prefix`` before every key it names, so a config nested in
    a larger one (``moe.model.ModelShape`` as ``moe-train``'s ``model`` group) reports the key as the user
    wrote it.
    """

    def __init__(self, render: Callable[[str], str], prefix: str = ""):
        self.render, self.prefix = render, prefix
        super().__init__(render(prefix))

    def under(self, group: str) -> ConfigValueError:
        """The same error with its keys inside ``group``."""
        return ConfigValueError(self.render, f"{group}.{self.prefix}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_choice(key: str, value, choices) -> None:
    """Raise unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigValueError(lambda p: f"{p}{key}={value!r} is not valid; valid choices: {list(choices)}")


def check_at_least(key: str, value, minimum) -> None:
    """Raise unless ``value`` is a number >= ``minimum``."""
    if not (_is_number(value) and value >= minimum):
        raise ConfigValueError(lambda p: f"{p}{key}={value!r} is not valid; it must be a number >= {minimum}")


def check_int_at_least(key: str, value, minimum: int) -> None:
    """Raise unless ``value`` is an int >= ``minimum`` (ValueError in both cases: a config value, not an argument)."""
    if not (_is_int(value) and value >= minimum):
        raise ConfigValueError(lambda p: f"{p}{key} must be an int >= {minimum}, got {value!r}")


def check_in_range(key: str, value, low, high, *, include_high: bool = True) -> None:
    """Raise unless ``low <= value <= high`` (``< high`` when ``include_high`` is false)."""
    if not (_is_number(value) and low <= value and (value <= high if include_high else value < high)):
        bracket = "]" if include_high else ")"
        raise ConfigValueError(lambda p: f"{p}{key}={value!r} is not valid; it must be in [{low}, {high}{bracket}")
