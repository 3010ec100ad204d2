"""Export of a model folder to ONNX (fp32) and INT8-quantized ONNX, with a JSON sidecar.

``pellucid export --model DIR --format onnx [--int8] [--out PATH]`` runs :func:`run`. The exported
graph takes what every pellucid model takes — images ``(N, 3, S, S)``, float32 RGB in [0, 1], any
batch size — and returns logits ``(N, C)``; normalisation is inside the graph. Calibrated
probabilities are ``softmax(logits / temperature)`` with the temperature written in the sidecar
(``<file>.json``: classes, preprocessing, temperature, threshold, quantization), so a runtime without
pellucid can reproduce the model folder's predictions.

INT8 uses ONNX Runtime's post-training quantization: static QDQ quantization (per-channel uint8
weights, uint8 activations: :mod:`pellucid.core.quantize` explains why that is what makes the model
compute the same on CPUs with and without VNNI; the first convolution and the classifier stay in
float32, which raised agreement on a waste model's test images from 0.957 to 0.973) calibrated on training images
listed in the model folder's ``split.json``, with MinMax and Percentile (99.99) activation ranges both
tried and the one whose INT8 model agrees better with fp32 on the validation images kept (never the
test images), after ONNX Runtime's pre-processing (shape inference and graph optimisation). When
static quantization cannot run (no split file, no readable calibration images, an operator it cannot
handle), dynamic quantization (int8 weights, activations quantized at run time) is used instead and
the sidecar says so. Either way the INT8 graph is **not written** when its top-1 agreement with fp32
on the validation images is below :data:`MIN_AGREEMENT` (0.95); the sidecar records the agreement,
the settings, this CPU's instruction set and the ONNX Runtime version. ``bench/bench_apps.py export``
measures accuracy, size and latency of both.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from pellucid.core.backbones import unknown_name_error
from pellucid.core.card import ModelCard, as_card
from pellucid.core.modelfolder import ModelFolderError, load_model
from pellucid.core.quantize import (INT8_SETTINGS, cpu_features, end_layers, ort_version, quantize_static_portable,
                                     saturation_safe)

__all__ = ["FORMATS", "INT8_METHODS", "MIN_AGREEMENT", "ExportError", "Int8RefusedError", "export_onnx",
           "calibration_batches", "onnx_session", "run"]

log = logging.getLogger(__name__)

FORMATS = ("onnx",)
# Static INT8 calibrations tried; the one whose INT8 model agrees best with fp32 on the validation
# images wins (MinMax won on one waste model, Percentile 99.99 on another).
CALIBRATIONS = ("MinMax", "Percentile")
# ONNX Runtime's histogram (Percentile) calibrator keeps every calibrated activation tensor of every
# calibration image in memory (MinMax keeps only per-batch minima and maxima), so it gets at most this many
# image pixels: 128 images at 224 px. With 256 images at 320 px it was killed for memory on a 24 GB machine,
# and 120 images at 320 px (the budget of 256 at 224 px) still peaked at 17.3 GB.
HISTOGRAM_PIXEL_BUDGET = 128 * 224 * 224
INT8_METHODS = ("static", "dynamic")
MIN_AGREEMENT = 0.95  # INT8 top-1 agreement with float32 on the validation images below which nothing is written
OPSET = 17


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise ModelFolderError(f"ONNX export needs the packages onnx and onnxruntime ({err.name} is missing): "
                               "pip install 'pellucid[export]'") from None


def _channels(card: ModelCard | dict) -> int | None:
    return as_card(card).preprocessing.channels_in


def calibration_batches(model_dir: str | Path, card: ModelCard | dict, n_images: int = 256, batch_size: int = 8,
                        seed: int = 0, part: str = "train") -> list[np.ndarray]:
    """Prepared training images of a model folder, for INT8 calibration.

    Args:
        model_dir: the model folder (its ``split.json`` lists the training images).
        card: its card (image size and channels).
        n_images: how many training images to draw (seeded).
        batch_size: images per batch.
        seed: sampling seed.
        part: which part of ``split.json`` to draw from (``"train"`` to calibrate, ``"val"`` to
            choose between calibrations).

    Returns:
        Arrays ``(B, 3, S, S)`` float32 in [0, 1].

    Raises:
        ModelFolderError: no split file, or none of the drawn images could be read.
    """
    from pellucid.datasets import splits
    from pellucid.datasets.torchdata import ImageCache

    split_file = splits.split_file(model_dir)
    if not split_file.is_file():
        raise ModelFolderError(f"{model_dir} has no split.json: INT8 calibration needs the training images it lists")
    rows = splits.load_split(split_file).part(part)
    if not rows:
        raise ModelFolderError(f"{split_file} lists no {part} images")
    rng = np.random.default_rng(seed)
    pick = sorted(rng.permutation(len(rows))[:n_images])
    size = int(as_card(card).image_size)
    cache = ImageCache([rows[i].path for i in pick], size, channels=_channels(card), progress=False)
    if len(cache) == 0:
        raise ModelFolderError(f"none of the {len(pick)} calibration images from {split_file} could be read "
                               f"(first: {rows[pick[0]].written}); is the data folder still there?")
    x = cache.arrays.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    if len(x) > batch_size:  # equal batches: ONNX Runtime's histogram calibrations stack them (a short last one failed)
        x = x[:len(x) - len(x) % batch_size]
    return [np.ascontiguousarray(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def onnx_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session for ``path`` (``threads`` intra-op threads; None = runtime default).

    An INT8 graph whose int8 weights use the full 8-bit range (not written by pellucid: its exports
    are :func:`~pellucid.core.quantize.saturation_safe`) gets a warning on a CPU whose int8 products
    saturate (x86 without VNNI): its answers there can differ from the ones it was checked with.
    """
    _require_onnx()
    import onnxruntime as ort

    if cpu_features()["int8_dot"] == "saturating-int16":
        safe, why = saturation_safe(path)
        if not safe:
            warnings.warn(f"{Path(path).name}: {why}, as this CPU does; re-export it with pellucid export --int8 "
                          "(uint8 weights) or use the fp32 model", stacklevel=2)

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class ExportError(ModelFolderError):
    """The model holds an operation that the ONNX exporters installed here cannot write."""


