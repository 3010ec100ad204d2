"""The README's screenshot: the web app's Predict page in headless Chromium, saved as ``runs/screenshot.png`` (generated, never committed: the repository carries no images).

``python -m bench.screenshot [--model DIR] [--image FILE] [--methods gradcam,occlusion] [--out PATH]``

It serves the app (:func:`pellucid.ui.headless.serve_app`), uploads one image, waits until every
explanation is shown and saves the page. Nothing is trained: without ``--model`` a tiny untrained
chest X-ray classifier is built in a temporary folder (its predictions mean nothing; the picture is of
the page). Without ``--image`` a synthetic chest-X-ray-like picture is drawn with numpy, so no data
image ever reaches the repository. The PNG is reduced to a 256-colour palette to stay small.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

INTENDED_USE = "Research use only. Screenshot model: untrained, its predictions mean nothing."


def synthetic_cxr(path: Path, size: int = 256, seed: int = 0) -> Path:
    """A made-up chest-X-ray-like picture (dark lungs in a bright body, spine, ribs, noise), as PNG."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = np.exp(-(((xx - 0.5) / 0.42) ** 6 + ((yy - 0.55) / 0.55) ** 6))
    img = 0.15 + 0.6 * body
    for cx in (0.32, 0.68):  # the two lungs: darker ellipses
        lung = ((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
        img = np.where(lung, img - 0.35, img)
    img = np.where(np.abs(xx - 0.5) < 0.035, img + 0.25, img)  # the spine
    for k in range(7):  # ribs: faint bright arcs
        y0 = 0.25 + 0.075 * k
        rib = np.abs(yy - (y0 + 0.12 * (xx - 0.5) ** 2 * 4)) < 0.008
        img = np.where(rib & (body > 0.3), img + 0.12, img)
    blob = ((xx - 0.68) / 0.05) ** 2 + ((yy - 0.38) / 0.05) ** 2 < 1  # a bright spot in the right lung
    img = np.where(blob, img + 0.3, img)
    img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
    pil = Image.fromarray((img * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2))
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.convert("RGB").save(path)
    return path


def tiny_model(folder: Path, methods: list[str]) -> Path:
    """An untrained test-size chest X-ray classifier (64 px) saved as a model folder."""
    import torch

    import pellucid
    from pellucid.core.model import build_classifier
    from pellucid.core.modelfolder import save_model

    torch.manual_seed(0)
    model, info = build_classifier("test_resnet", 2, pretrained=False)
    card = {
        "kind": "classifier", "pellucid_version": pellucid.__version__, "task": "tb",
        "title": "Tuberculosis on chest X-ray (screenshot model)", "classes": ["normal", "tuberculosis"],
        "positive_class": "tuberculosis", "modality": "CXR", "intended_use": INTENDED_USE,
        "explainers": methods, "backbone": model.spec.to_dict(), "weights": info,
        "preprocessing": {"image_size": 64, "channels_in": 1, "resize": "squash", "input_range": [0.0, 1.0],
                          "mean": list(model.spec.mean), "std": list(model.spec.std)},
        "threshold": {"policy": "youden", "value": 0.5, "positive_class": "tuberculosis"},
        "calibration": {"temperature": 1.0}, "metrics": {}, "recipe": {},
    }
    return save_model(folder, model, card)


def _link_tree(src: Path, dst: Path, skip: str = "") -> None:
    """``dst`` with ``src``'s folders made and its files linked (an ensemble refuses a member folder that
    resolves outside it, so folders are not links)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name == skip:
            continue
        if f.is_dir():
            _link_tree(f, dst / f.name)
        else:
            (dst / f.name).symlink_to(f.resolve())


def with_methods(model: Path, methods: list[str], workdir: Path) -> Path:
    """``model`` itself when its card already defaults to ``methods``; else a copy whose card does
    (the page starts with the card's explainers), weights and an ensemble's ``members/`` linked, not copied."""
    card = json.loads((model / "card.json").read_text())
    if card.get("explainers") == methods:
        return model
    copy = workdir / "model"
    _link_tree(model, copy, skip="card.json")
    card["explainers"] = methods
    (copy / "card.json").write_text(json.dumps(card, indent=1))
    return copy


def shoot(model: Path, image: Path, out: Path, workdir: Path, width: int = 1280, max_height: int = 2600) -> Path:
    """Serve the app, upload ``image`` on the Predict page and save a full-page screenshot to ``out``."""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from pellucid.ui.headless import CHROMIUM_ARGS, find_chromium, predict_page, serve_app

    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("no Chromium found (Debian: apt-get install chromium; or set PELLUCID_CHROMIUM)")
    raw = workdir / "raw.png"
    with serve_app(model, workdir) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = predict_page(browser, url, [image], viewport=(width, 900), timeout_ms=300_000)
            # Streamlit scrolls inside its main block, not the page: grow the window to the content
            tall = page.evaluate("() => Math.max(...[...document.querySelectorAll('[data-testid=stMain], "
                                 "section.main, body')].map(e => e.scrollHeight))")
            page.set_viewport_size({"width": width, "height": int(min(max(tall, 900), max_height))})
            page.wait_for_timeout(1500)  # let the layout and the last images settle
            page.screenshot(path=str(raw))
        finally:
            browser.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(raw) as im:
        im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.screenshot", description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="model folder (default: a tiny untrained one, built here)")
    ap.add_argument("--image", type=Path, help="image to upload (default: a synthetic chest-X-ray-like picture)")
    ap.add_argument("--methods", default="gradcam,occlusion,lime", help="explainers shown (comma-separated)")
    ap.add_argument("--out", type=Path, default=Path("runs/screenshot.png"))
    ap.add_argument("--width", type=int, default=1280, help="browser window width in pixels")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    with tempfile.TemporaryDirectory(prefix="pellucid-shot-") as tmp:
        work = Path(tmp)
        model = args.model if args.model else tiny_model(work / "tiny", methods)
        model = with_methods(Path(model), methods, work)
        image = args.image if args.image else synthetic_cxr(work / "synthetic-cxr.png")
        out = shoot(model, image, args.out, work, args.width)
    print(f"{out}: {out.stat().st_size / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
