"""Sizes in bytes, read once for every option that takes one (``--max-shard-size``, ``--max-memory``)."""

from __future__ import annotations

from ecoflap_cli.errors import EcoflapError

#: decimal and binary units; a lower-case ``b`` is read as bytes too (upper-cased first)
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: str | int, option: str = "size") -> int:
    """Bytes in a positive size such as ``5GB``, ``500MB``, ``2GiB``, ``1.5GB``, ``4096`` or ``4096B``
    (units case-insensitive; GB = 10^9, GiB = 2^30). Anything else, or a size that is not positive,
    raises one EcoflapError naming ``option``."""
    if isinstance(size, bool):
        value = 0
    elif isinstance(size, int):
        value = size
    else:
        text = str(size).strip().upper()
        number = text.rstrip("KMGTIB")
        try:
            value = int(float(number) * _UNITS[text[len(number) :]])
        except (ValueError, KeyError, OverflowError):
            value = 0
    if not 0 < value < 2**63:  # 8 EiB: beyond any disk or memory, and beyond what a file offset holds
        raise EcoflapError(f"{option}: cannot read size {size!r}: use a positive number and a unit (5GB, 500MB, 2GiB)")
    return value