@contextlib.contextmanager
def _native_output_to(sink: Path):
    """Native (C++) writes to stdout and stderr go to ``sink`` meanwhile. Torch's TorchScript exporter
    prints the whole IR graph (thousands of lines) when an operator has no ONNX form, whatever its
    log setting; the failure itself is raised and handled."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(sink, "wb") as fh:
            os.dup2(fh.fileno(), 1)
            os.dup2(fh.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def _export_fp32(model: torch.nn.Module, size: int | tuple[int, ...], path: Path) -> None:
    """Write ``model`` (eval mode) as ONNX: input ``image`` of shape ``(batch, 3, size, size)`` (or
    ``(batch, *size)`` for a shape tuple), output ``logits``, any batch size.

    Raises:
        ExportError: the TorchScript exporter cannot write an operator (an ensemble whose members read
            other sizes resizes with antialiasing, which it has no ONNX form for) and torch's newer
            exporter is not installed (it needs ``onnxscript``).
    """
    x = torch.rand(2, *((3, size, size) if isinstance(size, int) else tuple(size)))
    kwargs = dict(input_names=["image"], output_names=["logits"], opset_version=OPSET)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings(), \
            tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")  # exporter chatter (tracer and deprecation notes)
        try:
            with _native_output_to(Path(tmp) / "exporter.log"):
                torch.onnx.export(model, (x,), str(path), dynamo=False, do_constant_folding=True,
                                  dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, **kwargs)
        except (TypeError, RuntimeError) as err:  # an operator it cannot write, or a build without it
            first = (str(err).splitlines() or [type(err).__name__])[0][:200]
            if importlib.util.find_spec("onnxscript") is None:
                raise ExportError(f"this model cannot be exported to ONNX here ({first}); "
                                  + ("its members read other input sizes: export each member folder "
                                     "(pellucid export --model DIR/members/NAME), or " if hasattr(model, "members")
                                     else "") + "pip install onnxscript for torch's newer exporter") from None
            log.info("TorchScript ONNX exporter failed (%s); using the dynamo exporter", first)
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=({0: batch},),
                              external_data=False, **kwargs)


def _max_abs_diff(model: torch.nn.Module, path: Path, size: int) -> float:
    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).numpy()
    got = onnx_session(path).run(None, {"image": x.numpy()})[0]
    return float(np.abs(ref - got).max())


def export_onnx(model_dir: str | Path, out: str | Path | None = None, int8: bool = False, *,
                int8_method: str = "static", calib_images: int = 256, seed: int = 0) -> dict:
    """Export a model folder to ONNX, and optionally to INT8 ONNX.

    Args:
        model_dir: a classifier (or ensemble) model folder.
        out: the fp32 ``.onnx`` file to write (default ``<model_dir>/export/model.onnx``); the INT8
            file goes beside it as ``<stem>.int8.onnx``.
        int8: also write the INT8 model.
        int8_method: ``"static"`` (QDQ, calibrated; falls back to dynamic with a warning when it
            cannot run) or ``"dynamic"``.
        calib_images: training images used for static calibration. 256 by default:
            on the waste model's validation split, 256 images gave INT8/fp32 top-1 agreement 0.987
            against 0.980 with 64 (Entropy calibration: the same as MinMax; Percentile 99.99: 0.973).
            Percentile uses the leading images within ``HISTOGRAM_PIXEL_BUDGET`` (128 at 224 px,
            56 at 320 px in batches of 8): its calibrator holds every activation of every image.
        seed: calibration sampling seed.

    Returns:
        ``{"fp32": path, "fp32_bytes": n, "int8": path | None, "int8_bytes": n | None,
        "int8_method": str | None, "sidecar": path, "max_abs_diff": float}``.
    """
    _require_onnx()
    if int8_method not in INT8_METHODS:
        raise unknown_name_error("INT8 method", int8_method, list(INT8_METHODS))
    import pellucid

    model_dir = Path(model_dir)
    model, card = load_model(model_dir)
    model.eval()
    size = int(card.image_size)
    fp32 = Path(out) if out else model_dir / "export" / "model.onnx"
    if fp32.suffix != ".onnx":
        fp32 = fp32.with_suffix(".onnx")
    fp32.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    _export_fp32(model, size, fp32)
    diff = _max_abs_diff(model, fp32, size)
    result = {"fp32": str(fp32), "fp32_bytes": fp32.stat().st_size, "int8": None, "int8_bytes": None,
              "int8_method": None, "max_abs_diff": diff}
    quant: dict = {}
    refused: Int8RefusedError | None = None
    if int8:
        q8 = fp32.with_name(fp32.stem + ".int8.onnx")
        q8.unlink(missing_ok=True)  # never leave an earlier INT8 file beside a new fp32 one
        try:
            method, quant = _quantize(fp32, q8, model_dir, card, int8_method, calib_images, seed)
            result.update(int8=str(q8), int8_bytes=q8.stat().st_size, int8_method=method)
        except Int8RefusedError as err:  # the fp32 file and its sidecar are still written
            refused, quant = err, {"refused": str(err)}
    thr = card.threshold
    sidecar = {
        "format": "onnx", "opset": OPSET, "pellucid_version": pellucid.__version__,
        "source_model": str(model_dir.resolve()), "task": card.task, "kind": card.kind,
        "classes": card.classes, "positive_class": card.positive_class,
        "input": {"name": "image", "shape": ["batch", 3, size, size], "dtype": "float32", "range": [0.0, 1.0],
                  "layout": "NCHW", "color": "RGB (gray replicated)",
                  "channels_in": _channels(card), "resize": card.preprocessing.resize or "squash",
                  "note": "normalisation (mean/std) is inside the graph"
                          + ("; convert colour input to luminance first (channels_in = 1)" if _channels(card) == 1
                             else "")},
        "output": {"name": "logits", "shape": ["batch", len(card.classes)],
                   "probabilities": "softmax(logits / temperature)"},
        "temperature": card.temperature,
        "threshold": {"policy": (thr.policy if thr is not None else None) or "argmax",
                      "value": thr.value if thr is not None else None},
        "files": {"fp32": fp32.name, "int8": Path(result["int8"]).name if result["int8"] else None},
        "quantization": quant or None,
        "check": {"max_abs_logit_diff_fp32_vs_torch": diff},
        "seconds": round(time.time() - t0, 1),
    }
    side = fp32.with_suffix(".json")
    side.write_text(json.dumps(sidecar, indent=1))
    result["sidecar"] = str(side)
    if refused is not None:
        raise refused
    return result


def _top1(session, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Top-1 classes of a session on images, in batches (one batch of every validation image at
    320 px held several GB of activations)."""
    return np.concatenate([session.run(None, {"image": images[i:i + batch_size]})[0].argmax(1)
                           for i in range(0, len(images), batch_size)])


