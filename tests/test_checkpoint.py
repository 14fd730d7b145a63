"""Pruned checkpoints on disk: dense and packed writing, conversion, loading, corruption."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from ecoflap_cli.cli.app import app
from ecoflap_cli.errors import ArtifactError, EcoflapError
from ecoflap_cli.io.checkpoint import convert_checkpoint, parse_size
from ecoflap_cli.io.layout import checkpoint_layout, is_packed_checkpoint, weight_bytes, weight_files
from ecoflap_cli.io.loading import LoadOptions, load_model
from ecoflap_cli.io.packed import (
    INDEX_FILE,
    INDEX_KEY,
    PACKED_INDEX_FILE,
    PACKED_SINGLE_FILE,
    PART_SEPARATOR,
    SINGLE_FILE,
    load_sharded,
    save_sharded,
)
from ecoflap_cli.io.pruned import load_pruned

os.environ["HF_HUB_OFFLINE"] = "1"
runner = CliRunner(env={"HF_HUB_OFFLINE": "1"})
INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cli(*args: str, ok: bool = True):
    result = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def prune(model: Path, out: Path, calib: Path, *extra: str) -> Path:
    cli(
        "prune",
        "-m",
        model,
        "-o",
        out,
        "-s",
        "0.5",
        "--allocator",
        "uniform",
        "--calib",
        calib,
        "--samples",
        "4",
        "--seqlen",
        "16",
        "--device",
        "cpu",
        *extra,
    )
    return out


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for name, t in a.items():
        u = b[name]
        assert t.dtype == u.dtype and t.shape == u.shape, name
        assert torch.equal(
            t.contiguous().view(INT_VIEW[t.element_size()]), u.contiguous().view(INT_VIEW[u.element_size()])
        ), name


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[2, 5, 9, 17, 33, 4, 8, 60]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def plan_tensors(directory: Path) -> list[str]:
    plan = json.loads((directory / "plan.json").read_text())
    return [t["name"] for g in plan["groups"] for t in g["tensors"]]


def packed_index(path: Path) -> dict[str, dict]:
    with safe_open(str(path), framework="pt") as fh:
        return json.loads(fh.metadata()[INDEX_KEY])


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_round_trip_dense_packed_dense(family, dtype, request, tmp_path, calib_text):
    model = request.getfixturevalue(f"tiny_{family}")
    solver = "wanda" if dtype != "bfloat16" else "magnitude"
    dense = prune(model, tmp_path / "dense", calib_text, "--dtype", dtype, "--solver", solver)
    cli("convert", dense, "-o", tmp_path / "packed", "--to", "packed")
    cli("convert", tmp_path / "packed", "-o", tmp_path / "dense2", "--to", "dense")

    assert checkpoint_layout(dense) == "dense" and checkpoint_layout(tmp_path / "dense2") == "dense"
    assert is_packed_checkpoint(tmp_path / "packed")
    original = load_sharded(dense)
    assert {t.dtype for t in original.values()} == {DTYPES[dtype]}
    assert_same_state(original, load_sharded(tmp_path / "packed"))
    assert_same_state(original, load_sharded(tmp_path / "dense2"))
    # every pruned tensor is packed, and the packed weights are smaller
    index = packed_index(tmp_path / "packed" / PACKED_SINGLE_FILE)
    assert {index[n]["layout"] for n in plan_tensors(dense)} == {"bitmask"}
    assert weight_bytes(tmp_path / "packed") < weight_bytes(dense)
    # the non-weight files travel unchanged
    for name in ("plan.json", "ecoflap_report.json", "tokenizer.json"):
        assert (tmp_path / "packed" / name).read_bytes() == (dense / name).read_bytes()
    # config.json gains the packed marker, and loses it again
    marked = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert marked.pop("ecoflap_packed") == {"format": "ecoflap.packed", "format_version": "1"}
    assert "ecoflap_cli.api.load_pruned" in marked.pop("transformers_weights")
    assert marked == json.loads((dense / "config.json").read_text())
    assert (tmp_path / "dense2" / "config.json").read_bytes() == (dense / "config.json").read_bytes()

    from transformers import AutoModelForCausalLM

    pruned = AutoModelForCausalLM.from_pretrained(dense).eval()
    packed_model = load_pruned(tmp_path / "packed")
    assert packed_model.dtype == DTYPES[dtype] and not packed_model.training
    assert torch.equal(logits(packed_model), logits(pruned))
    assert torch.equal(logits(load_pruned(tmp_path / "dense2")), logits(pruned))


@pytest.fixture(scope="module")
def opt_pair(tmp_path_factory, tiny_opt, calib_text) -> tuple[Path, Path]:
    """The same pruning of tiny OPT written dense and with --packed."""
    root = tmp_path_factory.mktemp("opt_pair")
    dense = prune(tiny_opt, root / "dense", calib_text)
    packed = prune(tiny_opt, root / "packed", calib_text, "--packed")
    return dense, packed


def test_prune_packed_matches_dense_prune(opt_pair):
    dense, packed = opt_pair
    assert checkpoint_layout(packed) == "packed"
    assert_same_state(load_sharded(dense), load_sharded(packed))
    names = {p.name for p in packed.iterdir()}
    assert names - {PACKED_SINGLE_FILE} == {p.name for p in dense.iterdir()} - {SINGLE_FILE}
    assert {
        "config.json",
        "generation_config.json",
        "plan.json",
        "ecoflap_report.json",
        "ecoflap_checksums.json",
        "tokenizer.json",
        PACKED_SINGLE_FILE,
    } <= names
    # the tied lm_head is dropped as save_pretrained drops it, and tied again on load
    assert "lm_head.weight" not in load_sharded(packed)
    model = load_pruned(packed)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_packed_is_smaller_for_pruned_tensors(opt_pair):
    dense, packed = opt_pair
    index = packed_index(packed / PACKED_SINGLE_FILE)
    with (
        safe_open(str(dense / SINGLE_FILE), framework="pt") as d,
        safe_open(str(packed / PACKED_SINGLE_FILE), framework="pt") as p,
    ):
        parts = [k for k in p.keys() if PART_SEPARATOR in k]  # noqa: SIM118
        for name in plan_tensors(dense):
            entry = index[name]
            assert entry["layout"] == "bitmask" and entry["sparsity"] == pytest.approx(0.5)
            dense_bytes = d.get_tensor(name).numel() * 4
            packed_bytes = sum(
                p.get_tensor(k).numel() * p.get_tensor(k).element_size()
                for k in parts
                if k.startswith(name + PART_SEPARATOR)
            )
            assert packed_bytes < 0.6 * dense_bytes
    with safe_open(str(packed / PACKED_SINGLE_FILE), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "ecoflap.packed" and meta["format_version"] == "1"


def test_output_directory_is_not_private(opt_pair):
    for directory in opt_pair:
        assert stat.S_IMODE(directory.stat().st_mode) & 0o055, oct(directory.stat().st_mode)
        assert not list(directory.parent.glob(".*.tmp"))


def test_nm_layout_when_pruned_nm(tmp_path, tiny_llama, calib_text):
    out = prune(
        tiny_llama,
        tmp_path / "nm",
        calib_text,
        "--solver",
        "magnitude",
        "--nm",
        "2:4",
        "--packed",
        "--dtype",
        "float16",
    )
    index = packed_index(out / PACKED_SINGLE_FILE)
    assert {index[n]["layout"] for n in plan_tensors(out)} == {"nm"}
    assert all(index[n]["n_m"] == [2, 4] for n in plan_tensors(out))
    cli("convert", out, "-o", tmp_path / "dense", "--to", "dense")
    cli("convert", tmp_path / "dense", "-o", tmp_path / "again", "--to", "packed")
    assert packed_index(tmp_path / "again" / PACKED_SINGLE_FILE) == index  # the report's --nm is reused
    assert_same_state(load_sharded(out), load_sharded(tmp_path / "dense"))


@pytest.mark.parametrize("packed", [False, True])
def test_sharding_respects_max_shard_size(packed, tmp_path, tiny_llama, calib_text):
    extra = ["--packed"] if packed else []
    out = prune(tiny_llama, tmp_path / "out", calib_text, "--solver", "magnitude", "--max-shard-size", "40KB", *extra)
    files = weight_files(out)
    index_file = PACKED_INDEX_FILE if packed else INDEX_FILE
    assert len(files) > 1 and (out / index_file).is_file() and not (out / SINGLE_FILE).exists()
    assert checkpoint_layout(out) == ("packed" if packed else "dense")
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            sizes = [fh.get_tensor(k).numel() * fh.get_tensor(k).element_size() for k in fh.keys()]  # noqa: SIM118
        assert sum(sizes) <= 40_000 or len(sizes) == 1
    weight_map = json.loads((out / index_file).read_text())["weight_map"]
    assert set(weight_map) == set(load_sharded(out))
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = load_pruned(out)
    assert set(model.state_dict()) == set(reference.state_dict())


def test_convert_without_plan_packs_every_sparse_matrix(opt_pair, tmp_path):
    dense = tmp_path / "dense"
    shutil.copytree(opt_pair[0], dense)
    (dense / "plan.json").unlink()
    convert_checkpoint(dense, tmp_path / "packed", "packed")
    index = packed_index(tmp_path / "packed" / PACKED_SINGLE_FILE)
    state = load_sharded(dense)
    assert set(index) == {n for n, t in state.items() if t.dim() == 2 and t.is_floating_point()}
    assert {index[n]["layout"] for n in plan_tensors(opt_pair[0])} == {"bitmask"}
    assert index["model.decoder.embed_tokens.weight"]["layout"] == "dense"
    assert_same_state(state, load_sharded(tmp_path / "packed"))


def test_convert_refuses_existing_output_and_bad_layout(opt_pair, tmp_path):
    dense, packed = opt_pair
    result = cli("convert", dense, "-o", packed, "--to", "packed", ok=False)
    assert result.exit_code == 2 and "exists" in result.output
    result = cli("convert", dense, "-o", tmp_path / "x", "--to", "sparse", ok=False)
    assert result.exit_code == 2 and "packed or dense" in result.output
    result = cli("convert", tmp_path, "-o", tmp_path / "y", "--to", "packed", ok=False)
    assert result.exit_code == 2 and "not a checkpoint directory" in result.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_convert_in_place_with_overwrite(opt_pair, tmp_path):
    work = tmp_path / "ckpt"
    shutil.copytree(opt_pair[0], work)
    before = load_sharded(work)
    cli("convert", work, "-o", work, "--to", "packed", "--overwrite")
    assert checkpoint_layout(work) == "packed"
    assert_same_state(before, load_sharded(work))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_eval_and_load_model_on_packed(opt_pair, eval_text):
    dense, packed = opt_pair
    args = ["--text", eval_text, "--seqlen", "16", "--max-windows", "4", "--device", "cpu", "-o", "-"]
    from_dense = json.loads(cli("eval", dense, *args).stdout)
    from_packed = json.loads(cli("eval", packed, *args).stdout)
    assert from_packed["perplexity"]["pruned"] == from_dense["perplexity"]["pruned"]
    assert from_packed["blocks"] == from_dense["blocks"]
    assert from_packed["summary"]["mismatches"] == 0
    loaded = load_model(str(packed), LoadOptions(device="cpu"))
    assert loaded.tokenizer is not None and type(loaded.model).__name__ == "OPTForCausalLM"
    assert loaded.model.dtype == torch.float32
    assert load_model(str(packed), LoadOptions(dtype="bfloat16", device="cpu")).model.dtype == torch.bfloat16


# --- corruption -------------------------------------------------------------------------------


def corrupt_copy(source: Path, tmp_path: Path, how: str) -> Path:
    work = tmp_path / f"corrupt_{how}"
    shutil.copytree(source, work)
    path = work / PACKED_SINGLE_FILE
    if how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return work
    with safe_open(str(path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        meta = dict(fh.metadata())
    if how == "version":
        meta["format_version"] = "2"
    elif how == "mask":
        key = next(k for k in tensors if k.endswith(PART_SEPARATOR + "bitmask"))
        tensors[key] = tensors[key][:, :-1].contiguous()
    elif how == "values":
        key = next(k for k in tensors if k.endswith(PART_SEPARATOR + "values"))
        tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, str(path), metadata=meta)
    return work


CORRUPTIONS = {
    "truncate": "cannot read safetensors file",
    "version": "unsupported packed format version 2",
    "mask": "bitmask has shape",
    "values": "values are stored",
}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_corrupt_packed_checkpoint_is_a_clean_error(how, opt_pair, tmp_path):
    work = corrupt_copy(opt_pair[1], tmp_path, how)
    with pytest.raises(ArtifactError, match=CORRUPTIONS[how]):
        load_pruned(work, verify=False)  # the packed reader's own checks; with verify, sha256 fails first
    with pytest.raises(ArtifactError, match="is corrupted: its sha256 differs"):
        load_pruned(work)
    commands = (
        ["eval", work, "--device", "cpu", "--no-verify"],
        ["inspect", work, "--no-verify"],
        ["convert", work, "-o", tmp_path / "out", "--to", "dense", "--no-verify"],
    )
    for args in commands:
        result = cli(*args, ok=False)
        assert result.exit_code == 2, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and CORRUPTIONS[how] in lines[0], result.stderr
        assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_corrupt_packed_in_a_real_process(opt_pair, tmp_path):
    work = corrupt_copy(opt_pair[1], tmp_path, "truncate")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ecoflap_cli", "eval", str(work), "--device", "cpu", "--no-verify"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot read safetensors file")


def test_missing_tensor_is_refused_not_initialised(opt_pair, tmp_path):
    work = tmp_path / "missing"
    shutil.copytree(opt_pair[1], work)
    state = load_sharded(work)
    del state["model.decoder.layers.0.fc1.bias"]
    save_sharded(state, work, packed=True, max_shard_bytes=10**9)
    with pytest.raises(ArtifactError, match="lacks weight.*layers.0.fc1.bias"):
        load_pruned(work, verify=False)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5kb") == 1500
    assert parse_size("4096") == 4096 and parse_size(7) == 7
    for bad in ("", "lots", "5 XB", "0", "-1GB"):
        with pytest.raises(EcoflapError):
            parse_size(bad)
    result = cli("prune", "-m", "x", "-s", "0.5", "--max-shard-size", "huge", "-o", "/nonexistent/out", ok=False)
    assert result.exit_code == 2 and "cannot read size" in result.output


# --- vision-language models -------------------------------------------------------------------

VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
QFORMER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=100,
    max_position_embeddings=64,
    cross_attention_frequency=1,
)
OPT_TEXT = dict(
    model_type="opt",
    vocab_size=100,
    hidden_size=32,
    ffn_dim=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    word_embed_proj_dim=32,
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=2,
)
CLIP_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=100,
    max_position_embeddings=32,
    eos_token_id=2,
)


def tiny_vlm(family: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny random BLIP-2 or CLIP and inputs for it."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, CLIPConfig, CLIPModel

    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 32, 32)
    if family == "blip2":
        config = Blip2Config(
            vision_config=VISION, qformer_config=QFORMER, text_config=OPT_TEXT, num_query_tokens=4, image_token_index=99
        )
        ids = torch.cat([torch.full((1, 4), 99), torch.tensor([[2, 11, 23, 35, 47]])], dim=1)
        return Blip2ForConditionalGeneration(config).eval(), {"input_ids": ids, "pixel_values": pixels}
    config = CLIPConfig(text_config=CLIP_TEXT, vision_config=VISION, projection_dim=16)
    return CLIPModel(config).eval(), {"input_ids": torch.tensor([[5, 11, 23, 2]]), "pixel_values": pixels}


@pytest.mark.parametrize("family", ["blip2", "clip"])
def test_vlm_round_trip(family, tmp_path):
    pytest.importorskip(f"ecoflap_cli.models.{family}")
    model, inputs = tiny_vlm(family)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.view(-1)[::2] = 0  # half of every 2-D weight, as a pruned model
    model.save_pretrained(tmp_path / "dense")
    state = load_sharded(tmp_path / "dense")
    shutil.copytree(tmp_path / "dense", tmp_path / "packed")
    save_sharded(state, tmp_path / "packed", packed=True, max_shard_bytes=20_000)
    assert is_packed_checkpoint(tmp_path / "packed") and len(weight_files(tmp_path / "packed")) > 1
    assert_same_state(state, load_sharded(tmp_path / "packed"))
    assert weight_bytes(tmp_path / "packed") < weight_bytes(tmp_path / "dense")
    loaded = load_pruned(tmp_path / "packed")
    assert type(loaded) is type(model)
    with torch.no_grad():
        expected, got = model(**inputs), loaded(**inputs)
    key = "logits" if family == "blip2" else "logits_per_image"
    assert torch.equal(got[key], expected[key])
