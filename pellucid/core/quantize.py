"""INT8 quantization that computes the same answer on every CPU, and what this CPU can do.

ONNX Runtime runs a static-quantized convolution with uint8 activations and int8 weights (U8S8) on
x86 through one of several kernels chosen at run time from the CPU's instruction set. With VNNI
(AVX512-VNNI or AVX-VNNI) products are accumulated in int32 exactly. Without it (AVX2-only CPUs,
such as many AMD EPYC machines), the kernel multiplies pairs of uint8 x int8 values and adds each pair
into a *saturating* int16 (``vpmaddubsw``): ``255 * 127 + 255 * 127`` does not fit, and the result is
silently clipped. A model exported on a VNNI machine and run on an AVX2 machine then gives other
answers: a small nuclei classifier agreed with its float32 graph on 0.60 of images under an emulated
AMD EPYC-Rome CPU (``qemu-x86_64 -cpu EPYC-Rome``) and on 1.00 natively on an AVX512-VNNI Xeon.

Two kinds of INT8 graph, two choices:

* **Graphs that travel** (``pellucid export --int8``, :data:`PORTABLE`): weights are quantized to
  *uint8* per channel (asymmetric, zero point per channel) and activations to uint8. ONNX Runtime runs
  uint8 x uint8 products by widening to int16 and accumulating pairs in int32 (``vpmaddwd``), which never
  overflows, on every x86 CPU; ARM CPUs accumulate int8 dot products in int32 (``sdot``/``udot``)
  anyway. Measured on a waste model (EfficientNet-Lite0, 48 unseen test images): top-1 agreement with
  float32 0.958 natively and 0.958 under an emulated EPYC-Rome, logits identical to the last bit; the
  default int8-weight graph agreed 0.958 natively and **0.896** emulated. 7-bit int8 weights
  (``reduce_range``), the other overflow-free choice, lost 3 points of agreement on that model's
  validation images (0.933 against 0.966), so they are not used for exports.
* **Graphs built and run in one process** (LIME's INT8 passes, :func:`local_settings`): the fast
  uint8 x int8 kernels, with 7-bit weights where this CPU lacks VNNI — there every LIME image is also
  checked against float32 before its INT8 result is used.

:func:`saturation_safe` checks a quantized graph for the portable property (no int8 weight beyond
±64), so a model can be checked where it is loaded, not only where it was written.

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

__all__ = ["CpuFeatures", "cpu_features", "PORTABLE", "INT8_SETTINGS", "CalibrationReader", "end_layers", "local_settings",
           "quantize_static_portable", "saturation_safe", "ort_version"]

log = logging.getLogger(__name__)

# Settings of every INT8 graph pellucid writes to a file (exports): the same answers on every CPU.
PORTABLE = {"format": "QDQ", "activations": "uint8 per-tensor", "weights": "uint8 per-channel (asymmetric)",
            "weight_type": "QUInt8", "activation_type": "QUInt8", "reduce_range": False, "per_channel": True}
INT8_SETTINGS = PORTABLE
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


def local_settings(cpu: CpuFeatures | None = None) -> dict:
    """INT8 settings for a graph built and run on this CPU: int8 weights (the fast kernels), in a
    7-bit range where the CPU's int8 products would otherwise saturate (x86 without VNNI)."""
    cpu = cpu or cpu_features()
    return {"format": "QDQ", "activations": "uint8 per-tensor", "weight_type": "QInt8", "activation_type": "QUInt8",
            "reduce_range": cpu["int8_dot"] in ("saturating-int16", "unknown"), "per_channel": True,
            "weights": "int8 per-channel" + (", 7-bit range" if cpu["int8_dot"] in ("saturating-int16", "unknown")
                                             else "")}


def quantize_static_portable(src: str | Path, dst: str | Path, batches: Sequence[np.ndarray], *,
                             calibration: str = "MinMax", extra_options: dict | None = None,
                             nodes_to_exclude: Sequence[str] | None = None, settings: dict | None = None) -> None:
    """Static QDQ INT8 of the ONNX file ``src`` into ``dst`` with ``settings`` (default :data:`PORTABLE`).

    Args:
        src, dst: float32 and INT8 ONNX files.
        batches: calibration inputs for the graph's ``image`` input.
        calibration: an ONNX Runtime ``CalibrationMethod`` name (``"MinMax"``, ``"Percentile"`` ...).
        extra_options: passed to ONNX Runtime (e.g. ``{"CalibPercentile": 99.99}``).
        nodes_to_exclude: node names kept in float32.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    settings = settings or PORTABLE
    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(max(level, logging.ERROR))  # ONNX Runtime logs every tensor it calibrates to the root logger
        quantize_static(str(src), str(dst), CalibrationReader(batches), quant_format=QuantFormat.QDQ,
                        per_channel=settings["per_channel"], reduce_range=settings["reduce_range"],
                        activation_type=getattr(QuantType, settings["activation_type"]),
                        weight_type=getattr(QuantType, settings["weight_type"]),
                        calibrate_method=getattr(CalibrationMethod, calibration),
                        nodes_to_exclude=list(nodes_to_exclude or []), extra_options=extra_options)
    finally:
        root.setLevel(level)


def end_layers(model) -> list[str]:
    """Names of an ONNX graph's first convolution and its last Gemm/MatMul (the classifier): the
    layers INT8 graphs keep in float32 (they cost the most accuracy and little time)."""
    nodes = list(model.graph.node)
    first = [n.name for n in nodes if n.op_type == "Conv"][:1]
    last = [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")][-1:]
    return [n for n in first + last if n]


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
    return True, "no int8 weight beyond ±64 (uint8 or 7-bit weights): no int16 overflow on any x86 kernel"
