"""Tests for the packed sparse checkpoint layout (ecoflap_cli.io.packed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from ecoflap_cli.errors import ArtifactError
from ecoflap_cli.io.packed import (
    FORMAT_NAME,
    INDEX_FILE,
    INDEX_KEY,
    PACKED_INDEX_FILE,
    PACKED_SINGLE_FILE,
    SINGLE_FILE,
    choose_layout,
    dense_nbytes,
    is_packed_file,
    load_packed,
    load_sharded,
    pack_bitmask,
    pack_nm,
    packed_nbytes,
    save_packed,
    save_sharded,
    unpack_bitmask,
    unpack_nm,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.element_size()])


def assert_identical(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


def sparse(rows: int, cols: int, sparsity: float, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random tensor with exactly round(sparsity * numel) zeros."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, cols, generator=g).to(dtype)
    t[t == 0] = 1.0
    flat = t.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[: round(sparsity * flat.numel())]] = 0
    return t


def nm_sparse(rows: int, cols: int, n: int, m: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random tensor with exactly n non-zeros in every group of m columns."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, cols // m, m, generator=g).to(dtype)
    t[t == 0] = 1.0
    drop = torch.rand(rows, cols // m, m, generator=g).argsort(-1)[..., : m - n]
    t.scatter_(-1, drop, 0)
    return t.reshape(rows, cols)


def rewrite(path: Path, mutate) -> None:
    """Rewrite a safetensors file after ``mutate(tensors, metadata)`` edits it in place."""
    with safe_open(str(path), framework="pt") as fh:
        metadata = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    mutate(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


# --------------------------------------------------------------------------- bitmask layout


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(7, 13), (5, 1), (4, 64), (1, 9)])
def test_bitmask_round_trip_bit_identical(dtype, sparsity, shape):
    t = sparse(*shape, sparsity, dtype)
    parts = pack_bitmask(t)
    rows, cols = shape
    assert parts["values"].dtype == dtype
    assert parts["values"].numel() == int((t != 0).sum())
    assert tuple(parts["bitmask"].shape) == (rows, math.ceil(cols / 8))
    assert parts["bitmask"].dtype == torch.uint8
    assert parts["shape"].tolist() == [rows, cols]
    assert_identical(unpack_bitmask(parts), t)


def test_bitmask_layout_details():
    t = torch.tensor([[1.0, 0, 0, 2.0, 0, 0, 0, 0, 0, 3.0], [0, 4.0, 0, 0, 0, 0, 0, 0, 5.0, 0]])
    parts = pack_bitmask(t)
    assert parts["values"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    # bit j of byte b is column 8*b+j (little-endian)
    assert parts["bitmask"].tolist() == [[0b00001001, 0b00000010], [0b00000010, 0b00000001]]
    assert parts["row_offsets"].tolist() == [0, 3]
    assert parts["shape"].dtype == torch.int64 and parts["row_offsets"].dtype == torch.int64


@pytest.mark.parametrize("dtype", DTYPES)
def test_negative_zero_and_nan_round_trip(dtype):
    t = sparse(6, 13, 0.5, dtype)
    t[0, 0] = -0.0
    t[1, 3] = float("nan")
    t[2, 12] = -float("nan")
    t[3, 5] = float("inf")
    parts = pack_bitmask(t)
    assert parts["values"].numel() == int((bits(t) != 0).sum())
    out = unpack_bitmask(parts)
    assert_identical(out, t)
    assert torch.signbit(out[0, 0]) and out[0, 0] == 0


def test_non_contiguous_input():
    t = sparse(12, 10, 0.5, torch.float32).t()
    assert_identical(unpack_bitmask(pack_bitmask(t)), t)


def test_empty_shapes():
    for shape in [(0, 5), (3, 0), (0, 0)]:
        t = torch.zeros(shape, dtype=torch.float16)
        assert_identical(unpack_bitmask(pack_bitmask(t)), t)


@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(0, 9),
    cols=st.integers(0, 40),
    sparsity=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
    specials=st.booleans(),
)
def test_bitmask_round_trip_property(rows, cols, sparsity, dtype, seed, specials):
    t = sparse(rows, cols, sparsity, dtype, seed)
    if specials and t.numel() >= 2:
        t.view(-1)[0] = -0.0
        t.view(-1)[-1] = float("nan")
    parts = pack_bitmask(t)
    assert parts["values"].numel() == int((bits(t) != 0).sum())
    assert_identical(unpack_bitmask(parts), t)


# --------------------------------------------------------------------------- N:M layout


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_round_trip_and_smaller_than_bitmask(dtype, n, m):
    t = nm_sparse(16, 64, n, m, dtype)
    parts = pack_nm(t, n, m)
    assert tuple(parts["values"].shape) == (16, 64 * n // m)
    assert parts["nm"].tolist() == [n, m]
    assert_identical(unpack_nm(parts), t)
    assert packed_nbytes(parts) < packed_nbytes(pack_bitmask(t)) < dense_nbytes(t)
    layout, chosen = choose_layout(t, (n, m))
    assert layout == "nm" and chosen is not None
    assert_identical(unpack_nm(chosen), t)


def test_nm_groups_with_fewer_than_n_and_specials():
    t = nm_sparse(8, 32, 2, 4, torch.bfloat16)
    t[0, :4] = 0  # empty group
    t[1, 4:8] = torch.tensor([0.0, 0.0, 0.0, -0.0])  # only -0.0 kept
    t[2, 8:12] = torch.tensor([float("nan"), 0.0, 0.0, 0.0])
    assert_identical(unpack_nm(pack_nm(t, 2, 4)), t)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(0, 6),
    groups=st.integers(0, 6),
    nm=st.sampled_from([(1, 2), (2, 4), (4, 8), (3, 8), (2, 2), (1, 16)]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_nm_round_trip_property(rows, groups, nm, dtype, seed):
    n, m = nm
    t = nm_sparse(rows, groups * m, n, m, dtype, seed)
    assert_identical(unpack_nm(pack_nm(t, n, m)), t)


def test_pack_nm_rejects_non_nm_tensor():
    with pytest.raises(ValueError):
        pack_nm(sparse(4, 8, 0.0, torch.float32), 2, 4)
    with pytest.raises(ValueError):
        pack_nm(nm_sparse(4, 8, 2, 4, torch.float32)[:, :6], 2, 4)


def test_choose_layout():
    assert choose_layout(sparse(8, 64, 0.0, torch.float16))[0] == "dense"
    assert choose_layout(sparse(8, 64, 0.1, torch.float16))[0] == "dense"
    assert choose_layout(torch.zeros(64))[0] == "dense"
    layout, parts = choose_layout(sparse(8, 64, 0.7, torch.float16), (2, 4))
    assert layout == "bitmask" and parts is not None


# --------------------------------------------------------------------------- files


def test_file_round_trip_with_metadata(tmp_path):
    sd = {
        "a.weight": sparse(16, 40, 0.5, torch.float16),
        "b.weight": nm_sparse(8, 32, 2, 4, torch.bfloat16),
        "c.weight": sparse(8, 8, 0.0, torch.float32),
        "a.bias": torch.randn(16),
        "step": torch.tensor([3], dtype=torch.int64),
    }
    path = tmp_path / "m.safetensors"
    save_packed(sd, path, metadata={"model": "tiny", "sparsity": "0.5"}, n_m=(2, 4))
    assert is_packed_file(path)
    assert not list(tmp_path.glob(".*tmp"))
    out, meta = load_packed(path)
    assert out.keys() == sd.keys()
    for k, v in sd.items():
        assert_identical(out[k], v)
    assert meta["model"] == "tiny" and meta["sparsity"] == "0.5"
    assert meta["format"] == FORMAT_NAME and meta["format_version"] == "1"
    index = json.loads(meta[INDEX_KEY])
    assert index["a.weight"]["layout"] == "bitmask" and index["a.weight"]["dtype"] == "float16"
    assert index["a.weight"]["sparsity"] == pytest.approx(0.5)
    assert index["b.weight"]["layout"] == "nm" and index["b.weight"]["n_m"] == [2, 4]
    assert index["c.weight"]["layout"] == "dense"
    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
    assert {"a.weight.__values", "a.weight.__bitmask", "a.weight.__shape", "a.weight.__row_offsets"} <= keys
    assert {"b.weight.__values", "b.weight.__indices", "c.weight", "a.bias"} <= keys


def test_sparse_names_restricts_packing(tmp_path):
    sd = {"x": sparse(8, 64, 0.9, torch.float32), "y": sparse(8, 64, 0.9, torch.float32)}
    path = tmp_path / "m.safetensors"
    save_packed(sd, path, sparse_names={"x"})
    with safe_open(str(path), framework="pt") as fh:
        assert "y" in set(fh.keys()) and "x" not in set(fh.keys())
    out, _ = load_packed(path)
    assert_identical(out["x"], sd["x"])
    assert_identical(out["y"], sd["y"])
    with pytest.raises(ValueError):
        save_packed(sd, path, sparse_names={"missing"})


def test_reserved_names_and_metadata_rejected(tmp_path):
    with pytest.raises(ValueError):
        save_packed({"w.__values": torch.zeros(2)}, tmp_path / "a.safetensors")
    with pytest.raises(ValueError):
        save_packed({"w": torch.zeros(2)}, tmp_path / "a.safetensors", metadata={"format": "x"})


def test_shared_storage_tensors_are_saved(tmp_path):
    w = torch.randn(4, 4)
    path = tmp_path / "m.safetensors"
    save_packed({"a": w, "b": w}, path, sparse_names=set())
    out, _ = load_packed(path)
    assert_identical(out["a"], w)
    assert_identical(out["b"], w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_file_half_the_size_at_50_percent(tmp_path, dtype):
    t = sparse(256, 512, 0.5, dtype)
    dense_path, packed_path = tmp_path / "dense.safetensors", tmp_path / "packed.safetensors"
    save_file({"w": t}, str(dense_path))
    save_packed({"w": t}, packed_path)
    ratio = packed_path.stat().st_size / dense_path.stat().st_size
    assert ratio <= 0.6, ratio


def test_is_packed_file_false_for_plain_and_missing(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    assert not is_packed_file(plain)
    assert not is_packed_file(tmp_path / "nope.safetensors")
    with pytest.raises(ArtifactError, match="not an ecoflap packed"):
        load_packed(plain)


# --------------------------------------------------------------------------- corruption


@pytest.fixture
def packed_file(tmp_path):
    t = sparse(6, 13, 0.5, torch.float16)
    path = tmp_path / "m.safetensors"
    save_packed({"w": t, "nm": nm_sparse(4, 16, 2, 4, torch.float32)}, path, n_m=(2, 4))
    return path


def corrupt_bitmask_length(tensors, metadata):
    tensors["w.__bitmask"] = torch.cat([tensors["w.__bitmask"], tensors["w.__bitmask"][:, :1] * 0], dim=1)


def corrupt_values_count(tensors, metadata):
    tensors["w.__values"] = tensors["w.__values"][:-1].clone()


def corrupt_version(tensors, metadata):
    metadata["format_version"] = "2"


def corrupt_padding(tensors, metadata):
    mask = tensors["w.__bitmask"].clone()
    mask[0, 1] |= 0x80  # column 15 of a 13-column tensor
    tensors["w.__bitmask"] = mask


def corrupt_row_offsets(tensors, metadata):
    offsets = tensors["w.__row_offsets"].clone()
    offsets[2] += 1
    tensors["w.__row_offsets"] = offsets


def corrupt_missing_part(tensors, metadata):
    del tensors["w.__row_offsets"]


def corrupt_orphan_part(tensors, metadata):
    index = json.loads(metadata[INDEX_KEY])
    del index["w"]
    metadata[INDEX_KEY] = json.dumps(index)


def corrupt_index_json(tensors, metadata):
    metadata[INDEX_KEY] = "{not json"


def corrupt_layout(tensors, metadata):
    index = json.loads(metadata[INDEX_KEY])
    index["w"]["layout"] = "csr"
    metadata[INDEX_KEY] = json.dumps(index)


def corrupt_dtype(tensors, metadata):
    tensors["w.__values"] = tensors["w.__values"].float()


def corrupt_nm_code(tensors, metadata):
    idx = tensors["nm.__indices"].clone()
    idx[0, 0] = 0b111  # rank 7 >= C(4, 2) = 6
    tensors["nm.__indices"] = idx


def corrupt_nm_values(tensors, metadata):
    tensors["nm.__values"] = tensors["nm.__values"][:, :-1].clone()


@pytest.mark.parametrize(
    "mutate,message",
    [
        (corrupt_bitmask_length, "w: bitmask has shape"),
        (corrupt_values_count, "w: bitmask keeps"),
        (corrupt_version, "unsupported packed format version 2"),
        (corrupt_padding, "w: bitmask has non-zero padding bits"),
        (corrupt_row_offsets, "w: row_offsets"),
        (corrupt_missing_part, "w: packed tensor is missing part"),
        (corrupt_orphan_part, "not in the tensor index"),
        (corrupt_index_json, "not valid JSON"),
        (corrupt_layout, "unknown packed layout"),
        (corrupt_dtype, "does not match the index"),
        (corrupt_nm_code, "nm: N:M indices hold an out-of-range"),
        (corrupt_nm_values, "nm: N:M values have shape"),
    ],
)
def test_corrupt_file_raises_artifact_error(packed_file, mutate, message):
    rewrite(packed_file, mutate)
    with pytest.raises(ArtifactError, match=message):
        load_packed(packed_file)


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1, -200])
def test_truncated_file_raises_artifact_error(packed_file, keep):
    data = packed_file.read_bytes()
    packed_file.write_bytes(data[:keep])
    with pytest.raises(ArtifactError):
        load_packed(packed_file)
    assert not is_packed_file(packed_file)


def test_missing_file_raises_artifact_error(tmp_path):
    with pytest.raises(ArtifactError):
        load_packed(tmp_path / "absent.safetensors")


def test_unpack_bitmask_errors_name_the_tensor():
    parts = pack_bitmask(sparse(3, 9, 0.5, torch.float32))
    bad = dict(parts, bitmask=parts["bitmask"][:, :1].clone())
    with pytest.raises(ArtifactError, match=r"^layer\.3: bitmask has shape"):
        unpack_bitmask(bad, "layer.3")
    with pytest.raises(ArtifactError, match="bitmask keeps"):
        unpack_bitmask(dict(parts, values=parts["values"][1:].clone()), "x")


def test_unpack_nm_padding_bits():
    parts = pack_nm(nm_sparse(2, 4, 2, 4, torch.float32), 2, 4)  # 1 group: 3 bits of 8 used
    idx = parts["indices"].clone()
    idx[1, 0] |= 0x80
    with pytest.raises(ArtifactError, match="padding"):
        unpack_nm(dict(parts, indices=idx))


# --------------------------------------------------------------------------- sharding


def shard_state_dict() -> dict[str, torch.Tensor]:
    sd = {}
    for i in range(5):
        sd[f"layers.{i}.weight"] = sparse(32, 64, 0.5, torch.float16, seed=i)
        sd[f"layers.{i}.bias"] = torch.randn(32, dtype=torch.float16)
    sd["embed.weight"] = torch.randn(10, 64)
    return sd


@pytest.mark.parametrize("packed", [True, False])
def test_sharded_round_trip(tmp_path, packed):
    sd = shard_state_dict()
    files = save_sharded(sd, tmp_path, packed=packed, max_shard_bytes=4096)
    stem, index_file = ("ecoflap-packed", PACKED_INDEX_FILE) if packed else ("model", INDEX_FILE)
    shards = sorted(tmp_path.glob(f"{stem}-*-of-*.safetensors"))
    assert len(shards) >= 3
    assert (tmp_path / index_file) in files and not (tmp_path / SINGLE_FILE).exists()
    total = len(shards)
    assert [p.name for p in shards] == [f"{stem}-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in shards] + [index_file])
    index = json.loads((tmp_path / index_file).read_text())
    assert set(index["weight_map"]) == set(sd)
    assert index["metadata"]["total_size"] > 0
    assert all(is_packed_file(p) == packed for p in shards)
    out = load_sharded(tmp_path)
    assert out.keys() == sd.keys()
    for k, v in sd.items():
        assert_identical(out[k], v)


def test_sharded_single_file_and_stale_cleanup(tmp_path):
    sd = shard_state_dict()
    save_sharded(sd, tmp_path, packed=True, max_shard_bytes=4096)
    files = save_sharded(sd, tmp_path, packed=True, max_shard_bytes=10**9)
    assert files == [tmp_path / PACKED_SINGLE_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == [PACKED_SINGLE_FILE]
    out = load_sharded(tmp_path)
    for k, v in sd.items():
        assert_identical(out[k], v)
    assert load_sharded(tmp_path / PACKED_SINGLE_FILE).keys() == sd.keys()


def test_packed_shards_smaller_than_dense(tmp_path):
    sd = shard_state_dict()
    save_sharded(sd, tmp_path / "d", packed=False, max_shard_bytes=10**9)
    save_sharded(sd, tmp_path / "p", packed=True, max_shard_bytes=10**9)
    assert (tmp_path / "p" / PACKED_SINGLE_FILE).stat().st_size < (tmp_path / "d" / SINGLE_FILE).stat().st_size


def test_load_sharded_errors(tmp_path):
    with pytest.raises(ArtifactError, match="holds neither"):
        load_sharded(tmp_path)
    sd = shard_state_dict()
    save_sharded(sd, tmp_path, packed=True, max_shard_bytes=4096)
    index = json.loads((tmp_path / PACKED_INDEX_FILE).read_text())
    index["weight_map"]["ghost.weight"] = next(iter(index["weight_map"].values()))
    (tmp_path / PACKED_INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ArtifactError, match="does not match the shard index"):
        load_sharded(tmp_path)
    max(tmp_path.glob("ecoflap-packed-*.safetensors")).unlink()
    del index["weight_map"]["ghost.weight"]
    (tmp_path / PACKED_INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ArtifactError, match="not found"):
        load_sharded(tmp_path)
    (tmp_path / PACKED_INDEX_FILE).write_text("{")
    with pytest.raises(ArtifactError, match="cannot read shard index"):
        load_sharded(tmp_path)


def test_packed_parts_without_metadata_are_not_loaded_silently(tmp_path):
    parts = pack_bitmask(sparse(4, 8, 0.5, torch.float32))
    save_file({f"w.__{k}": v for k, v in parts.items()}, str(tmp_path / SINGLE_FILE))
    with pytest.raises(ArtifactError, match="no packed-format metadata"):
        load_sharded(tmp_path)
