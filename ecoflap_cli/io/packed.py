"""Packed sparse checkpoints: store pruned weights so they are actually smaller on disk.

Two packed layouts exist for 2-D tensors (parts are plain tensors, so they fit in safetensors):

``bitmask`` (the layout of compressed-tensors' bitmask format)
    ``values``      the kept entries in row-major order, original dtype, 1-D
    ``bitmask``     uint8 (rows, ceil(cols / 8)); bit ``j`` (little-endian, ``1 << j``) of byte
                    ``b`` in a row is column ``8 * b + j``; padding bits past ``cols`` are zero
    ``shape``       int64 ``[rows, cols]``
    ``row_offsets`` int64 (rows,); index into ``values`` where each row starts

``nm`` (every group of ``m`` consecutive columns of a row keeps at most ``n`` entries)
    ``values``      (rows, cols * n / m), original dtype; the ``n`` stored entries of each group in
                    column order (a group with fewer than ``n`` kept entries stores some zeros)
    ``indices``     uint8 (rows, ceil(groups * b / 8)): for each group the colex rank of the
                    sorted ``n``-subset of positions it stores, ``b = ceil(log2(C(m, n)))`` bits,
                    least significant bit first, bit-packed little-endian like ``bitmask``;
                    this costs fewer bits than a per-column bitmask (3 bits per 4 columns for 2:4)
    ``shape``       int64 ``[rows, cols]``
    ``nm``          int64 ``[n, m]`` (``1 <= n <= m <= 16``)

An entry is *kept* when its bit pattern is not all zeros, so ``-0.0`` and every NaN payload are
stored and round trips are bit-identical.  Packing and unpacking run on the CPU (inputs on another
device are copied there) and work for any dtype of 1, 2, 4 or 8 bytes (fp32, fp16, bf16, ...).

File format (one safetensors file): a packed tensor ``W`` is stored as ``W.__<part>``; dense
tensors are stored unchanged under their own name.  The safetensors metadata holds
``format = "ecoflap.packed"``, ``format_version = "1"`` and ``ecoflap.packed.index``, a JSON object
mapping each tensor that was considered for packing to ``{"layout", "dtype", "shape",
"sparsity"[, "n_m"]}`` (``layout`` may be ``"dense"`` when packing would not have saved space).

Sharded checkpoints follow the Hugging Face layout: ``model.safetensors`` when everything fits one
shard, else ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``, whose
``weight_map`` maps *original* tensor names to the file that holds them (or their parts).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ecoflap_cli.errors import ArtifactError
from ecoflap_cli.files import atomic_file, write_atomic

FORMAT_NAME = "ecoflap.packed"
FORMAT_VERSION = "1"
INDEX_KEY = "ecoflap.packed.index"
RESERVED_METADATA_KEYS = frozenset({"format", "format_version", INDEX_KEY})
PART_SEPARATOR = ".__"
BITMASK_PARTS = ("values", "bitmask", "shape", "row_offsets")
NM_PARTS = ("values", "indices", "shape", "nm")
LAYOUT_PARTS = {"bitmask": BITMASK_PARTS, "nm": NM_PARTS}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: packed weights use their own file names, so that ``transformers`` (and every loader that
#: looks for ``model.safetensors``) finds no weights and fails instead of loading random ones
PACKED_SINGLE_FILE = "ecoflap-packed.safetensors"
PACKED_INDEX_FILE = "ecoflap-packed.safetensors.index.json"
MAX_NM_M = 16
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_PACKED_SHARD_RE = re.compile(r"^ecoflap-packed-\d{5}-of-\d{5}\.safetensors$")
_ALL_PARTS = frozenset(BITMASK_PARTS) | frozenset(NM_PARTS)
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

Parts = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- small helpers


def dense_nbytes(t: torch.Tensor) -> int:
    """Bytes the tensor's data takes when stored dense."""
    return t.numel() * t.element_size()


def packed_nbytes(parts: Mapping[str, torch.Tensor]) -> int:
    """Bytes the data of all parts of a packed tensor take."""
    return sum(dense_nbytes(p) for p in parts.values())


