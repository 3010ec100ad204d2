"""Lung segmentation: metric golden values, post-processing, lung-mask preprocessing, the model
folder round trip, mask prediction files and a tiny segment → mask → classify chain."""
from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
import torch

from pellucid.core.segmentation import (
    SegmentationError, apply_lung_mask, bootstrap_interval, build_unet, dice_scores, hd95_scores,
    keep_largest_components, predict_masks, read_seg_manifest, segment, segment_many, segmentation_metrics,
    train_segmenter,
)
from pellucid.datasets.readers import Image, read_image
from tests.conftest import data_dir


def _square(shape, r0, r1, c0, c1):
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


A = _square((10, 10), 2, 6, 2, 6)                       # 4×4
CASES = [  # (pred, target, dice, hd95 in pixels), worked by hand
    (A, A, 1.0, 0.0),
    (A, _square((10, 10), 2, 6, 3, 7), 0.75, 1.0),       # shifted one column: 12 shared of 16 + 16
    (A, _square((10, 10), 2, 6, 2, 8), 0.8, 2.0),        # 4×4 inside 4×6: 2·16/40; far edge 2 px away
    (_square((20, 20), 2, 6, 2, 6), _square((20, 20), 2, 6, 12, 16), 0.0, 10.0),  # disjoint, 10 columns apart
]


@pytest.mark.parametrize("pred, target, dice, hd", CASES)
def test_dice_and_hd95_golden(pred, target, dice, hd):
    assert dice_scores(pred, target)[0] == pytest.approx(dice, abs=1e-6)
    assert hd95_scores(pred, target)[0] == pytest.approx(hd, abs=1e-6)


def test_metrics_batched_and_undefined_cases():
    preds = np.stack([c[0] for c in CASES[:3]])
    targets = np.stack([c[1] for c in CASES[:3]])
    np.testing.assert_allclose(dice_scores(preds, targets), [1.0, 0.75, 0.8], atol=1e-6)
    empty = np.zeros_like(A)
    assert np.isnan(dice_scores(A, empty)[0])          # reference empty: undefined, not 0 or 1
    assert np.isnan(hd95_scores(empty, A)[0])          # prediction empty: undefined


def test_segmentation_metrics_with_intervals():
    res = segmentation_metrics([c[0] for c in CASES], [c[1] for c in CASES], n_boot=200, seed=0)
    assert res["dice"]["value"] == pytest.approx((1 + 0.75 + 0.8 + 0) / 4)
    assert res["hd95"]["value"] == pytest.approx((0 + 1 + 2 + 10) / 4)
    for key in ("dice", "hd95"):
        assert res[key]["low"] <= res[key]["value"] <= res[key]["high"] and res[key]["n"] == 4
    assert res["per_image"]["dice"] == pytest.approx([1.0, 0.75, 0.8, 0.0])


def test_bootstrap_interval_constant_and_nan():
    assert bootstrap_interval([0.9] * 5, n_boot=50) == {"value": 0.9, "low": 0.9, "high": 0.9, "n": 5}
    with pytest.warns(UserWarning, match="1 of 3 per-image scores undefined"):
        r = bootstrap_interval([1.0, np.nan, 0.0], n_boot=100, seed=1)
    assert r["value"] == 0.5 and r["n"] == 2 and 0.0 <= r["low"] <= r["high"] <= 1.0
    with pytest.warns(UserWarning):
        assert np.isnan(bootstrap_interval([np.nan])["value"])


def test_keep_largest_components():
    m = _square((20, 20), 1, 9, 1, 5) | _square((20, 20), 1, 9, 12, 18) | _square((20, 20), 15, 17, 8, 10)
    kept = keep_largest_components(m, 2)
    assert kept.dtype == bool and kept.sum() == 32 + 48 and not kept[15:17, 8:10].any()
    assert keep_largest_components(A, 2).sum() == 16


# ----------------------------------------------------------------------------- lung-mask preprocessing
def test_apply_lung_mask_keeps_shape_and_zeroes_outside():
    rng = np.random.default_rng(0)
    img = Image(rng.uniform(0.1, 1.0, (20, 30, 1)).astype(np.float32), {"path": "x.png"})
    mask = _square((20, 30), 4, 16, 5, 12) | _square((20, 30), 4, 16, 18, 25)
    out = apply_lung_mask(img, mask, "mask")
    assert out.array.shape == img.array.shape and out.array.dtype == np.float32
    assert np.all(out.array[~mask] == 0)
    np.testing.assert_array_equal(out.array[mask], img.array[mask])
    assert "lung mask applied" in out.meta["notes"][-1] and img.meta.get("notes", []) == []


