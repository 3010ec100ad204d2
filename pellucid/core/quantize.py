"""INT8 quantization that computes the same answer on every CPU, and what this CPU can do.

ONNX Runtime runs a static-quantized convolution with uint8 activations and int8 weights (U8S8) on
x86 through one of several kernels chosen at run time from the CPU's instruction set. With VNNI
(AVX512-VNNI or AVX-VNNI) products are accumulated in int32 exactly. Without it (AVX2-only CPUs,
such as many AMD EPYC machines), the kernel multiplies pairs of uint8 x int8 values and adds each pair
into a *saturating* int16 (``vpmaddubsw``): ``255 * 127 + 255 * 127`` does not fit, and the result is
silently clipped. A model exported on a VNNI machine and run on an AVX2 machine then gives other
answers: a small nuclei classifier agreed with its float32 graph on 0.60 of images under an emulated
AMD EPYC-Rome CPU (``qemu-x86_64 -cpu EPYC-Rome``) and on 1.00 natively on an AVX512-VNNI Xeon.

The settings here avoid the overflow on *every* CPU, whichever exports and whichever runs the model:
weights are quantized to 7 bits (``reduce_range``: int8 weights in [-64, 63]), so a pair sums to at
most ``255 * 64 * 2 = 32640 <= 32767``. That keeps the fast U8S8 kernels (uint8 weights, the other
overflow-free choice, take a slower path on x86). :func:`saturation_safe` checks a quantized graph for
exactly this property, so a model can be checked where it is loaded, not only where it was written.
ARM CPUs compute int8 dot products in int32 (``sdot``/``udot``) and never saturate.

:func:`cpu_features` reports the instruction-set facts these choices (and bfloat16 paths) depend on;
the test suite prints them in its header.
"""
from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

__all__ = ["CpuFeatures", "cpu_features", "INT8_SETTINGS", "CalibrationReader", "quantize_static_portable",
           "saturation_safe", "ort_version"]

log = logging.getLogger(__name__)

# Settings of every static INT8 graph pellucid writes (export and LIME's INT8 passes).
INT8_SETTINGS = {"format": "QDQ", "activations": "uint8 per-tensor", "weights": "int8 per-channel, 7-bit range",
                 "reduce_range": True, "per_channel": True}
SAFE_WEIGHT_ABS = 64  # |w| <= 64 for every int8 weight: 255 * 64 * 2 fits a saturating int16


class CpuFeatures(dict):
    """What this CPU computes natively, as a plain dict (recorded in sidecars and the test header).

    Keys: ``machine`` (``x86_64``, ``aarch64`` ...), ``model`` (the CPU's name when known), ``isa``
    (the relevant flags found: avx2, avx512f, avx512_vnni, avx_vnni, avx512_bf16, amx_bf16, amx_int8,
    asimddp, i8mm ...), ``int8_dot`` (how int8 products accumulate: ``"vnni"``, ``"saturating-int16"``
    on x86 without VNNI, ``"int32"`` on ARM with dot products, ``"unknown"``) and ``bf16`` (native
    bfloat16 arithmetic: True/False).
    """

    def summary(self) -> str:
        """One line: machine, model, flags, int8 accumulation and bfloat16."""
        flags = " ".join(self["isa"]) or "none of the tracked flags"
        return (f"{self['machine']} {self['model'] or ''}".strip() + f"; ISA: {flags}; int8 dot products: "
                f"{self['int8_dot']}; native bfloat16: {'yes' if self['bf16'] else 'no'}")


_TRACKED = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
            "amx_tile", "asimd", "asimddp", "i8mm", "bf16", "sve")


def _cpuinfo() -> tuple[str, set[str]]:
    """The CPU's name and flag set from ``/proc/cpuinfo`` (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return "", set()
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and not name:
            name = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return name, flags


@functools.lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    """This CPU's instruction-set facts that decide INT8 and bfloat16 behaviour (cached)."""
    machine = platform.machine().lower()
    name, flags = _cpuinfo()
    isa = [f for f in _TRACKED if f in flags]
    if machine in ("x86_64", "amd64", "i686", "x86"):
        int8_dot = ("vnni" if {"avx512_vnni", "avx_vnni"} & flags else "saturating-int16" if flags else "unknown")
        bf16 = bool({"avx512_bf16", "amx_bf16"} & flags)
    elif machine in ("aarch64", "arm64"):
        int8_dot = "int32" if "asimddp" in flags else "unknown"
        bf16 = "bf16" in flags
    else:
        int8_dot, bf16 = "unknown", False
    return CpuFeatures(machine=machine, model=name, isa=isa, int8_dot=int8_dot, bf16=bf16)


def ort_version() -> str | None:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:
        return None


class CalibrationReader:
    """ONNX Runtime ``CalibrationDataReader`` over prepared batches ``(B, C, H, W)`` float32."""

    def __init__(self, batches: Sequence[np.ndarray], input_name: str = "image"):
        self.batches = list(batches)
        self.input_name = input_name
        self._it: Iterator | None = None

    def get_next(self):
        if self._it is None:
            self._it = iter({self.input_name: b} for b in self.batches)
        return next(self._it, None)

    def rewind(self):
        self._it = None


def quantize_static_portable(src: str | Path, dst: str | Path, batches: Sequence[np.ndarray], *,
                             calibration: str = "MinMax", extra_options: dict | None = None,
                             nodes_to_exclude: Sequence[str] | None = None) -> None:
    """Static QDQ INT8 of the ONNX file ``src`` into ``dst`` with :data:`INT8_SETTINGS`.

    Args:
        src, dst: float32 and INT8 ONNX files.
        batches: calibration inputs for the graph's ``image`` input.
        calibration: an ONNX Runtime ``CalibrationMethod`` name (``"MinMax"``, ``"Percentile"`` ...).
        extra_options: passed to ONNX Runtime (e.g. ``{"CalibPercentile": 99.99}``).
        nodes_to_exclude: node names kept in float32.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(max(level, logging.ERROR))  # ONNX Runtime logs every tensor it calibrates to the root logger
        quantize_static(str(src), str(dst), CalibrationReader(batches), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, calibration),
                        nodes_to_exclude=list(nodes_to_exclude or []), extra_options=extra_options)
    finally:
        root.setLevel(level)


def saturation_safe(model) -> tuple[bool, str]:
    """Whether an INT8 ONNX graph computes the same on CPUs with and without VNNI.

    Every int8 initializer (the weights of QDQ and of dynamically quantized graphs) must lie in
    [-64, 64]; uint8 weights never saturate, and a graph without int8 weights is float.

    Args:
        model: an ``onnx.ModelProto`` or a path to an ONNX file.

    Returns:
        ``(safe, reason)``; ``reason`` names the first offending weight when unsafe.
    """
    import onnx
    from onnx import numpy_helper

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    for t in model.graph.initializer:  # weights (and zero points, which are 0) of QDQ and QOperator graphs
        if t.data_type != onnx.TensorProto.INT8:
            continue
        peak = int(np.abs(numpy_helper.to_array(t).astype(np.int16)).max(initial=0))
        if peak > SAFE_WEIGHT_ABS:
            return False, (f"int8 weight {t.name!r} uses the full 8-bit range (|w| up to {peak}): "
                           "it can overflow on CPUs without VNNI")
    return True, "int8 weights within 7 bits (no int16 overflow on any x86 kernel)"
