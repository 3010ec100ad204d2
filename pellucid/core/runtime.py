"""Fast forward passes for work that runs one model on many images of one shape.

Perturbation explainers (LIME: 1000 perturbed copies of one image; the faithfulness harness: dozens
of masked copies per image) spend nearly all their time in plain inference forward passes. On CPU,
PyTorch's eager mode runs them well below what the hardware can do: every BatchNorm is a separate
pass over memory and the depthwise convolutions of EfficientNet-style networks take a slow path in
NCHW layout. :func:`fast_forward` returns a callable with the model's exact function that runs
faster:

* ``"onnxruntime"`` (CPU, when ``onnxruntime`` is installed — the ``export`` extra): the model is
  exported in memory to ONNX (the same exporter as ``pellucid export``) and run by ONNX Runtime,
  which folds BatchNorm into the convolutions and fuses activations. On the benchmark machine this
  ran EfficientNet-Lite0 at 224 px several times faster than eager PyTorch
  (``bench/bench_explain.py``); the export costs a second or two once per model and input shape.
* ``"torch"``: eager PyTorch with channels-last inputs (oneDNN's fast convolution layout).

Two approximations of the model, for callers that check them against float32 before use (LIME's
``precision="int8"`` / ``"bfloat16"`` / ``"auto"``):

* ``int8_calibration=`` gives an INT8 ONNX Runtime runner (static quantization calibrated on the
  given inputs);
* ``bfloat16=True`` gives a bfloat16 runner: OpenVINO (the ``openvino`` extra) on a CPU with native
  bfloat16 arithmetic (AVX512-BF16 or AMX) — on the 2-core AVX512-BF16 benchmark machine it ran
  EfficientNet-Lite0 at 1.4 ms per 224-px image against 2.6 ms for float32 ONNX Runtime and 3.2 ms
  for PyTorch's bfloat16 autocast — else eager PyTorch under bfloat16 autocast.

The float32 runners are checked against the eager model on a probe batch when built; if the exported graph
disagrees (max |logit difference| above ``tol``) or cannot be exported, ``"auto"`` falls back to
``"torch"`` and logs why. Runners are cached per model object and input shape, and rebuilt when any
parameter or buffer changes in place (tensor version counters), so an explainer that randomises
weights (the sanity check) never sees a stale graph. Gradients never flow through a runner: it is
for inference only.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import tempfile
import weakref
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

__all__ = ["BACKENDS", "fast_forward", "model_device", "onnxruntime_available", "openvino_bf16_available",
           "small_input_depthwise", "tune_allocator"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime")
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


ALLOCATOR_THRESHOLD = 1 << 30  # bytes
_TUNED: list[bool] = []


def tune_allocator(threshold: int = ALLOCATOR_THRESHOLD) -> bool:
    """Keep the memory of freed large tensors in the process for reuse (glibc's malloc on Linux).

    glibc serves every block above its mmap threshold (128 KiB at start, raised dynamically but never
    above 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``. A CPU forward pass of EfficientNet-
    Lite0 on 16 images at 224 px makes activations of 20–80 MiB, so every pass maps them again and
    the kernel zero-fills each page on first touch: on the 2-core benchmark machine that took over
    half the time of a forward pass (15.1 → 5.6 ms per image with this setting) and of a fine-tune
    (``bench/bench_runtime.py``). This sets glibc's mmap and trim thresholds to ``threshold``
    (``mallopt``), so freed blocks stay in the heap and are reused; the price is memory the process
    keeps (up to ``threshold`` above its peak).

    Called by the ``pellucid`` command line and the web app; a library user can call it once at
    start-up. ``PELLUCID_MALLOC_TUNING=0`` turns it off.

    Returns:
        True when the thresholds were set (now or by an earlier call); False off glibc or when
        turned off.
    """
    import ctypes
    import os
    import sys

    if _TUNED:
        return _TUNED[0]
    if os.environ.get("PELLUCID_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no tunable thresholds)
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = bool(libc.mallopt(m_mmap_threshold, ctypes.c_int(threshold))) and \
            bool(libc.mallopt(m_trim_threshold, ctypes.c_int(threshold)))
    except (OSError, AttributeError):
        ok = False
    if ok:
        _TUNED.append(True)
        log.debug("glibc malloc: mmap and trim thresholds set to %d bytes", threshold)
    return ok


class _PaddedDepthwise(nn.Conv2d):
    """A depthwise convolution that zero-pads an input smaller than its kernel itself.

    Same weights, same numbers: ``F.pad`` then an unpadded convolution is the padded convolution.
    What changes is oneDNN's kernel. On the 2-core AVX2-only CPU (AMD EPYC), the backward pass of a
    depthwise convolution whose input is smaller than its kernel (EfficientNet-Lite's 5x5 and 3x3
    layers at 1-4 px, as at a 64-px input) took 2.6-9x longer with the padding inside the
    convolution than with it outside: 61 against 13 ms for 64 images of 1152 channels at 2 px, 5x5
    kernel. From the kernel's size up, the padded convolution is the faster one, so larger inputs
    keep it.
    """

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[-2] < weight.shape[-2] or x.shape[-1] < weight.shape[-1]:
            ph, pw = self.padding
            return nn.functional.conv2d(nn.functional.pad(x, (pw, pw, ph, ph)), weight, bias, self.stride, 0,
                                        self.dilation, self.groups)
        return super()._conv_forward(x, weight, bias)


@contextlib.contextmanager
def small_input_depthwise(model: nn.Module):
    """While the block runs, ``model``'s zero-padded depthwise convolutions pad inputs smaller than
    their kernel themselves (:class:`_PaddedDepthwise`); afterwards they are plain ``nn.Conv2d`` again.

    For CPU training of EfficientNet-style networks at small inputs: an EfficientNet-Lite0 training
    step of 64 images at 64 px took 0.46 s against 0.78 s on the 2-core AVX2-only CPU
    (``bench/results/core-avx2.md``), with identical outputs; at 160 and 224 px no layer is affected.
    Only the layers' class changes, so state dicts, copies and checkpoints are untouched. Yields the
    number of layers switched.
    """
    convs = [m for m in model.modules()
             if type(m) is nn.Conv2d and m.groups > 1 and m.groups == m.in_channels == m.out_channels
             and m.padding_mode == "zeros" and isinstance(m.padding, tuple) and any(m.padding)]
    for m in convs:
        m.__class__ = _PaddedDepthwise
    try:
        yield len(convs)
    finally:
        for m in convs:
            m.__class__ = nn.Conv2d


def onnxruntime_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def openvino_bf16_available() -> bool:
    """Whether OpenVINO is installed and this CPU computes bfloat16 natively (its ``BF16`` capability)."""
    try:
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # not installed, or no usable CPU plugin
        return False


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); the CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _state_version(model: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or modified in place."""
    return tuple((id(t), t._version) for t in (*model.parameters(), *model.buffers()))


class _TorchRunner:
    backend = "torch"

    def __init__(self, model: nn.Module, bfloat16: bool = False):
        self._model = weakref.ref(model)  # the cache is keyed weakly by the model: never keep it alive
        self.precision = "bfloat16" if bfloat16 else "float32"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this runner no longer exists")
        device = model_device(model)
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if self.precision == "bfloat16"
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            x = x.to(device)
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            return model(x).float()


def _export_graph(model: nn.Module, shape: tuple[int, ...]) -> bytes:
    """The model (in eval mode) as float32 ONNX bytes, through the exporter `pellucid export` uses."""
    from pellucid.core.export import _export_fp32

    was = model.training
    model.eval()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            _export_fp32(model, shape, path)
            return path.read_bytes()
    finally:
        model.train(was)


class _OrtRunner:
    backend = "onnxruntime"

    def __init__(self, graph: bytes, calibration: torch.Tensor | None = None):
        import onnxruntime as ort

        self.precision = "float32"
        if calibration is not None:
            graph = _quantize_int8(graph, calibration)
            self.precision = "int8"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.session.run(None, {"image": arr})[0])


class _OpenVinoRunner:
    """The exported graph compiled by OpenVINO for the CPU with bfloat16 inference precision."""

    backend = "openvino"
    precision = "bfloat16"

    def __init__(self, graph: bytes):
        import openvino as ov

        core = ov.Core()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            path.write_bytes(graph)
            net = core.read_model(str(path))
        compiled = core.compile_model(net, "CPU", {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY",
                                                   "INFERENCE_NUM_THREADS": max(1, torch.get_num_threads())})
        self.request = compiled.create_infer_request()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        out = self.request.infer({0: arr}, share_inputs=True)[0]
        return torch.from_numpy(np.array(out, dtype=np.float32, copy=True))


def _quantize_int8(graph: bytes, calibration: torch.Tensor, batch_size: int = 8) -> bytes:
    """Static INT8 of an ONNX graph with this CPU's settings (:func:`pellucid.core.quantize.local_settings`:
    QDQ, per-channel int8 weights — 7-bit where the CPU lacks VNNI —, uint8 activations, MinMax ranges),
    calibrated on ``calibration`` ``(N, C, H, W)``.

    The first convolution and the final fully connected layer stay in float32: on a fine-tuned
    chest X-ray model (EfficientNet-Lite0) quantizing them doubled the mean change of the class
    probability on LIME's perturbed images (0.084 against 0.045), for little speed.
    """
    import onnx

    from pellucid.core.quantize import end_layers, local_settings, quantize_static_portable

    arr = np.ascontiguousarray(calibration.detach().to("cpu", torch.float32).numpy())
    batches = [arr[i:i + batch_size] for i in range(0, len(arr), batch_size)]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(graph)
        quantize_static_portable(src, dst, batches, nodes_to_exclude=end_layers(onnx.load_from_string(graph)),
                                 settings=local_settings())
        return dst.read_bytes()


def _check(runner, model: nn.Module, shape: tuple[int, ...], tol: float) -> float:
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(1))
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            ref = model(x.to(model_device(model))).float().cpu()
    finally:
        model.train(was)
    got = runner(x).float().cpu()
    if got.shape != ref.shape:
        return float("inf")
    return float((got - ref).abs().max() / max(1.0, float(ref.abs().max())))


