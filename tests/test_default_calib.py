"""The default image-text calibration set: a local dataset in the hub's format gives the same
records, and the same batches, as ``--calib FILE.jsonl`` with the same pairs; offline, one line."""

from __future__ import annotations

import json
import sys

import pytest
import torch

datasets = pytest.importorskip("datasets")
pytest.importorskip("PIL")

from PIL import Image, ImageDraw  # noqa: E402

from ecoflap_cli.bench import tiny_clip  # noqa: E402
from ecoflap_cli.data import multimodal  # noqa: E402
from ecoflap_cli.errors import DataError  # noqa: E402

CAPTIONS = ["a red circle on white", "a blue square", "a green triangle", "two yellow dots",
            "a black line", "a purple star", "an orange box", "a grey cloud"]  # fmt: skip


def _images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, _ in enumerate(CAPTIONS):
        image = Image.new("RGB", (40 + 3 * i, 36), (255 - 20 * i, 30 * i % 255, 90))
        ImageDraw.Draw(image).ellipse((4, 4, 20 + i, 30), fill=(10 * i, 200, 40))
        path = folder / f"img{i}.png"
        image.save(path)
        paths.append(path)
    return paths


@pytest.fixture()
def hub_dataset(tmp_path):
    """CC3M's WebDataset layout (``jpg`` image, ``txt`` caption), saved with ``datasets``."""
    paths = _images(tmp_path / "src")
    ds = datasets.Dataset.from_dict({"jpg": [str(p) for p in paths], "txt": CAPTIONS})
    ds = ds.cast_column("jpg", datasets.Image())
    ds.save_to_disk(str(tmp_path / "cc3m-local"))
    return tmp_path / "cc3m-local", dict(zip(CAPTIONS, paths))


def _clip():
    recipe = tiny_clip.Recipe(hidden=32, layers=2, heads=2, projection=16, max_text_len=16)
    tokenizer = tiny_clip.build_tokenizer(CAPTIONS, 1, recipe.max_text_len)
    return tiny_clip.build_model(recipe, len(tokenizer)), tiny_clip.build_processor(tokenizer)


def test_local_hub_dataset_gives_the_batches_of_the_same_jsonl(hub_dataset, tmp_path):
    path, source_of = hub_dataset
    records = multimodal.default_image_text_records(5, seed=3, dataset=str(path), cache=tmp_path / "cache")
    assert len(records) == 5 and len({r["caption"] for r in records}) == 5
    assert all(set(r) == {"image", "caption"} and r["caption"] in source_of for r in records)
    # the same pairs as a --calib FILE.jsonl pointing at the original files
    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text("".join(json.dumps({"image": str(source_of[r["caption"]]), "caption": r["caption"]}) + "\n"
                             for r in records))  # fmt: skip
    from_file = multimodal.read_image_text_jsonl(jsonl)
    model, processor = _clip()
    a = multimodal.make_multimodal_batches(model, processor, records, batch_size=2, max_text_len=16)
    b = multimodal.make_multimodal_batches(model, processor, from_file, batch_size=2, max_text_len=16)
    assert len(a) == len(b) == 2  # 2 + 3: the trailing single pair joins the previous batch
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key
    # seeded: the same call picks the same pairs; another seed picks another order
    again = multimodal.default_image_text_records(5, seed=3, dataset=str(path), cache=tmp_path / "cache2")
    assert [r["caption"] for r in again] == [r["caption"] for r in records]
    other = multimodal.default_image_text_records(8, seed=4, dataset=str(path), cache=tmp_path / "cache3")
    assert sorted(r["caption"] for r in other) == sorted(CAPTIONS)


def test_cached_records_need_no_datasets(hub_dataset, tmp_path, monkeypatch):
    path, _ = hub_dataset
    first = multimodal.default_image_text_records(3, seed=0, dataset=str(path), cache=tmp_path / "c")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now fails
    assert multimodal.default_image_text_records(3, seed=0, dataset=str(path), cache=tmp_path / "c") == first


def test_offline_is_one_line_naming_the_dataset_and_calib(tmp_path, monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'pixparse/cc3m-wds' on the Hub (OfflineModeIsEnabled)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError) as err:
        multimodal.default_image_text_records(4, seed=0, cache=tmp_path / "c")
    message = str(err.value)
    assert "\n" not in message
    assert multimodal.DEFAULT_IMAGE_TEXT_DATASET in message and "--calib" in message
    assert not (tmp_path / "c").exists()


def test_missing_columns_and_datasets(tmp_path, monkeypatch):
    ds = datasets.Dataset.from_dict({"label": [1, 2]})
    ds.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match="--calib"):
        multimodal.default_image_text_records(2, seed=0, dataset=str(tmp_path / "bad"), cache=tmp_path / "c")
    monkeypatch.setitem(sys.modules, "datasets", None)
    from ecoflap_cli.errors import MissingDependencyError

    with pytest.raises(MissingDependencyError, match="datasets"):
        multimodal.default_image_text_records(2, seed=0, cache=tmp_path / "c2")
