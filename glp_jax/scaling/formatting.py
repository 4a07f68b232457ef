"""Compact number formats shared by formulas, labels and reports."""

from __future__ import annotations


def format_number(value: float) -> str:
    """Compact number: 0.52, 435.1, 0.169, 3.92e6 (inf and nan as themselves)."""
    if value == 0 or 1e-3 <= abs(value) < 1e5 or value != value or abs(value) == float("inf"):
        return f"{value:.4g}"
    text = f"{value:.3g}"
    if "e" not in text:  # .3g rounded into plain notation (e.g. 99999.5 -> 1e+05 is fine)
        return text
    mantissa, exponent = text.split("e")
    return f"{mantissa}e{int(exponent)}"


def format_count(value: float | None) -> str:
    """Parameter counts as 35.9M / 1.66B."""
    if value is None:
        return "?"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"
