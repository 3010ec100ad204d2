import json
import os

import cv2
import numpy as np
import pytest

from bench.input_screen import clahe, decoding, lever_decoder, lung_prior, render


def test_clahe_spreads_a_dull_gray_image_and_keeps_it_gray():
    rng = np.random.default_rng(0)
    g = (100 + 20 * rng.random((64, 64))).astype(np.uint8)  # values 100..120: little contrast
    u8 = np.repeat(g[..., None], 3, axis=2)
    out = clahe(u8)
    assert out.shape == u8.shape and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    assert out[..., 0].std() > 2 * g.std()
    assert np.array_equal(clahe(u8), out)


def test_clahe_of_a_colour_image_keeps_its_hue():
    u8 = np.zeros((32, 32, 3), np.uint8)
    u8[..., 2] = np.linspace(90, 130, 32, dtype=np.uint8)[None, :]  # a dull blue ramp
    out = clahe(u8)
    assert (out[..., 2] >= out[..., 0]).all()  # still blue, not turned gray
    assert out[..., 2].std() > u8[..., 2].std()


def test_lung_mask_lever_zeroes_everything_outside_the_drawn_mask(tmp_path):
    img = np.full((40, 40), 200, np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:30, 5:20] = 255
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), img)
    cv2.imwrite(str(tmp_path / "masks" / "a.png"), mask)
    (tmp_path / "manifest.csv").write_text("path,mask,label,group\nimages/a.png,masks/a.png,tb,a\n")
    out = lever_decoder("lung-mask", tmp_path)(tmp_path / "images" / "a.png", 40, 1)
    assert out.shape == (40, 40, 3)
    assert out[0, 0].max() == 0 and out[35, 35].max() == 0 and out[20, 10].min() > 150
    crop = lever_decoder("lung-crop", tmp_path)(tmp_path / "images" / "a.png", 40, 1)
    assert (crop > 150).mean() > (out > 150).mean()  # the box fills the frame


def test_lung_prior_is_where_most_masks_are(tmp_path):
    masks = []
    for i, (r0, r1) in enumerate(((0, 20), (0, 20), (0, 20), (20, 40))):  # three masks on top, one below
        m = np.zeros((40, 40), np.uint8)
        m[r0:r1] = 255
        masks.append(tmp_path / f"m{i}.png")
        cv2.imwrite(str(masks[-1]), m)
    prior = lung_prior(masks, side=40, level=0.3)
    assert prior[:20].all() and not prior[21:].any()  # 0.75 above the level, 0.25 below it
    assert lung_prior(masks, side=40, level=0.2)[21:].all()


def test_an_unreadable_mask_file_is_named(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8), np.uint8))
    (tmp_path / "m.png").write_bytes(b"not a png")
    (tmp_path / "manifest.csv").write_text("path,mask,label,group\na.png,m.png,tb,a\n")
    with pytest.raises(SystemExit, match="m.png is not a readable mask image"):
        lever_decoder("lung-mask", tmp_path)(tmp_path / "a.png", 8, 1)


def test_lung_levers_need_a_mask_column(tmp_path):
    (tmp_path / "manifest.csv").write_text("path,label,group\na.png,tb,a\n")
    with pytest.raises(SystemExit, match="no 'mask' column"):
        lever_decoder("lung-mask", tmp_path)


def test_decoding_restores_the_loader_and_the_cache_folder(monkeypatch):
    from pellucid.datasets import torchdata

    monkeypatch.setenv("PELLUCID_CACHE", "somewhere")
    plain = torchdata.load_prepared
    with decoding(lambda *a, **k: None, "elsewhere"):
        assert torchdata.load_prepared is not plain and os.environ["PELLUCID_CACHE"] == "elsewhere"
    assert torchdata.load_prepared is plain and os.environ["PELLUCID_CACHE"] == "somewhere"


def test_table_pairs_each_probe_with_itself_on_plain_images():
    fold = lambda a: {"accuracy": a, "auroc": a + 0.05}  # noqa: E731
    res = {"task": "tb", "name": "tb_lungs", "lever": "clahe", "vote": "probe:v", "folds": 2, "seed": 1, "clip": 2.0,
           "tiles": 8, "metrics": ["accuracy", "auroc"], "seconds": 5.0,
           "rows": {"plain|probe:a": [fold(0.80), fold(0.70)], "plain|probe:v": [fold(0.85), fold(0.83)],
                    "clahe|probe:a": [fold(0.75), fold(0.70)], "clahe|probe:v": [fold(0.86), fold(0.84)],
                    "both|probe:v": [fold(0.90), fold(0.83)], "control|probe:v + probe:w": [fold(0.85), fold(0.86)]},
           "control": "probe:w"}
    lines = render(json.loads(json.dumps(res))).splitlines()
    both = next(x for x in lines if x.startswith("| `probe:v` | both"))
    assert "+0.025 ± 0.035" in both and "| 1 / 0 |" in both  # against the plain vote
    assert "+0.015 ± 0.021" in next(x for x in lines if x.startswith("| `probe:v + probe:w` | as they are, with"))
    row = next(x for x in lines if x.startswith("| `probe:a` | clahe"))
    assert "-0.025 ± 0.035" in row and "| 0 / 1 |" in row
    assert "+0.010 ± 0.000" in next(x for x in lines if x.startswith("| `probe:v` | clahe"))
    assert "| — | — | — |" in next(x for x in lines if x.startswith("| `probe:v` | as they are"))
    assert "--name tb_lungs --lever clahe --vote probe:v --seed 1 --clip 2 --tiles 8 --control probe:w" in lines[2]


def test_hybrid_rows_pair_the_lever_inside_the_hybrid_with_the_plain_hybrid():
    fold = lambda a: {"accuracy": a, "auroc": a + 0.05}  # noqa: E731
    res = {"task": "tb", "name": "tb_lungs", "lever": "lung-mask", "vote": "probe:v", "folds": 2, "seed": 0,
           "clip": 2.0, "tiles": 8, "metrics": ["accuracy", "auroc"], "seconds": 5.0, "control": None,
           "fine_tunes": ["finetune:a", "finetune:b"], "hybrid_folds": [0, 1],
           "rows": {"plain|probe:v": [fold(0.80), fold(0.80)], "lung-mask|probe:v": [fold(0.70), fold(0.70)],
                    "both|probe:v": [fold(0.82), fold(0.82)], "hybrid|probe:v": [fold(0.86), fold(0.88)],
                    "hybrid+lever|probe:v": [fold(0.88), fold(0.89)],
                    "hybrid+control|probe:v + probe:w": [fold(0.86), fold(0.86)]}}
    lines = render(json.loads(json.dumps(res))).splitlines()
    rows = [x for x in lines if x.startswith("| `")]
    hyb = next(x for x in rows if "with the fine-tunes" in x and x.split("|")[2].strip().startswith("as they are"))
    assert "folds 0, 1" in hyb and "| — | — | — |" in hyb
    lev = next(x for x in rows if x.split("|")[2].strip().startswith("both, with the fine-tunes"))
    assert "+0.015 ± 0.007" in lev and "| 2 / 0 |" in lev  # against the plain hybrid, not the plain vote
    assert "--fine-tunes finetune:a,finetune:b" in lines[2]
    ctl = next(x for x in rows if "control's probes and the fine-tunes" in x)
    assert "-0.010 ± 0.014" in ctl and "| 0 / 1 |" in ctl
