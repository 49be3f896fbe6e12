"""Argument checks shared by the library's constructors: each returns the value or raises naming it."""

from __future__ import annotations

from collections.abc import Sequence


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


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
