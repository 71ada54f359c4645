"""DICOM header values as plain Python: tolerant of absent, empty, multi-valued and damaged fields
(a field that cannot be read is absent, never an exception)."""

from __future__ import annotations


def present(v) -> bool:
    """Whether a field holds a value (not None, not blank text, not an empty sequence)."""
    if v is None:
        return False
    if isinstance(v, str):
        return v.strip() != ""
    try:
        return len(v) > 0
    except TypeError:
        return True


def first_float(v) -> float | None:
    """A number, or the first of several; None when absent or not a number."""
    if v is not None and not isinstance(v, (str, bytes)) and hasattr(v, "__len__"):  # multi-valued: the first
        v = v[0] if len(v) else None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def floats(v, n: int) -> tuple | None:
    """Exactly ``n`` numbers (a position, an orientation), else None."""
    try:
        out = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def words(v) -> tuple:
    """A multi-valued text field (CS) as upper-case words: ``"SE\\\\IR"`` or ``["SE", "IR"]`` -> ("SE", "IR")."""
    if not present(v):
        return ()
    items = [v] if isinstance(v, str) else list(v)
    return tuple(w.strip().upper() for item in items for w in str(item).replace("\\", " ").split() if w.strip())


def rescale_value(value, default: float) -> float:
    """RescaleSlope / RescaleIntercept as a float: ``default`` when absent, NaN when unreadable
    (then refused by :func:`to_stored`, never silently taken as the default)."""
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
