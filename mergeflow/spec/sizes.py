"""Sizes as users write them (`5GB`, `500MB`, `2e9`) and as mergeflow prints them."""

from __future__ import annotations


def parse_size(text: str | int) -> int:
    """`5GB`, `500MB`, `1.5G`, `2e9` or a plain byte count, in bytes (decimal units)."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    try:
        if s and s[-1] in mult:
            return int(float(s[:-1]) * mult[s[-1]])
        return int(float(s))
    except ValueError:
        raise ValueError(f"not a size: {text!r} (examples: 5GB, 500MB)") from None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def human_time(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