def _within_pixels(batches: list[np.ndarray], budget: int) -> list[np.ndarray]:
    """The leading calibration batches whose images hold at most ``budget`` pixels (at least one batch)."""
    kept, pixels = [], 0
    for b in batches:
        pixels += int(np.prod(b.shape[0:1] + b.shape[2:]))
        if kept and pixels > budget:
            break
        kept.append(b)
    return kept


class Int8RefusedError(ModelFolderError):
    """The INT8 graph disagrees with float32 too often to be written."""


def _quant_record(method: str, **extra) -> dict:
    """The sidecar's ``quantization`` entry: settings, this CPU and the ONNX Runtime version."""
    return {"method": method, **INT8_SETTINGS, **extra, "cpu": dict(cpu_features()), "onnxruntime": ort_version()}


def _validation(model_dir: Path, card: dict, fp32: Path, seed: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Validation images of the split and the float32 graph's top-1 on them (``None`` when unavailable)."""
    try:
        val = np.concatenate(calibration_batches(model_dir, card, 256, seed=seed, part="val"))
    except ModelFolderError as err:
        log.info("no validation images to check INT8 against (%s)", err)
        return None, None
    return val, _top1(onnx_session(fp32), val)


def _static_candidates(prep: Path, tmp: Path, batches: list[np.ndarray], val, ref
                       ) -> tuple[str, dict, dict, list[str]]:
    """Quantize with each calibration, score each against float32: the best one's name, the agreements,
    the images each used and the nodes kept in float32."""
    import onnx

    ends = end_layers(onnx.load(str(prep)))
    agreement: dict[str, float | None] = {}
    used: dict[str, int] = {}
    for name in CALIBRATIONS if val is not None else CALIBRATIONS[:1]:
        if name == "MinMax":
            these, extra = batches, None
        else:
            these, extra = _within_pixels(batches, HISTOGRAM_PIXEL_BUDGET), {"CalibPercentile": 99.99}
        used[name] = int(sum(len(b) for b in these))
        quantize_static_portable(prep, tmp / f"int8-{name}.onnx", these, calibration=name, extra_options=extra,
                                 nodes_to_exclude=ends)
        agreement[name] = float((_top1(onnx_session(tmp / f"int8-{name}.onnx"), val) == ref).mean()) \
            if val is not None else None
    best = max(agreement, key=lambda k: -1.0 if agreement[k] is None else agreement[k])
    return best, agreement, used, ends


def _quantize(fp32: Path, q8: Path, model_dir: Path, card: dict, method: str, calib_images: int,
              seed: int, min_agreement: float | None = None) -> tuple[str, dict]:
    """Write the INT8 graph ``q8`` of ``fp32`` with the portable settings, checked against float32.

    Raises:
        Int8RefusedError: top-1 agreement with float32 on the validation images below ``min_agreement``
            (nothing is written).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    min_agreement = MIN_AGREEMENT if min_agreement is None else min_agreement

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        prep = tmp / "prep.onnx"
        try:
            quant_pre_process(str(fp32), str(prep), skip_symbolic_shape=True)
        except Exception as err:  # pre-processing is an optimisation; quantize the raw graph without it
            log.info("ONNX Runtime pre-processing skipped (%s)", err)
            prep = fp32
        val, ref = _validation(model_dir, card, fp32, seed)
        record, cand = None, tmp / "int8-dynamic.onnx"
        if method == "static":
            try:
                batches = calibration_batches(model_dir, card, calib_images, seed=seed)
                best, agreement, used, ends = _static_candidates(prep, tmp, batches, val, ref)
                cand = tmp / f"int8-{best}.onnx"
                record = _quant_record("static", float32_nodes=ends, calibration=best,
                                       calibration_images=used[best],
                                       calibration_source="training part of split.json",
                                       calibration_choice={"top1_agreement_with_fp32": agreement})
            except Exception as err:  # ModelFolderError, or an operator ORT cannot quantize statically
                warnings.warn(f"static INT8 quantization failed ({type(err).__name__}: {str(err)[:200]}); "
                              "falling back to dynamic quantization", stacklevel=3)
        if record is None:
            quantize_dynamic(str(prep), str(cand), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
            record = _quant_record("dynamic", activations="quantized at run time", weights="int8 per-channel, 7-bit range",
                                   weight_type="QInt8", reduce_range=True)
        safe, why = saturation_safe(cand)
        if not safe:  # the settings above never produce this; a guard against a changed quantizer
            raise Int8RefusedError(f"INT8 model not written: {why}")
        agree = float((_top1(onnx_session(cand), val) == ref).mean()) if val is not None else None
        record["check"] = {"validation_images": 0 if val is None else int(len(val)), "top1_agreement_with_fp32": agree,
                           "min_agreement": min_agreement, "saturation_safe": why}
        if agree is not None and agree < min_agreement:
            raise Int8RefusedError(
                f"INT8 model not written: it agrees with float32 on {agree:.3f} of {len(val)} validation images' "
                f"top-1 (< {min_agreement}); try --int8-method dynamic or more --calib-images, or ship the fp32 "
                f"file {fp32.name}")
        if agree is None:
            warnings.warn("INT8 agreement with float32 not checked: the model folder's split.json lists no readable "
                          "validation images", stacklevel=3)
        shutil.copyfile(cand, q8)
        return record["method"], record


def run(args: argparse.Namespace) -> int:
    """``pellucid export``: write the ONNX file(s) and the sidecar, print their paths and sizes."""
    fmt = (args.format or "onnx").lower()
    if fmt not in FORMATS:
        raise unknown_name_error("export format", fmt, list(FORMATS))
    res = export_onnx(args.model, args.out, int8=bool(args.int8),
                      int8_method=getattr(args, "int8_method", None) or "static",
                      calib_images=getattr(args, "calib_images", None) or 256)
    print(f"fp32: {res['fp32']} ({res['fp32_bytes'] / 1e6:.2f} MB; "
          f"max |logit diff| vs torch {res['max_abs_diff']:.2e})")
    if res["int8"]:
        print(f"int8: {res['int8']} ({res['int8_bytes'] / 1e6:.2f} MB, {res['fp32_bytes'] / res['int8_bytes']:.1f}x "
              f"smaller; {res['int8_method']} quantization)")
    print(f"sidecar: {res['sidecar']}")
    return 0
