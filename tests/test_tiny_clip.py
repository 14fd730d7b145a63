"""The tiny CLIP recipe (ecoflap_cli.bench.tiny_clip): split, train, save, reload, dense numbers.

The fast tests run the recipe on a handful of images drawn here; the slow one is a two-epoch
miniature of the bench itself on the Debian images (``apt-get download``; run with ``-m slow``).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("PIL")

from PIL import Image, ImageDraw  # noqa: E402

from ecoflap_cli.bench import tiny_clip as tc  # noqa: E402

COLORS = {"red_things": (220, 30, 30), "blue_things": (30, 30, 220), "green_things": (30, 200, 30)}


def _fixture_items(root):
    """Classed items (RGBA shapes, one per file) and captioned ones, as ``list_items`` returns them."""
    classed = {}
    for name, color in COLORS.items():
        items = []
        for i in range(9):
            path = root / "src" / name / f"{name}_{i}_shape.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image = Image.new("RGBA", (40 + i, 30), (0, 0, 0, 0))  # transparent: composited on white
            ImageDraw.Draw(image).ellipse((2 + i, 2, 30, 25), fill=color + (255,))
            image.save(path)
            items.append({"src": str(path), "hash": f"{name}{i:04d}", "words": ["shape", name.split("_")[0]]})
        classed[name] = items
    captioned = []
    for i in range(10):
        path = root / "src" / "captioned" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        color_name = list(COLORS)[i % 3]
        Image.new("RGB", (32 + i, 32), COLORS[color_name]).save(path)
        caption = f"A square number {i} in {color_name.split('_')[0]}."
        captioned.append({"src": str(path), "hash": f"cap{i:04d}", "caption": caption})
    return classed, captioned


def _recipe(**kw):
    base = dict(classes=tuple(COLORS), test_per_class=2, valid_per_class=2, captioned_test=3, captioned_valid=2,
                hidden=32, layers=2, heads=2, projection=16, epochs=2, batch_size=8, min_word_count=1)  # fmt: skip
    return tc.Recipe(**{**base, **kw})


def test_split_is_disjoint_balanced_and_seeded(tmp_path):
    classed, captioned = _fixture_items(tmp_path)
    splits = tc.split_items(classed, captioned, _recipe())
    hashes = {s: {it["hash"] for items in groups.values() for it in items} for s, groups in splits.items()}
    assert not (
        hashes["train"] & hashes["valid"] or hashes["train"] & hashes["test"] or hashes["valid"] & hashes["test"]
    )
    assert all(len(splits["test"][c]) == 2 and len(splits["valid"][c]) == 2 for c in COLORS)
    assert len(splits["test"][tc.CAPTIONED]) == 3 and len(splits["train"][tc.CAPTIONED]) == 5
    again = tc.split_items(classed, captioned, _recipe())
    assert again == splits
    other = tc.split_items(classed, captioned, _recipe(seed=1))
    assert other != splits
    with pytest.raises(ValueError, match="needs more than"):
        tc.split_items(classed, captioned, _recipe(test_per_class=5, valid_per_class=4))


def test_render_composites_on_white_and_refuses_bombs(tmp_path, monkeypatch):
    src = tmp_path / "a.png"
    Image.new("RGBA", (20, 10), (0, 0, 0, 0)).save(src)
    assert tc.render(src, tmp_path / "out.png", size=16)
    with Image.open(tmp_path / "out.png") as out:
        assert out.mode == "RGB" and out.size == (16, 16)
        assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((8, 8)) == (255, 255, 255)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 200 pixels: over twice the limit
    assert not tc.render(src, tmp_path / "bomb.png", size=16)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert not tc.render(tmp_path / "broken.png", tmp_path / "b.png", size=16)


def test_filename_words_and_captions(tmp_path):
    root = tmp_path / "png"
    path = root / "food" / "fruit" / "pineapple_bw_ganson_01.png"
    assert tc.filename_words(path, root) == ["fruit", "pineapple"]
    txt = tmp_path / "coin.txt"
    txt.write_text("A US 25 cent piece.\nde.utf8=Eine Münze.\n", encoding="utf-8")
    assert tc.english_caption(txt) == "A US 25 cent piece."
    (tmp_path / "only.txt").write_text("de.utf8=Nur Deutsch\n", encoding="utf-8")
    assert tc.english_caption(tmp_path / "only.txt") is None


def test_word_tokenizer_appends_the_eos_the_config_names():
    tokenizer = tc.build_tokenizer(["a photo of a cat.", "a photo of a dog"], 1, 8)
    ids = tokenizer(["A photo of a CAT!", "a zebra"], padding=True)["input_ids"]
    eos = tokenizer.convert_tokens_to_ids("[EOS]")
    assert eos == 3 and tokenizer.eos_token_id == 3
    assert ids[0][-1] == eos and ids[1][:3] == [tokenizer.convert_tokens_to_ids("a"), 1, eos]
    model = tc.build_model(_recipe(), len(tokenizer))
    assert model.config.text_config.eos_token_id == eos


def test_build_trains_saves_and_reloads_with_ecoflap(tmp_path):
    torch.set_num_threads(1)
    classed, captioned = _fixture_items(tmp_path)
    recipe = _recipe()
    out = tc.build(tmp_path / "tiny", recipe, classed=classed, captioned=captioned, evaluate=False,
                   log=lambda m: None)  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe_key"] == recipe.key() and len(manifest["history"]) == 2
    assert manifest["split_sizes"]["test"] == {"blue_things": 2, "green_things": 2, "red_things": 2, "captioned": 3}
    lines = (out / "data" / "test_captions.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all((out / "data" / json.loads(x)["image"]).is_file() for x in lines)
    assert sorted(p.name for p in (out / "data" / "test").iterdir()) == sorted(COLORS)

    from ecoflap_cli.data.multimodal import make_multimodal_batches, read_image_text_jsonl
    from ecoflap_cli.io.loading import LoadOptions, load_model

    loaded = load_model(str(out / "model"), LoadOptions(dtype="float32", device="cpu"))
    assert type(loaded.model).__name__ == "CLIPModel"
    records = read_image_text_jsonl(out / "data" / "calib.jsonl")
    batches = make_multimodal_batches(loaded.model, loaded.processor, records[:6], 3, recipe.max_text_len)
    assert all(bool((b["input_ids"] == 3).any(-1).all()) for b in batches)  # eos in every text
    with torch.no_grad():
        loss = loaded.model(**batches[0], return_loss=True).loss
    assert torch.isfinite(loss)
    # a second call finds the cache and trains nothing
    shutil.rmtree(tmp_path / "src")  # the sources are gone: only the cache can answer
    assert tc.build(tmp_path / "tiny", recipe, classed={}, captioned=[], evaluate=False, log=lambda m: None) == out


@pytest.mark.slow
def test_two_epoch_miniature_of_the_bench_reproduces_its_dense_pipeline(tmp_path):
    """The bench's own recipe (data, split, model) for two epochs: the dense numbers ``ecoflap
    eval`` reports equal the in-process ones, and are already above chance."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("needs apt-get and dpkg-deb for the Debian images")
    torch.set_num_threads(1)
    recipe = tc.Recipe(epochs=2)
    try:
        out = tc.build(tmp_path / "mini", recipe)
    except RuntimeError as err:  # no package lists or no network
        pytest.skip(str(err))
    manifest = json.loads((out / "manifest.json").read_text())
    sizes = manifest["split_sizes"]
    # class-balanced: the split takes test_per_class per class; a file Pillow refuses is dropped after it
    assert all(recipe.test_per_class - 2 <= sizes["test"][c] <= recipe.test_per_class for c in recipe.classes)
    assert sizes["test"][tc.CAPTIONED] == recipe.captioned_test
    dense = manifest["dense"]["test"]
    top1 = dense["zero_shot"]["pruned"]["top1"]
    assert top1 > 100 / len(recipe.classes) * 1.5
    assert dense["retrieval"]["pruned"]["i2t_r5"] > 500 / recipe.captioned_test * 1.5

    from ecoflap_cli.data.multimodal import read_class_folders
    from ecoflap_cli.io.loading import LoadOptions, load_model

    loaded = load_model(str(out / "model"), LoadOptions(dtype="float32", device="cpu"))
    names, records = read_class_folders(out / "data" / "test")
    folders = sorted(p.name for p in (out / "data" / "test").iterdir())
    ours = tc.zero_shot_accuracy(loaded.model, loaded.processor, [r["image"] for r in records],
                                 [r["label"] for r in records], folders)  # fmt: skip
    assert names == [tc.class_phrase(f) for f in folders]
    assert ours * 100 == pytest.approx(top1, abs=0.3)


def test_build_is_seeded(tmp_path):
    """Same recipe, same images: the same weights (one torch thread, as the bench trains)."""
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    classed, captioned = _fixture_items(tmp_path)
    quiet = dict(classed=classed, captioned=captioned, evaluate=False, log=lambda m: None)
    a = tc.build(tmp_path / "a", _recipe(), **quiet)
    b = tc.build(tmp_path / "b", _recipe(), **quiet)
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    c = tc.build(tmp_path / "c", _recipe(seed=1), **quiet)
    wc = load_file(c / "model" / "model.safetensors")
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
