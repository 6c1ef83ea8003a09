"""Budgets: what the user may write, turned into bytes."""

from __future__ import annotations

import re

from memplan.errors import BudgetError

ACCEPTED_FORMS = (
    "an int number of bytes (8_000_000_000); a string with a unit, SI or binary "
    "('512MB', '8GB', '512MiB', '8GiB', '1.5TB'); a percentage of the unplanned peak ('60%') "
    "or a float in (0, 1] (0.6); or 'auto' (the free memory of the model's CUDA device)"
)

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_WITH_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*$")
_PERCENT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")


def _bad(value: object, why: str) -> BudgetError:
    return BudgetError(f"budget {value!r} is not valid ({why}). Accepted forms: {ACCEPTED_FORMS}.")


def is_relative(value: object) -> bool:
    """Whether the budget is a fraction of the unplanned peak, known only after capture."""
    return isinstance(value, float) or (isinstance(value, str) and value.strip().endswith("%"))


def parse_budget(value: object, reference_bytes: int | None = None, *,
                 free_device_bytes: int | None = None) -> int:
    """Bytes for a budget; fractions and percentages are of ``reference_bytes``.

    >>> parse_budget("8GB"), parse_budget("1KiB"), parse_budget("50%", reference_bytes=1000)
    (8000000000, 1024, 500)
    """
    if isinstance(value, bool):
        raise _bad(value, "a bool is not a size")
    if isinstance(value, int):
        if value <= 0:
            raise _bad(value, "it must be positive")
        return value
    if isinstance(value, float):
        if not 0 < value <= 1:
            raise _bad(value, "a float budget is a fraction in (0, 1]")
        return _fraction(value, value, reference_bytes)
    if not isinstance(value, str):
        raise _bad(value, f"a {type(value).__name__} is not a budget")
    if value.strip().lower() == "auto":
        if free_device_bytes is None:
            raise _bad(value, "'auto' needs a CUDA device and the model is not on one")
        return free_device_bytes
    if match := _PERCENT.match(value):
        percent = float(match.group(1))
        if not 0 < percent <= 100:
            raise _bad(value, "a percentage must be in (0, 100]")
        return _fraction(value, percent / 100, reference_bytes)
    if match := _WITH_UNIT.match(value):
        unit = match.group(2).lower()
        if unit not in _UNITS:
            raise _bad(value, f"unknown unit {match.group(2)!r}")
        nbytes = int(float(match.group(1)) * _UNITS[unit])
        if nbytes <= 0:
            raise _bad(value, "it must be positive")
        return nbytes
    raise _bad(value, "not a size, a percentage or 'auto'")


def _fraction(value: object, fraction: float, reference_bytes: int | None) -> int:
    if reference_bytes is None:
        raise _bad(value, "a fraction needs the unplanned peak, which is known only after capture")
    return int(fraction * reference_bytes)