def fast_forward(model: nn.Module, shape: tuple[int, ...], backend: str = "auto", tol: float = 1e-3, *,
                 int8_calibration: torch.Tensor | None = None, bfloat16: bool = False
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A cached inference callable ``f(batch) -> logits`` for inputs of per-image ``shape``.

    Args:
        model: the model (an ``nn.Module`` taking ``(N, *shape)`` and returning logits); it must be
            in eval mode when called for ``"torch"`` to mean inference (the ONNX graph is always
            exported in eval mode).
        shape: one input's shape, e.g. ``(3, 224, 224)``; any batch size works.
        backend: ``"auto"`` (ONNX Runtime on CPU when installed and it reproduces the model, else
            torch), ``"torch"`` or ``"onnxruntime"``.
        tol: largest accepted max |logit difference| of the exported graph, relative to the largest
            logit (at least 1).
        int8_calibration: when given, an INT8 ONNX Runtime runner instead (static QDQ quantization
            calibrated on these inputs ``(N, *shape)``; needs ONNX Runtime, runs on the CPU). Its
            logits approximate the model's (no tolerance check); it is cached like the float32
            runner, so later calls reuse the first call's calibration.
        bfloat16: when true, a bfloat16 runner instead: OpenVINO on a CPU with native bfloat16 when
            installed (:func:`openvino_bf16_available`), else eager PyTorch under bfloat16 autocast
            on the model's device. An approximation like INT8 (no tolerance check), cached alike.

    Returns:
        A callable taking a float tensor ``(N, *shape)`` and returning float32 logits ``(N, C)`` on
        the CPU (ONNX Runtime) or the model's device (torch). The callable has a ``backend``
        attribute naming what runs.

    Raises:
        ValueError: unknown backend, or ``"onnxruntime"`` asked for explicitly and it is not
            installed, the device is not the CPU, or the exported graph disagrees with the model.
    """
    if backend not in BACKENDS:
        from pellucid.core.backbones import unknown_name_error

        raise unknown_name_error("inference backend", backend, list(BACKENDS))
    shape = tuple(int(s) for s in shape)
    on_cpu = model_device(model).type == "cpu"
    want = _backend_for(backend, on_cpu, int8_calibration is not None, bfloat16)
    int8 = int8_calibration is not None
    mode = "int8" if int8 else "bfloat16" if bfloat16 else "float32"
    graph_key = (shape, model_device(model).type, _state_version(model))  # what the exported graph depends on
    key = (want, *graph_key, mode)
    entries = _CACHE.setdefault(model, {})
    entry = entries.get(mode)
    if entry is not None and entry["key"] == key:
        return entry["runner"]

    def graph() -> bytes:  # one export per model, shape and weights, shared by the float32 and INT8 runners
        cached = entries.get("graph")
        if cached is None or cached["key"] != graph_key:
            cached = entries["graph"] = {"key": graph_key, "bytes": _export_graph(model, shape)}
        return cached["bytes"]

    if int8:
        try:
            runner = _OrtRunner(graph(), calibration=int8_calibration)
        except Exception as err:
            raise ValueError(f"this model cannot run in INT8 on ONNX Runtime ({type(err).__name__}: "
                             f"{str(err)[:200]}); use float32") from None
        entries[mode] = {"key": key, "runner": runner}
        return runner
    if bfloat16:
        runner = _TorchRunner(model, bfloat16=True)
        if on_cpu and backend != "torch" and openvino_bf16_available():
            try:
                runner = _OpenVinoRunner(graph())
            except Exception as err:  # export or compilation failed: autocast still works
                log.info("OpenVINO bfloat16 runner failed (%s: %s); using torch autocast", type(err).__name__, err)
        entries[mode] = {"key": key, "runner": runner}
        return runner
    runner = _float32_runner(model, shape, graph, backend, tol) if want == "onnxruntime" else _TorchRunner(model)
    entries[mode] = {"key": key, "runner": runner}
    return runner


def _backend_for(backend: str, on_cpu: bool, int8: bool, bfloat16: bool) -> str:
    """What runs the passes (``"onnxruntime"`` or ``"torch"``) for the request; ValueError when impossible."""
    if backend == "onnxruntime" and not onnxruntime_available():
        raise ValueError("the onnxruntime backend needs the packages onnx and onnxruntime: "
                         "pip install 'pellucid[export]'")
    if backend == "onnxruntime" and not on_cpu:
        raise ValueError("the onnxruntime backend runs on the CPU; move the model to the CPU or use backend='torch'")
    want = "onnxruntime" if backend == "onnxruntime" or (backend == "auto" and on_cpu and onnxruntime_available()) \
        else "torch"
    if int8 and bfloat16:
        raise ValueError("ask for INT8 (int8_calibration=) or bfloat16, not both")
    if int8 and (want != "onnxruntime" or not on_cpu):
        raise ValueError("INT8 inference needs ONNX Runtime on the CPU: pip install 'pellucid[export]' and keep the "
                         "model on the CPU, or use float32")
    return want


def _float32_runner(model: nn.Module, shape: tuple[int, ...], graph: Callable[[], bytes], backend: str, tol: float):
    """The ONNX Runtime float32 runner when its graph reproduces the model, else eager torch (or, when
    ONNX Runtime was asked for by name, a ValueError saying why not)."""
    try:
        exported = graph()
    except Exception as err:  # an operator the exporter cannot write (ExportError): eager torch still works
        if backend == "onnxruntime":
            raise ValueError(f"this model cannot run on ONNX Runtime ({type(err).__name__}: {str(err)[:200]}); "
                             "use backend='torch'") from None
        log.info("no ONNX Runtime fast path for this model (%s); using torch", type(err).__name__)
        log.debug("ONNX export failed: %s", err)
        return _TorchRunner(model)
    try:
        candidate = _OrtRunner(exported)
        diff = _check(candidate, model, shape, tol)
        if diff <= tol:
            return candidate
        if backend == "onnxruntime":
            raise ValueError(f"the ONNX graph of this model differs from it (relative max |logit diff| {diff:.2e} "
                             f"> {tol:.0e}); use backend='torch'")
        log.info("ONNX Runtime graph differs from the model (%.2e); using torch", diff)
    except ValueError:
        raise
    except Exception as err:  # an operator the exporter cannot handle: eager torch still works
        if backend == "onnxruntime":
            raise ValueError(f"this model cannot run on ONNX Runtime ({type(err).__name__}: {str(err)[:200]}); "
                             "use backend='torch'") from None
        log.info("ONNX export for the fast path failed (%s: %s); using torch", type(err).__name__, err)
    return _TorchRunner(model)
