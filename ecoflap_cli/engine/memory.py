"""How much memory a device has, and refusing work that cannot fit.

CPU figures come from psutil (Linux, macOS, Windows alike); CUDA figures from
``torch.cuda.mem_get_info``.  Devices whose memory cannot be read (mps, meta, disk, a CUDA device
that is absent) give None, and callers skip their checks then.
"""

from __future__ import annotations

import psutil
import torch

from ecoflap_cli.errors import ModelError


def _cuda_info(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of a CUDA device, or None when it cannot be read."""
    if not torch.cuda.is_available():
        return None
    try:
        free, total = torch.cuda.mem_get_info(device)
    except (RuntimeError, AssertionError, ValueError):
        return None
    return int(free), int(total)


def free_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes that can still be allocated on ``device``, or None when unknown.

    CPU: the memory available without swapping (``psutil.virtual_memory().available``);
    CUDA: the driver's free figure for that device.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return int(psutil.virtual_memory().available)
    if device.type == "cuda":
        info = _cuda_info(device)
        return None if info is None else info[0]
    return None


def total_memory(device: torch.device | str = "cpu") -> int | None:
    """Total bytes of ``device`` (physical RAM for the CPU), or None when unknown."""
    device = torch.device(device)
    if device.type == "cpu":
        return int(psutil.virtual_memory().total)
    if device.type == "cuda":
        info = _cuda_info(device)
        return None if info is None else info[1]
    return None


def memory_budget_check(bytes_needed: int, device: torch.device | str, what: str, option: str) -> None:
    """Raise ModelError before any work starts when ``bytes_needed`` exceeds ``device``'s free
    memory; do nothing when that is unknown.  ``what`` and ``option`` word the message."""
    free = free_memory(device)
    if free is not None and bytes_needed > free:
        raise ModelError(
            f"{what} needs about {bytes_needed / 2**30:.1f} GiB but {device} has "
            f"{free / 2**30:.1f} GiB free: lower {option}"
        )
