"""Numbers for people: SI-prefixed counts in tables and plots."""

from __future__ import annotations

import math


def fmt_si(x: float) -> str:
    """``11456`` → ``"11.5k"``, ``3.0e8`` → ``"300M"``; 3 significant digits with k/M/G prefixes."""
    if x == 0 or not math.isfinite(x):
        return str(x)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.4g}"
