"""Sizes as users write them and as mergeflow prints them.

`parse_size` is the one reader of every size option (`--out-shard-size`, `--memory-limit`,
RunOptions.memory_limit). It takes mergekit's spellings (its K/M/B suffixes, decimal: `5B` is
5e9, `500M`, `100K`), byte units as dask reads them (`4GB` = 4e9, `4GiB` = 2^32, `1.5G`,
`512MiB`) and plain counts (`2e9`, `5000000000`). A bare `B` after a number is mergekit's
billion, so `5B` means what it means to mergekit-yaml; a size in bytes is a plain number.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_SIZE = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*([a-z]*)")
EXAMPLES = "examples: 5B, 500M, 4GB, 4GiB"


def parse_size(text: str | int) -> int:
    """A positive whole number of bytes; ValueError (naming the text, not the option: the
    caller names that) for anything else, 0 and negatives included."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = Decimal(text)
    else:
        n = _read(str(text))
    if n <= 0:
        raise ValueError(f"must be more than 0 bytes: {text!r} ({EXAMPLES})")
    if n != n.to_integral_value():
        raise ValueError(f"not a whole number of bytes: {text!r} ({EXAMPLES})")
    return int(n)


def _read(text: str) -> Decimal:
    from dask.utils import byte_sizes  # dask's own table: kb, KiB, G, Gi, ... (lower case)

    m = _SIZE.fullmatch(text.strip().lower())
    scale = None if m is None else 10**9 if m[2] == "b" else byte_sizes.get(m[2])  # 5B: parse_kmb's
    if scale is None:
        raise ValueError(f"not a size: {text!r} ({EXAMPLES})")
    try:
        return Decimal(m[1]) * scale  # exact: 4.1GB is 4100000000 (a float product: 4099999999)
    except InvalidOperation:
        raise ValueError(f"not a size: {text!r} ({EXAMPLES})") from None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def human_time(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