def _bits_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor on the CPU, contiguous, reinterpreted as integers of the same width."""
    int_dtype = _INT_VIEW.get(t.element_size())
    if int_dtype is None:
        raise ValueError(f"cannot pack dtype {t.dtype} (element size {t.element_size()})")
    t = t.detach().to("cpu").contiguous()
    return t if t.dtype == int_dtype else t.view(int_dtype)


def kept_indices(t: torch.Tensor) -> torch.Tensor:
    """Boolean mask of entries whose bit pattern is not all zeros (keeps -0.0 and NaN)."""
    return _bits_view(t) != 0


def _require_2d(t: torch.Tensor, what: str) -> tuple[int, int]:
    if t.dim() != 2:
        raise ValueError(f"{what} needs a 2-D tensor, got shape {tuple(t.shape)}")
    return int(t.shape[0]), int(t.shape[1])


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a (rows, k) 0/1 tensor into uint8 (rows, ceil(k / 8)), little-endian bit order."""
    rows, k = bits.shape
    nbytes = (k + 7) // 8
    padded = torch.zeros((rows, nbytes * 8), dtype=torch.uint8)
    padded[:, :k] = bits
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
    return (padded.view(rows, nbytes, 8) * weights).sum(-1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack_bits`: uint8 (rows, nbytes) to uint8 0/1 (rows, nbytes * 8)."""
    rows, nbytes = packed.shape
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed.unsqueeze(-1) >> shifts) & 1).reshape(rows, nbytes * 8)


def _shape_of(parts: Mapping[str, torch.Tensor], name: str) -> tuple[int, int]:
    shape = parts["shape"]
    if shape.dtype != torch.int64 or tuple(shape.shape) != (2,):
        raise ArtifactError(f"{name}: packed 'shape' must be an int64 tensor of length 2")
    rows, cols = (int(v) for v in shape.tolist())
    if rows < 0 or cols < 0:
        raise ArtifactError(f"{name}: packed shape [{rows}, {cols}] is negative")
    return rows, cols


def _require_parts(parts: Mapping[str, torch.Tensor], names: Iterable[str], name: str) -> None:
    missing = [p for p in names if p not in parts]
    if missing:
        raise ArtifactError(f"{name}: packed tensor is missing part(s) {', '.join(missing)}")


# --------------------------------------------------------------------------- bitmask layout


def pack_bitmask(t: torch.Tensor) -> Parts:
    """Pack a 2-D tensor into the bitmask layout (see the module docstring).

    Kept entries are those whose bit pattern is non-zero, so -0.0 and NaN survive bit-identically.
    """
    rows, cols = _require_2d(t, "pack_bitmask")
    bits = _bits_view(t)
    mask = bits != 0
    counts = mask.sum(dim=1)
    row_offsets = torch.zeros(rows, dtype=torch.int64)
    if rows > 1:
        row_offsets[1:] = torch.cumsum(counts, dim=0)[:-1]
    return {
        "values": bits[mask].view(t.dtype),
        "bitmask": _pack_bits(mask),
        "shape": torch.tensor([rows, cols], dtype=torch.int64),
        "row_offsets": row_offsets,
    }


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
_POPCOUNT_CHUNK = 1 << 20  # bitmask bytes counted at a time: bounds the counting's memory


def bitmask_row_counts(bitmask: torch.Tensor, cols: int, name: str = "tensor") -> torch.Tensor:
    """Kept entries per row of a (rows, ceil(cols / 8)) uint8 bitmask, counted byte by byte
    without expanding it to bits; ArtifactError when a padding bit past ``cols`` is set."""
    rows, nbytes = bitmask.shape
    if cols % 8 and nbytes and bool((bitmask[:, -1] >> (cols % 8)).any()):
        raise ArtifactError(f"{name}: bitmask has non-zero padding bits beyond column {cols}")
    counts = torch.zeros(rows, dtype=torch.int64)
    step = max(1, _POPCOUNT_CHUNK // max(nbytes, 1))
    for start in range(0, rows, step):
        counts[start : start + step] = _POPCOUNT[bitmask[start : start + step].to(torch.int64)].sum(dim=1)
    return counts


def check_bitmask_parts(parts: Mapping[str, torch.Tensor], name: str = "tensor") -> tuple[int, int, torch.Tensor]:
    """``(rows, cols, mask counts per row)`` of bitmask parts, checked before anything is expanded:
    part dtypes and shapes against the recorded shape, kept count against stored values, offsets."""
    _require_parts(parts, BITMASK_PARTS, name)
    rows, cols = _shape_of(parts, name)
    values, bitmask, offsets = parts["values"], parts["bitmask"], parts["row_offsets"]
    expected = (rows, (cols + 7) // 8)
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != expected:
        raise ArtifactError(
            f"{name}: bitmask has shape {tuple(bitmask.shape)} ({bitmask.dtype}), expected {expected} (torch.uint8)"
        )
    if values.dim() != 1:
        raise ArtifactError(f"{name}: packed values must be 1-D, got shape {tuple(values.shape)}")
    if offsets.dtype != torch.int64 or tuple(offsets.shape) != (rows,):
        raise ArtifactError(f"{name}: row_offsets must be int64 of length {rows}")
    counts = bitmask_row_counts(bitmask, cols, name)
    total = int(counts.sum())
    if total != values.numel():
        raise ArtifactError(f"{name}: bitmask keeps {total} entries but {values.numel()} values are stored")
    want = torch.zeros(rows, dtype=torch.int64)
    if rows > 1:
        want[1:] = torch.cumsum(counts, dim=0)[:-1]
    if not torch.equal(offsets, want):
        raise ArtifactError(f"{name}: row_offsets do not match the per-row counts of the bitmask")
    return rows, cols, counts


def unpack_bitmask(parts: Mapping[str, torch.Tensor], name: str = "tensor") -> torch.Tensor:
    """Rebuild the dense tensor from bitmask parts; raise ArtifactError if they are inconsistent
    (checked on the packed parts, before the dense tensor is allocated)."""
    rows, cols, _ = check_bitmask_parts(parts, name)
    vbits = _bits_view(parts["values"])
    out = torch.zeros((rows, cols), dtype=vbits.dtype)
    out[_unpack_bits(parts["bitmask"])[:, :cols].bool()] = vbits
    return out.view(parts["values"].dtype)


# --------------------------------------------------------------------------- N:M layout


def _check_nm(n: int, m: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int) and 1 <= n <= m <= MAX_NM_M):
        raise ValueError(f"N:M needs integers 1 <= n <= m <= {MAX_NM_M}, got {n}:{m}")


@functools.cache
def nm_tables(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Lookup tables of an N:M layout.

    Returns ``(rank_of_code, combos, width)``: ``rank_of_code[c]`` is the colex rank of the
    n-subset stored for a group whose kept columns form the bit set ``c`` (kept columns topped
    up with the leftmost zero columns), or -1 when ``c`` keeps more than n; ``combos[r]`` are the
    sorted positions of rank ``r``; ``width`` is the number of bits of a rank.
    """
    codes = torch.arange(1 << m, dtype=torch.int64)
    kept = (codes.unsqueeze(-1) >> torch.arange(m)) & 1
    count = kept.sum(-1, keepdim=True)
    zeros_seen = (1 - kept).cumsum(-1)
    selected = (kept == 1) | ((kept == 0) & (zeros_seen <= n - count))
    binom = torch.tensor([[math.comb(p, i) for i in range(n + 1)] for p in range(m)], dtype=torch.int64)
    order = selected.cumsum(-1).clamp(max=n)  # 1-based rank of each selected position
    rank_of_code = (binom[torch.arange(m), order] * selected).sum(-1)
    rank_of_code[count.squeeze(-1) > n] = -1
    exact = count.squeeze(-1) == n
    combos = torch.zeros((math.comb(m, n), n), dtype=torch.int64)
    combos[rank_of_code[exact]] = kept[exact].nonzero()[:, 1].reshape(-1, n)
    return rank_of_code, combos, (math.comb(m, n) - 1).bit_length()


def _nm_ranks(bits: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per-group ranks (rows, groups) of an integer view (rows, groups, m); -1 marks overfull groups."""
    code_dtype = torch.uint8 if m <= 8 else torch.int32
    weights = torch.tensor([1 << j for j in range(m)], dtype=code_dtype)
    codes = ((bits != 0).to(code_dtype) * weights).sum(-1, dtype=code_dtype)
    return nm_tables(n, m)[0][codes.to(torch.int64)]


def nm_fits(t: torch.Tensor, n: int, m: int) -> bool:
    """Whether a 2-D tensor has at most n kept entries in every group of m consecutive columns."""
    _check_nm(n, m)
    if t.dim() != 2 or t.shape[1] % m != 0 or t.element_size() not in _INT_VIEW:
        return False
    rows, cols = t.shape
    if t.numel() == 0:
        return True
    return bool((_nm_ranks(_bits_view(t).reshape(rows, cols // m, m), n, m) >= 0).all())


def pack_nm(t: torch.Tensor, n: int, m: int) -> Parts:
    """Pack a 2-D N:M-sparse tensor into the ``nm`` layout (see the module docstring).

    Raises ValueError when the columns are not a multiple of m or a group keeps more than n.
    """
    rows, cols = _require_2d(t, "pack_nm")
    _check_nm(n, m)
    if cols % m:
        raise ValueError(f"{cols} columns are not a multiple of m={m}")
    groups = cols // m
    _, combos, width = nm_tables(n, m)
    bits = _bits_view(t).reshape(rows, groups, m)
    ranks = _nm_ranks(bits, n, m)
    if bool((ranks < 0).any()):
        raise ValueError(f"tensor of shape {(rows, cols)} is not {n}:{m} sparse")
    values = bits.gather(-1, combos[ranks]).reshape(rows, groups * n).view(t.dtype)
    rank_bits = (ranks.unsqueeze(-1) >> torch.arange(width)) & 1
    return {
        "values": values,
        "indices": _pack_bits(rank_bits.reshape(rows, groups * width)),
        "shape": torch.tensor([rows, cols], dtype=torch.int64),
        "nm": torch.tensor([n, m], dtype=torch.int64),
    }


def _nm_of(parts: Mapping[str, torch.Tensor], name: str) -> tuple[int, int]:
    nm = parts["nm"]
    if nm.dtype != torch.int64 or tuple(nm.shape) != (2,):
        raise ArtifactError(f"{name}: packed 'nm' must be an int64 tensor of length 2")
    n, m = (int(v) for v in nm.tolist())
    try:
        _check_nm(n, m)
    except ValueError as exc:
        raise ArtifactError(f"{name}: {exc}") from None
    return n, m


def unpack_nm(parts: Mapping[str, torch.Tensor], name: str = "tensor") -> torch.Tensor:
    """Rebuild the dense tensor from N:M parts; raise ArtifactError if they are inconsistent."""
    _require_parts(parts, NM_PARTS, name)
    rows, cols = _shape_of(parts, name)
    n, m = _nm_of(parts, name)
    if cols % m:
        raise ArtifactError(f"{name}: {cols} columns are not a multiple of m={m}")
    groups = cols // m
    _, combos, width = nm_tables(n, m)
    values, indices = parts["values"], parts["indices"]
    if tuple(values.shape) != (rows, groups * n):
        raise ArtifactError(f"{name}: N:M values have shape {tuple(values.shape)}, expected {(rows, groups * n)}")
    expected = (rows, (groups * width + 7) // 8)
    if indices.dtype != torch.uint8 or tuple(indices.shape) != expected:
        raise ArtifactError(
            f"{name}: N:M indices have shape {tuple(indices.shape)} ({indices.dtype}), "
            f"expected {expected} (torch.uint8)"
        )
    bits = _unpack_bits(indices)
    if bool(bits[:, groups * width :].any()):
        raise ArtifactError(f"{name}: N:M indices have non-zero padding bits")
    weights = torch.tensor([1 << j for j in range(width)], dtype=torch.int64)
    ranks = (bits[:, : groups * width].reshape(rows, groups, width).to(torch.int64) * weights).sum(-1)
    if ranks.numel() and int(ranks.max()) >= combos.shape[0]:
        raise ArtifactError(f"{name}: N:M indices hold an out-of-range group code")
    vbits = _bits_view(values).reshape(rows, groups, n)
    out = torch.zeros((rows, groups, m), dtype=vbits.dtype)
    out.scatter_(-1, combos[ranks], vbits)
    return out.reshape(rows, cols).view(values.dtype)


# --------------------------------------------------------------------------- layout choice


def _estimate(t: torch.Tensor, layout: str, n_m: tuple[int, int] | None) -> int:
    """Bytes the parts of a layout would take, without building them."""
    rows, cols = t.shape
    size = t.element_size()
    if layout == "bitmask":
        nnz = int(kept_indices(t).sum())
        return nnz * size + rows * ((cols + 7) // 8) + rows * 8 + 16
    assert n_m is not None
    n, m = n_m
    width = nm_tables(n, m)[2]
    groups = cols // m
    return rows * groups * n * size + rows * ((groups * width + 7) // 8) + 32


def choose_layout(t: torch.Tensor, n_m: tuple[int, int] | None = None) -> tuple[str, Parts | None]:
    """Pick the smallest of ``bitmask``, ``nm`` (when ``n_m`` is given and fits) and ``dense``.

    Returns ``(layout, parts)``; ``parts`` is None for ``dense``, which is chosen for tensors that
    are not 2-D, cannot be bit-viewed, or when packing would not be strictly smaller.
    """
    if t.dim() != 2 or t.element_size() not in _INT_VIEW:
        return "dense", None
    candidates = {"dense": dense_nbytes(t), "bitmask": _estimate(t, "bitmask", None)}
    if n_m is not None and nm_fits(t, *n_m):
        candidates["nm"] = _estimate(t, "nm", n_m)
    layout = min(candidates, key=lambda k: (candidates[k], k != "dense"))
    if layout == "dense":
        return "dense", None
    parts = pack_bitmask(t) if layout == "bitmask" else pack_nm(t, *n_m)  # type: ignore[misc]
    return layout, parts


def unpack(parts: Mapping[str, torch.Tensor], layout: str, name: str = "tensor") -> torch.Tensor:
    """Rebuild a dense tensor from the parts of ``layout`` (``bitmask`` or ``nm``)."""
    if layout == "bitmask":
        return unpack_bitmask(parts, name)
    if layout == "nm":
        return unpack_nm(parts, name)
    raise ArtifactError(f"{name}: unknown packed layout {layout!r}")


# --------------------------------------------------------------------------- single file


def _check_names(state_dict: Mapping[str, torch.Tensor]) -> None:
    for name in state_dict:
        base, sep, part = name.rpartition(PART_SEPARATOR)
        if sep and base and part in _ALL_PARTS:
            raise ValueError(f"tensor name {name!r} clashes with the packed part naming '<name>.__{part}'")


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    metadata = dict(metadata or {})
    clash = sorted(RESERVED_METADATA_KEYS & metadata.keys())
    if clash:
        raise ValueError(f"metadata key(s) {', '.join(clash)} are reserved for the packed format")
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ValueError(f"metadata must map str to str (bad key(s): {bad[:3]})")
    return metadata


def _encode_one(name: str, t: torch.Tensor, n_m: tuple[int, int] | None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Stored tensors and index entry of one candidate tensor."""
    layout, parts = choose_layout(t, n_m)
    entry: dict = {"layout": layout, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    if t.dim() == 2 and t.element_size() in _INT_VIEW and t.numel():
        entry["sparsity"] = round(1.0 - int(kept_indices(t).sum()) / t.numel(), 6)
    if parts is None:
        return {name: t}, entry
    if layout == "nm":
        entry["n_m"] = [int(v) for v in parts["nm"].tolist()]
    return {f"{name}{PART_SEPARATOR}{p}": v for p, v in parts.items()}, entry


def _encode(
    state_dict: Mapping[str, torch.Tensor],
    sparse_names: set[str] | None,
    n_m: tuple[int, int] | None,
) -> list[tuple[str, dict[str, torch.Tensor], dict | None]]:
    """For each tensor: (original name, tensors to store, index entry or None if not a candidate)."""
    _check_names(state_dict)
    if n_m is not None:
        _check_nm(*n_m)
    if sparse_names is not None:
        unknown = sorted(set(sparse_names) - state_dict.keys())
        if unknown:
            raise ValueError(f"sparse_names not in the state dict: {', '.join(unknown[:5])}")
    encoded = []
    for name, t in state_dict.items():
        if sparse_names is None:
            candidate = t.dim() == 2 and t.is_floating_point()
        else:
            candidate = name in sparse_names
        if candidate:
            stored, entry = _encode_one(name, t, n_m)
        else:
            stored, entry = {name: t}, None
        encoded.append((name, stored, entry))
    return encoded


def _storable(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors with no two sharing storage (safetensors refuses shared tensors)."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = t
    return out


def canonical_header(path: str | os.PathLike[str]) -> None:
    """Rewrite a safetensors header in place with its ``__metadata__`` keys sorted and its tensor
    entries in data order, so equal contents give equal bytes (safetensors writes the metadata
    from a hash map, in an order that changes from run to run). The header keeps its length."""
    with open(path, "r+b") as fh:
        length = int.from_bytes(fh.read(8), "little")
        raw = fh.read(length)
        header = json.loads(raw)
        meta = header.pop("__metadata__", None)
        canonical: dict[str, Any] = {} if meta is None else {"__metadata__": dict(sorted(meta.items()))}
        canonical.update(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"], kv[0])))
        text = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= length:
            fh.seek(8)
            fh.write(text + b" " * (length - len(text)))


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    stored = _storable(tensors)
    with atomic_file(path) as tmp:
        save_file(stored, tmp, metadata=metadata)
        canonical_header(tmp)


def _packed_metadata(index: dict[str, dict], user: dict[str, str]) -> dict[str, str]:
    index_text = json.dumps(index, sort_keys=True)
    return {**user, "format": FORMAT_NAME, "format_version": FORMAT_VERSION, INDEX_KEY: index_text}


def save_packed(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    sparse_names: set[str] | None = None,
    metadata: Mapping[str, str] | None = None,
    n_m: tuple[int, int] | None = None,
) -> Path:
    """Write a packed checkpoint atomically to one safetensors file and return its path.

    ``sparse_names`` are the tensors considered for packing (default: every 2-D floating tensor);
    each gets the smallest of bitmask / N:M (when ``n_m`` is given) / dense.  ``metadata`` (str to
    str, not using the reserved keys) is stored alongside the format keys.
    """
    user = _check_metadata(metadata)
    encoded = _encode(state_dict, sparse_names, n_m)
    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, dict] = {}
    for name, stored, entry in encoded:
        tensors.update(stored)
        if entry is not None:
            index[name] = entry
    path = Path(path)
    _write_safetensors(path, tensors, _packed_metadata(index, user))
    return path


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; unreadable files raise ArtifactError."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except FileNotFoundError:
        raise ArtifactError(f"checkpoint file not found: {path}") from None
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        detail = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ArtifactError(f"cannot read safetensors file {path}: {detail}") from None
    return tensors, metadata


def parse_index(metadata: Mapping[str, str], path: Path) -> dict[str, dict]:
    if metadata.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path} is not an ecoflap packed checkpoint (format={metadata.get('format')!r})")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: unsupported packed format version {version}")
    try:
        index = json.loads(metadata.get(INDEX_KEY, ""))
    except ValueError:
        raise ArtifactError(f"{path}: packed tensor index is missing or not valid JSON") from None
    if not isinstance(index, dict) or not all(isinstance(v, dict) for v in index.values()):
        raise ArtifactError(f"{path}: packed tensor index must be a JSON object of objects")
    return index


def _split_parts(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Separate plain tensors from ``<name>.__<part>`` parts, grouped by name."""
    dense: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        base, sep, part = key.rpartition(PART_SEPARATOR)
        if sep and base and part in _ALL_PARTS:
            parts.setdefault(base, {})[part] = t
        else:
            dense[key] = t
    return dense, parts


def _check_entry_shape(name: str, entry: dict, own: Mapping[str, torch.Tensor], path: Path, expected: Any) -> None:
    """Before expanding: the index entry, the stored ``shape`` part, the values' dtype and the
    shape the caller expects (the model's) must agree, so no size is taken from one field alone."""
    shape, dtype = entry.get("shape"), entry.get("dtype")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(v) is int and v >= 0 for v in shape)):
        raise ArtifactError(f"{path}: {name}: malformed shape {shape!r} in the packed index")
    if "shape" in own and list(_shape_of(own, f"{path}: {name}")) != shape:
        raise ArtifactError(f"{path}: {name}: stored shape {own['shape'].tolist()} does not match the index {shape}")
    if "values" in own and str(own["values"].dtype).removeprefix("torch.") != dtype:
        raise ArtifactError(
            f"{path}: {name}: stored values are {own['values'].dtype}, which does not match the index ({dtype})"
        )
    if expected is not None and name in expected and tuple(expected[name]) != tuple(shape):
        raise ArtifactError(f"{path}: {name} has shape {shape}, the model expects {list(expected[name])}")


def _decode_entry(
    name: str, entry: dict, dense: dict, parts: dict, path: Path, expected: Mapping[str, tuple[int, ...]] | None
) -> torch.Tensor:
    layout = entry.get("layout")
    if layout == "dense":
        if name not in dense:
            raise ArtifactError(f"{path}: tensor {name!r} is missing")
        t = dense.pop(name)
    elif layout in LAYOUT_PARTS:
        own = parts.pop(name, {})
        extra = sorted(own.keys() - set(LAYOUT_PARTS[layout]))
        if extra:
            raise ArtifactError(f"{path}: {name}: unexpected part(s) {', '.join(extra)} for layout {layout}")
        _require_parts(own, LAYOUT_PARTS[layout], f"{path}: {name}")
        _check_entry_shape(name, entry, own, path, expected)
        t = unpack(own, layout, f"{path}: {name}")
    else:
        raise ArtifactError(f"{path}: {name}: unknown packed layout {layout!r}")
    if entry.get("dtype") != str(t.dtype).removeprefix("torch.") or entry.get("shape") != list(t.shape):
        raise ArtifactError(
            f"{path}: {name}: stored {t.dtype} {list(t.shape)} does not match the index "
            f"({entry.get('dtype')} {entry.get('shape')})"
        )
    return t


def _decode(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    path: Path,
    expected: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, torch.Tensor]:
    index = parse_index(metadata, path)
    dense, parts = _split_parts(tensors)
    clash = sorted(dense.keys() & parts.keys())
    if clash:
        raise ArtifactError(f"{path}: {clash[0]} is stored both dense and packed")
    out = {name: _decode_entry(name, entry, dense, parts, path, expected) for name, entry in index.items()}
    if parts:
        raise ArtifactError(f"{path}: packed parts of {min(parts)!r} are not in the tensor index")
    clash = sorted(dense.keys() & out.keys())
    if clash:
        raise ArtifactError(f"{path}: tensor {clash[0]!r} is stored twice")
    out.update(dense)
    return out


def load_packed(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a packed checkpoint back to dense tensors.

    Returns ``(tensors, metadata)`` where ``metadata`` is the file's full safetensors metadata (the
    user's keys plus ``format``, ``format_version`` and the JSON tensor index).  Any unreadable,
    truncated, foreign or inconsistent file raises ArtifactError.
    """
    path = Path(path)
    tensors, metadata = _read_safetensors(path)
    return _decode(tensors, metadata, path), metadata


def is_packed_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a readable safetensors file marked as an ecoflap packed checkpoint."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("format") == FORMAT_NAME
    except (SafetensorError, OSError, RuntimeError, ValueError):
        return False


# --------------------------------------------------------------------------- sharded checkpoints


def _plan_shards(
    encoded: list[tuple[str, dict[str, torch.Tensor], dict | None]], max_shard_bytes: int
) -> list[list[int]]:
    """Greedy grouping of tensors (all parts of one tensor together) into shards."""
    shards: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, (_, stored, _) in enumerate(encoded):
        nbytes = packed_nbytes(stored)
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def is_weight_file(name: str) -> bool:
    """Whether a file name is one of a checkpoint's weight files or shard indexes (dense or packed)."""
    names = (SINGLE_FILE, INDEX_FILE, PACKED_SINGLE_FILE, PACKED_INDEX_FILE)
    return name in names or bool(_SHARD_RE.match(name) or _PACKED_SHARD_RE.match(name))


def weight_file_names(total: int, packed: bool) -> tuple[list[str], str]:
    """The weight file names of a checkpoint with ``total`` shards, and its index file's name."""
    if total == 1:
        return [PACKED_SINGLE_FILE if packed else SINGLE_FILE], PACKED_INDEX_FILE if packed else INDEX_FILE
    stem = "ecoflap-packed" if packed else "model"
    names = [f"{stem}-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]
    return names, PACKED_INDEX_FILE if packed else INDEX_FILE


def _remove_stale(directory: Path, keep: set[str]) -> None:
    """Delete checkpoint files of an earlier save that the new one does not use."""
    for entry in directory.iterdir():
        if is_weight_file(entry.name) and entry.name not in keep and entry.is_file():
            entry.unlink()


def save_sharded(
    state_dict: Mapping[str, torch.Tensor],
    directory: str | os.PathLike[str],
    *,
    packed: bool,
    max_shard_bytes: int,
    sparse_names: set[str] | None = None,
    metadata: Mapping[str, str] | None = None,
    n_m: tuple[int, int] | None = None,
) -> list[Path]:
    """Write a (packed or dense) checkpoint in Hugging Face shard layout; return the files written.

    Shards hold at most ``max_shard_bytes`` of tensor data unless one tensor alone is larger; the
    parts of a packed tensor always share a shard.  One shard is written as ``model.safetensors``;
    more as ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json`` (written
    last); packed files are named ``ecoflap-packed...`` instead of ``model...``.  Checkpoint files
    of an earlier save in ``directory`` are removed afterwards.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    user = _check_metadata(metadata)
    if packed:
        encoded = _encode(state_dict, sparse_names, n_m)
    else:
        encoded = [(name, {name: t}, None) for name, t in state_dict.items()]
    shards = _plan_shards(encoded, max_shard_bytes)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    total = len(shards)
    names, index_name = weight_file_names(total, packed)
    weight_map: dict[str, str] = {}
    for file_name, members in zip(names, shards):
        tensors = {k: v for i in members for k, v in encoded[i][1].items()}
        index = {name: entry for name, _, entry in (encoded[i] for i in members) if entry is not None}
        meta = _packed_metadata(index, user) if packed else {**user, "format": "pt"}
        _write_safetensors(directory / file_name, tensors, meta)
        weight_map.update({encoded[i][0]: file_name for i in members})
    written = [directory / n for n in names]
    if total > 1:
        size = sum(packed_nbytes(stored) for _, stored, _ in encoded)
        index_meta: dict = {"total_size": size}
        if packed:
            index_meta.update(format=FORMAT_NAME, format_version=FORMAT_VERSION)
        body = json.dumps({"metadata": index_meta, "weight_map": weight_map}, indent=2, sort_keys=True)
        write_atomic(directory / index_name, (body + "\n").encode())
        written.append(directory / index_name)
    _remove_stale(directory, {p.name for p in written})
    return written


def _load_any(path: Path, expected: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """Dense tensors of one file, packed or plain."""
    tensors, metadata = _read_safetensors(path)
    if metadata.get("format") == FORMAT_NAME or INDEX_KEY in metadata:
        return _decode(tensors, metadata, path, expected)
    _, parts = _split_parts(tensors)
    if any({"values", "shape"} <= own.keys() for own in parts.values()):
        raise ArtifactError(f"{path} holds packed parts but no packed-format metadata")
    return tensors


def cache_repo_root(directory: str | os.PathLike[str]) -> Path | None:
    """The repository folder (``models--org--name``) of a Hugging Face cache snapshot directory
    (``models--org--name/snapshots/REV``), whose files are symlinks into ``../../blobs/``; else None."""
    try:
        real = Path(directory).resolve()
    except (OSError, RuntimeError):
        return None
    repo = real.parent.parent
    if real.parent.name == "snapshots" and repo.name.startswith(("models--", "datasets--", "spaces--")):
        return repo
    return None


def link_inside(directory: str | os.PathLike[str], path: str | os.PathLike[str], *, nested: bool = False) -> bool:
    """Whether ``path`` (symlinks resolved) lies in checkpoint ``directory``: in it (directly, or
    at any depth with ``nested``), or, for a Hugging Face cache snapshot, in its repository's
    ``blobs/`` folder, where the hub stores the files its snapshot links to."""
    try:
        target, real = Path(path).resolve(), Path(directory).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return False
    if target.parent == real or (nested and real in target.parents):
        return True
    repo = cache_repo_root(real)
    return repo is not None and target.parent == repo / "blobs"


def file_inside(directory: Path, name: str, where: Path) -> Path:
    """``directory / name`` for a weight file an index names; ArtifactError unless it is a plain
    file name whose file (symlinks resolved) lies in ``directory`` itself, or in the ``blobs/``
    of the Hugging Face cache repository whose snapshot ``directory`` is."""
    if not name or name in (".", "..") or Path(name).name != name or "\\" in name or "\0" in name:
        raise ArtifactError(f"{where}: shard {name!r} is not a file name in the checkpoint directory")
    path = directory / name
    inside = link_inside(directory, path)
    if not inside:
        raise ArtifactError(f"{where}: shard {name!r} points outside the checkpoint directory")
    return path


def read_weight_map(index_path: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index; every file it names must lie in the index's directory."""
    try:
        data = json.loads(index_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read shard index {index_path}: {(str(exc).splitlines() or [''])[0]}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ArtifactError(f"{index_path}: 'weight_map' must be an object mapping names to files")
    for file_name in set(weight_map.values()):
        file_inside(index_path.parent, file_name, index_path)
    return weight_map


def find_weights(directory: str | os.PathLike[str]) -> tuple[Path | None, list[Path]]:
    """``(index, files)`` of a checkpoint directory: its shard index (None for one file) and its
    weight files in index order, every one inside ``directory``; ``(None, [])`` when it has none.

    Packed names are looked for first; a directory holding both packed and dense weights is refused.
    """
    directory = Path(directory)
    found: list[tuple[Path | None, list[Path]]] = []
    for index_name, single in ((PACKED_INDEX_FILE, PACKED_SINGLE_FILE), (INDEX_FILE, SINGLE_FILE)):
        index = directory / index_name
        if index.is_file():
            names = list(dict.fromkeys(read_weight_map(index).values()))
            found.append((index, [file_inside(directory, n, index) for n in names]))
        elif (directory / single).is_file():
            found.append((None, [file_inside(directory, single, directory)]))
    if len(found) > 1:
        raise ArtifactError(f"{directory} holds both packed ({PACKED_SINGLE_FILE}...) and dense weights")
    return found[0] if found else (None, [])


def check_readable(files: Iterable[Path]) -> None:
    """Open each safetensors file's header (not its data): a truncated file, a broken header or
    a missing file raises ArtifactError naming it, before another library reads it."""
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as fh:
                fh.metadata()
        except FileNotFoundError:
            raise ArtifactError(f"checkpoint file not found: {path}") from None
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            detail = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ArtifactError(f"cannot read safetensors file {path}: {detail}") from None


def load_sharded(
    directory: str | os.PathLike[str], expected: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, torch.Tensor]:
    """Read a checkpoint written by :func:`save_sharded` (or any HF-style safetensors checkpoint).

    ``directory`` may hold a shard index with its shards, or one weight file (packed or dense
    names); a path to a single ``.safetensors`` file is accepted too.  Packed and dense files both
    load to dense tensors; missing shards, missing or unexpected tensors raise ArtifactError.
    ``expected`` (name -> shape, e.g. the model's) is checked against each packed tensor's recorded
    shape before it is expanded.
    """
    directory = Path(directory)
    if directory.is_file():
        return _load_any(directory, expected)
    index_path, files = find_weights(directory)
    if not files:
        raise ArtifactError(f"{directory} holds neither {INDEX_FILE} nor {SINGLE_FILE} (nor {PACKED_SINGLE_FILE})")
    if index_path is None:
        return _load_any(files[0], expected)
    weight_map = read_weight_map(index_path)
    by_file: dict[str, set[str]] = {}
    for name, file_name in weight_map.items():
        by_file.setdefault(file_name, set()).add(name)
    out: dict[str, torch.Tensor] = {}
    for file_name, names in by_file.items():
        tensors = _load_any(directory / file_name, expected)
        missing, extra = sorted(names - tensors.keys()), sorted(tensors.keys() - names)
        if missing or extra:
            what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
            raise ArtifactError(f"{directory / file_name}: does not match the shard index ({what})")
        out.update(tensors)
    return {name: out[name] for name in weight_map}