def test_apply_lung_mask_crop_box_with_margin():
    img = Image(np.ones((100, 100, 3), np.float32))
    mask = _square((100, 100), 20, 80, 10, 90)
    out = apply_lung_mask(img, mask, "crop", margin=0.05)
    assert out.array.shape == (70, 90, 3)                 # rows 15..85, columns 5..95
    assert out.meta["lung_box"] == [15, 5, 85, 95]
    assert out.array[0, 0, 0] == 0 and out.array[35, 45, 0] == 1


def test_apply_lung_mask_errors():
    img = Image(np.ones((8, 8, 1), np.float32))
    with pytest.raises(SegmentationError, match="did you mean 'crop'"):
        apply_lung_mask(img, np.ones((8, 8), bool), "crpo")
    with pytest.raises(SegmentationError, match=r"mask shape \(4, 4\)"):
        apply_lung_mask(img, np.ones((4, 4), bool))
    with pytest.warns(UserWarning, match="empty lung mask"):
        out = apply_lung_mask(img, np.zeros((8, 8), bool))
    assert np.all(out.array == 1)


def test_segment_returns_original_resolution():
    torch.manual_seed(0)
    model = build_unet((4, 8), (2,), 0).eval()
    model.image_size = 32
    masks = segment_many(model, [np.random.default_rng(0).random((50, 70)).astype(np.float32),
                                 Image(np.zeros((33, 40, 3), np.float32))])
    assert [m.shape for m in masks] == [(50, 70), (33, 40)] and all(m.dtype == np.bool_ for m in masks)


def test_a_mask_is_read_through_the_image_door(tmp_path, monkeypatch):
    """Masks go through ``read_image``: a 0/255 PNG is the same mask as before; a mask of another format under
    a ``.png`` name, or over the pixel budget, is one ``ImageReadError`` line (it had reached Pillow's 40-odd
    decoders, and its bomb error was a traceback)."""
    from PIL import Image as PILImage

    from pellucid.core.segmentation import _read_mask
    from pellucid.datasets.readers import ImageReadError

    truth = np.zeros((20, 30), bool)
    truth[5:15, 3:12] = True
    PILImage.fromarray(truth.astype(np.uint8) * 255).save(tmp_path / "m.png")
    assert np.array_equal(_read_mask(tmp_path / "m.png"), truth)
    PILImage.fromarray(truth.astype(np.uint8) * 255).save(tmp_path / "gif.png", format="GIF")
    with pytest.raises(ImageReadError, match="its content is GIF"):
        _read_mask(tmp_path / "gif.png")
    monkeypatch.setenv("PELLUCID_MAX_PIXELS", "500")  # the 600-px mask is now over the budget
    with pytest.raises(ImageReadError, match="pixel limit"):
        _read_mask(tmp_path / "m.png")


def test_build_unet_rejects_mismatched_strides():
    with pytest.raises(SegmentationError, match="needs 2 strides"):
        build_unet((4, 8, 16), (2,))


def test_unknown_training_option_did_you_mean(tmp_path):
    with pytest.raises(TypeError, match="did you mean 'batch_size'"):
        train_segmenter(tmp_path, tmp_path / "out", batch_sise=4)


def test_missing_manifest_message(tmp_path):
    with pytest.raises(SegmentationError, match="no manifest.csv"):
        read_seg_manifest(tmp_path)


# ----------------------------------------------------------------------------- trained on real data
@pytest.fixture(scope="module")
def seg_dir(tmp_path_factory):
    """A tiny U-Net trained for one epoch on 12 real tb_lungs images at 32 px."""
    src = data_dir("tb_lungs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train_segmenter(src, tmp_path_factory.mktemp("seg"), image_size=32, epochs=1, max_images=12,
                               batch_size=4, channels=(4, 8), strides=(2,), num_res_units=0, n_boot=50,
                               progress=False)


def test_segmentation_folder_round_trip(seg_dir, tmp_path):
    from pellucid.core.modelfolder import load_model, save_model

    card = json.loads((seg_dir / "card.json").read_text())
    assert card["kind"] == "segmentation" and card["task"] == "tb-lungseg"
    assert card["classes"] == ["background", "lung"] and card["image_size"] == 32
    assert {"value", "low", "high"} <= set(card["metrics"]["dice"]) and "hd95" in card["metrics"]
    assert card["split"]["hash"] and card["training"]["seconds"] > 0 and card["pellucid_version"]
    model, card2 = load_model(seg_dir)
    assert card2 == card and not model.training
    save_model(tmp_path / "copy", model, card)
    again, _ = load_model(tmp_path / "copy")
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(model(x), again(x), rtol=0, atol=0)
    img = read_image(read_seg_manifest(data_dir("tb_lungs"))[0]["path"], channels=1)
    np.testing.assert_array_equal(segment(model, img), segment(again, img))


def test_predict_masks_writes_same_size_pngs_and_error_rows(seg_dir, tmp_path):
    from PIL import Image as PILImage

    rows = read_seg_manifest(data_dir("tb_lungs"))[:2]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    out = predict_masks(seg_dir, [r["path"] for r in rows] + [str(bad)], tmp_path / "masks")
    assert len(out) == 3
    ok = [r for r in out if not r["error"]]
    assert len(ok) == 2 and [r["path"] for r in out if r["error"]] == [str(bad)]
    for r in ok:
        src = PILImage.open(r["path"])
        m = np.asarray(PILImage.open(r["mask_path"]))
        assert m.shape == (src.height, src.width) and set(np.unique(m)) <= {0, 255}
        mask_name = r["mask_path"].rsplit("/", 1)[-1]
        assert mask_name == r["path"].rsplit("/", 1)[-1]
        assert float(r["lung_fraction"]) == pytest.approx((m > 0).mean(), abs=1e-6)
    with (tmp_path / "masks" / "masks.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [t["error"] != "" for t in table] == [False, False, True]


def test_segment_mask_classify_end_to_end(seg_dir):
    from pellucid.core.model import build_classifier
    from pellucid.core.modelfolder import load_model
    from pellucid.datasets.torchdata import prepare, to_tensor

    seg, _ = load_model(seg_dir)
    rows = read_seg_manifest(data_dir("tb_lungs"))[:3]
    images = [read_image(r["path"], channels=1) for r in rows]
    masks = segment_many(seg, images)
    # the untrained tiny segmenter may find no lungs; use the reference masks where it finds none
    from pellucid.core.segmentation import _read_mask

    masks = [m if m.any() else _read_mask(r["mask"]) for m, r in zip(masks, rows)]
    masked = [apply_lung_mask(im, m, "mask") for im, m in zip(images, masks)]
    for im, m, mm in zip(images, masks, masked):
        assert mm.array.shape == im.array.shape and np.all(mm.array[~m] == 0)
    clf, _ = build_classifier("test_resnet", 2, pretrained=False)
    batch = torch.stack([to_tensor(prepare(im, 64, 1)) for im in masked])
    with torch.inference_mode():
        probs = torch.softmax(clf.eval()(batch), 1)
    assert probs.shape == (3, 2) and torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(3))


def test_lung_masker_settings(seg_dir):
    from pellucid.core.segmentation import LungMasker

    assert LungMasker.from_settings("none", None) is None and LungMasker.from_card({}) is None
    with pytest.raises(SegmentationError, match="did you mean 'lung-mask'"):
        LungMasker.from_settings("lung-msk", seg_dir)
    with pytest.raises(SegmentationError, match="needs a segmenter"):
        LungMasker.from_settings("lung-mask", None)
    masker = LungMasker.from_card({"preprocessing": {"preprocess": "lung-crop", "segmenter": str(seg_dir)}})
    assert masker.card_entry() == {"preprocess": "lung-crop", "segmenter": str(seg_dir.resolve())}
    img = read_image(read_seg_manifest(data_dir("tb_lungs"))[0]["path"], channels=1)
    out = LungMasker(seg_dir, "mask")(img)
    assert out.array.shape == img.array.shape
    np.testing.assert_array_equal(out.array[..., 0] > 0, segment(masker.model, img) & (img.array[..., 0] > 0))
