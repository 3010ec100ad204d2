"""The product side of few-shot learning: :func:`fit_prototypes` writes a model folder of kind
``"prototypes"`` from a folder of labelled support images (logit scale fitted by leave-one-out on
the support set), :func:`load_prototypes` rebuilds its :class:`PrototypicalNetwork`, and
:func:`nearest_support` gives the support images closest to a query as an example-based
explanation."""
from __future__ import annotations

import datetime as _dt
import math
import platform
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pellucid.core.backbones import create_backbone
from pellucid.core.card import ModelCard
from pellucid.core.fewshot.config import (
    DEFAULT_BACKBONE,
    FewShotError,
    ProtoConfig,
    default_config,
    embedding_weight_candidates,
    layer_groups,
    split_candidate,
    with_transduction,
)
from pellucid.core.fewshot.features import DEFAULT_CACHE_DIR, extract_features
from pellucid.core.fewshot.head import loo_logistic_logits
from pellucid.core.fewshot.maths import _logits_from_distances, pairwise_distances
from pellucid.core.fewshot.network import PrototypicalNetwork

__all__ = [
    "fit_prototypes",
    "fit_support",
    "fit_head_scale",
    "select_embedding",
    "embedding_config",
    "CRITERIA",
    "load_prototypes",
    "nearest_support",
    "support_channels",
    "luminance_task",
]


def _loo_logits(emb: torch.Tensor, labels: torch.Tensor, n_way: int, cfg: ProtoConfig,
                n_images: int | None = None) -> torch.Tensor | None:
    """Leave-one-out logits ``(n_images, n_way)`` of the nearest-prototype rule at scale 1 (each
    support image against prototypes built without it), or None when some class has a single image.

    ``n_images``: the number of support images when ``emb`` also holds their mirrored copies (row
    ``i + k * n_images`` belongs to image ``i``); leaving an image out removes all its rows, and only
    the unmirrored row is scored (queries are not mirrored)."""
    n_images = len(emb) if n_images is None else int(n_images)
    labels = labels.long()
    if bool((torch.bincount(labels[:n_images], minlength=n_way) < 2).any()):
        return None
    owner = torch.arange(len(emb)) % n_images
    counts = torch.bincount(labels, minlength=n_way).to(emb.dtype)
    sums = torch.zeros(n_way, emb.shape[1], dtype=emb.dtype).index_add(0, labels, emb)
    dist = torch.empty(n_images, n_way)
    for i in range(n_images):
        mine = owner == i
        c = labels[i]
        protos = sums / counts.unsqueeze(1)
        protos[c] = (sums[c] - emb[mine].sum(0)) / (counts[c] - mine.sum())
        dist[i] = pairwise_distances(emb[i:i + 1], protos, cfg.distance)[0]
    return _logits_from_distances(dist, cfg, 1.0)


def _fit_scale(emb: torch.Tensor, labels: torch.Tensor, n_way: int, cfg: ProtoConfig,
               n_images: int | None = None) -> tuple[float, float, float] | None:
    """Leave-one-out over the support set: (fitted logit scale, LOO accuracy, LOO NLL at that
    scale), or None when some class has a single support image. This plain NLL fit ranks layer
    weights and embeddings (as measured); the scale a model keeps is :func:`calibrated_scale`'s.
    ``n_images``: as in :func:`_loo_logits`."""
    n_images = len(emb) if n_images is None else int(n_images)
    return _plain_fit(_loo_logits(emb, labels, n_way, cfg, n_images), labels)


def _plain_fit(base: torch.Tensor | None, labels: torch.Tensor) -> tuple[float, float, float] | None:
    """(scale, accuracy, NLL at that scale) of leave-one-out logits ``base`` by the plain NLL fit."""
    if base is None:
        return None
    from pellucid.core.calibration import fit_temperature

    y = labels.long()[:len(base)]
    acc = float((base.argmax(1) == y).float().mean())
    try:
        temperature = fit_temperature(base.double(), y, label_smoothing=0.0)
    except ValueError:
        return None
    scale = float(min(max(1.0 / temperature, 1e-2), 1e4))
    nll = float(torch.nn.functional.cross_entropy(base.double() * scale, y))
    return scale, acc, nll


def calibrated_scale(loo_logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The logit scale a few-shot model keeps: the temperature fitted on the support set's
    leave-one-out logits with label smoothing 1 / (n + 1) for n support images.

    Without smoothing, a support set whose leave-one-out is all right (often, with 5 images per
    class) pushes the scale to its bound and the model says 0.99 when it is wrong: on 50 tb_cxr dev
    draws the query NLL of the logistic head averaged 13.2 (worst draw 131) with the plain fit and
    0.33 (worst 0.69) with the smoothed one, whose confidence matched its accuracy within 0.004
    (docs/fewshot.md)."""
    from pellucid.core.calibration import fit_temperature

    y = labels.long()[:len(loo_logits)]
    try:
        temperature = fit_temperature(loo_logits.double(), y, label_smoothing=1.0 / (len(y) + 1))
    except ValueError:
        return 1.0
    return float(min(max(1.0 / temperature, 1e-2), 1e4))


def _choose_weights(net: PrototypicalNetwork, raw, labels, n_way: int, mirrored) -> dict[str, float]:
    """``auto_weights``: set ``net.config.layer_weights`` to the candidate with the lowest
    leave-one-out NLL on the support set; returns every candidate's NLL (card metrics)."""
    scores: dict[str, float] = {}
    best, original = None, net.config
    for w in embedding_weight_candidates(net.config.layers):
        net.config = replace(net.config, layer_weights=w)
        net.set_support(raw, labels, n_way, mirrored=mirrored)
        fitted = _fit_scale(net.support_embeddings, net.support_labels, n_way, net.config, n_images=len(raw))
        if fitted is None:  # a class with one image: nothing to choose by
            net.config = original
            return {}
        scores[",".join(f"{x:g}" for x in w)] = round(fitted[2], 4)
        if best is None or fitted[2] < best[0]:
            best = (fitted[2], w)
    net.config = replace(net.config, layer_weights=best[1])
    return scores


#: How ``auto_backbones`` ranks the candidate embeddings on the support set: leave-one-out NLL
#: (at each candidate's fitted scale; lower wins) or leave-one-out accuracy (ties broken by NLL).
CRITERIA = ("nll", "accuracy")


def select_embedding(fits, criterion: str = "nll") -> str | None:
    """The candidate embedding a support set prefers.

    Args:
        fits: ``{candidate name: (scale, loo accuracy, loo nll) or None}``, the results of
            :func:`fit_support` for every candidate on the same support set, in candidate order
            (the first is the fallback).
        criterion: one of :data:`CRITERIA`.

    Returns:
        The chosen name; None when some candidate could not be scored (a class with one image),
        the caller then keeps the first candidate.
    """
    if criterion not in CRITERIA:
        from pellucid.registry import unknown_name_error

        raise unknown_name_error("criterion", criterion, list(CRITERIA))
    if not fits or any(f is None for f in fits.values()):
        return None
    if criterion == "nll":
        return min(fits, key=lambda k: fits[k][2])
    return min(fits, key=lambda k: (-fits[k][1], fits[k][2]))


def embedding_config(config: ProtoConfig, primary, extras=()) -> ProtoConfig:
    """``config`` turned into the embedding of ``primary`` plus the ``extras`` backbones (specs):
    the primary's own ``layers`` (its tap layers when ``config.layers`` is empty), then every extra
    backbone's tap layers as ``"<name>:<layer>"``; ``layer_weights`` repeated for each backbone;
    with extras the input is the largest of the backbones' input sizes (each backbone gets the
    images resized to its own), or ``config.resolution`` when set (every backbone at that side).
    No extras: ``config`` with ``backbones=()`` (and ``image_size`` = ``config.resolution`` when set).
    With ``config.scales``, all those layers again at each side (``"@<side>:<layer>"``,
    ``"<name>@<side>:<layer>"``), the weights repeated, and the input at the largest side (every
    backbone runs at ``config.resolution`` or its own input size besides the scales)."""
    own = [l for l in config.layers if ":" not in l] or list(primary.tap_layers)
    own_weights = None
    if config.layer_weights is not None:
        groups = layer_groups(config.layers)
        if groups and groups[0][0] == "" and len(groups[0][1]) == len(own):
            own_weights = list(config.layer_weights[:len(own)])
    if not extras and not config.scales:
        return replace(config, backbones=(), layers=tuple(own),
                       layer_weights=None if own_weights is None else tuple(own_weights),
                       image_size=config.resolution or config.image_size)
    layers = list(own) + [f"{spec.name}:{t}" for spec in extras for t in spec.tap_layers]
    base = [("", own)] + [(spec.name, list(spec.tap_layers)) for spec in extras]
    layers += [f"{name}@{side}:{t}" for side in config.scales for name, taps in base for t in taps]
    weights = None
    if own_weights is not None and all(len(spec.tap_layers) == len(own) for spec in extras):
        weights = tuple(own_weights * ((1 + len(extras)) * (1 + len(config.scales))))
    size = max([config.resolution or spec.input_size for spec in (primary, *extras)] + list(config.scales))
    return replace(config, backbones=tuple(spec.name for spec in extras), layers=tuple(layers),
                   layer_weights=weights, image_size=size)


def fit_support(net: PrototypicalNetwork, raw: torch.Tensor, labels: torch.Tensor, n_way: int,
                mirrored: torch.Tensor | None = None) -> tuple[float, float, float] | None:
    """What ``fewshot fit`` fits from support features: the layer weights when
    ``config.auto_weights``, the prototypes (:meth:`PrototypicalNetwork.set_support`, with the
    ``mirrored`` copies when given) and the logit scale by leave-one-out NLL, written into ``net``
    (its ``config`` and ``log_scale``). The layer weights and the scale are the nearest-prototype
    rule's (what ranks candidate embeddings); with ``config.head = "logistic"`` the head is then
    fitted on the chosen embedding, and :func:`fit_head_scale` gives it its own scale.

    Returns:
        (scale kept (:func:`calibrated_scale`), leave-one-out accuracy, leave-one-out NLL at the
        plain fitted scale: what ranks embeddings) of the prototypes, or None when some class has a
        single image (scale unchanged).
    """
    head = net.config.head
    net.config = replace(net.config, head="prototypes")  # the choices are the prototypes' (as measured)
    net.weight_scores = {}
    if net.config.auto_weights and len(net.config.layers) > 1:
        net.weight_scores = _choose_weights(net, raw, labels, n_way, mirrored)
    net.set_support(raw, labels, n_way, mirrored=mirrored)
    base = _loo_logits(net.support_embeddings, net.support_labels, n_way, net.config, len(raw))
    fitted = _plain_fit(base, net.support_labels)
    if fitted is not None:
        scale = calibrated_scale(base, net.support_labels)
        fitted = (scale, fitted[1], fitted[2])
        net.log_scale.fill_(math.log(scale))
        net.config = replace(net.config, scale=scale)
    if head != "prototypes":
        net.config = replace(net.config, head=head)
        net.set_support(raw, labels, n_way, mirrored=mirrored)  # fits the head on the chosen embedding
    return fitted


def fit_head_scale(net: PrototypicalNetwork, n_way: int, n_images: int) -> tuple[float, float, float] | None:
    """For ``config.head = "logistic"``: the logit scale of the logistic head that
    :meth:`PrototypicalNetwork.set_support` fitted, from leave-one-out logits of the support set
    (each image scored by the head fitted without it and its mirrored copies;
    :func:`calibrated_scale`), written into ``net`` (``log_scale`` and ``config.scale``).

    Returns:
        (scale, leave-one-out accuracy, leave-one-out NLL) of the head, or None when some class has
        a single image (scale 1: the head's own logits) or the head is the prototypes'.
    """
    if net.config.head != "logistic":
        return None
    loo = loo_logistic_logits(net.support_embeddings, net.support_labels, n_way, net.config.head_c, n_images)
    scale = 1.0
    fitted = None
    if loo is not None:
        y = net.support_labels[:n_images]
        scale = calibrated_scale(loo, y)
        nll = float(torch.nn.functional.cross_entropy(loo.double() * scale, y))
        fitted = (scale, float((loo.argmax(1) == y).float().mean()), nll)
    net.log_scale.fill_(math.log(scale))
    net.config = replace(net.config, scale=scale)
    return fitted


def _check_support_classes(support_dir: Path, classes: list[str], task: str) -> None:
    """Refuse fewer than two support classes, a task name that is not 1-64 letters, digits, '-' and '_'
    (it is written into the card and shown at every door), or a registered task name whose classes differ."""
    from pellucid.core.tasks import TASK_NAME, get_task, list_tasks

    if not isinstance(task, str) or len(task) > 64 or not TASK_NAME.fullmatch(task):
        shown = repr(task)[:40] + ("..." if len(repr(task)) > 40 else "")
        raise FewShotError(f"task name {shown}: a task name is 1 to 64 letters, digits, '-' and '_' (such as tb or "
                           "my-xrays); pick another --task name")
    if len(classes) < 2:
        raise FewShotError(f"{support_dir}: found {len(classes)} class ({', '.join(classes)}); a prototypes model "
                           "needs at least 2 class sub-folders with a few images each")
    if task in list_tasks() and list(get_task(task).classes) != classes:
        raise FewShotError(f"task name {task!r} belongs to the registered task with classes "
                           f"{list(get_task(task).classes)}, not {classes}; pick another --task name")


def support_channels(task: str, channels: int | None = None) -> int:
    """The channels a few-shot model reads its images with: ``channels`` when given (1 or 3), else a
    registered ``task``'s own (1 for the tb app), else 3 (colour)."""
    from pellucid.core.tasks import get_task, list_tasks

    if channels is None:
        return int(get_task(task).channels) if task in list_tasks() else 3
    if isinstance(channels, bool) or channels not in (1, 3):
        raise FewShotError(f"channels must be 1 (luminance) or 3 (colour); got {channels!r}")
    return int(channels)


def luminance_task(classes) -> str | None:
    """The registered task whose classes are exactly ``classes`` and which reads its images as luminance
    (``channels = 1``, as the tb and sonar apps do), or None: what ``fewshot fit`` points a colour fit to."""
    from pellucid.core.tasks import get_task, list_tasks

    for name in list_tasks():
        spec = get_task(name)
        if list(spec.classes) == list(classes) and int(spec.channels) == 1:
            return spec.name
    return None


def _fewshot_section(config: ProtoConfig, extras=(), candidates=None, criterion: str = "nll",
                     primary: str = "") -> dict:
    """The card's ``fewshot`` section: every :class:`ProtoConfig` field, the method, the extra
    backbones' weights and normalisation, and what the levers mean for a user."""
    out = {**config.to_dict(), "method": "prototypical network (Snell et al., 2017)"}
    if extras:
        out["extra_backbones"] = list(extras)
    notes = []
    if candidates:
        chosen = "+".join([primary, *config.backbones, *(f"@{side}" for side in config.scales)])
        rule = "NLL" if criterion == "nll" else criterion
        notes.append(f"embedding {chosen} chosen by leave-one-out {rule} on the support set among {candidates}")
    if config.resolution:
        notes.append(f"every backbone sees the images at {config.resolution} px (decoded at that side, no resize "
                     "inside the model)")
    if config.scales:
        sides = ", ".join(f"{s} px" for s in config.scales)
        notes.append(f"multi-scale: every backbone also runs at {sides}, its features appended; the images are "
                     f"decoded at {config.image_size} px and resized for each backbone and side; a CAM follows "
                     "the first pass through its layer (the first backbone at its own side)")
    if config.backbones:
        notes.append(f"the embedding concatenates the features of {primary} and {', '.join(config.backbones)}; "
                     f"CAM explainers hook {primary} only, so a CAM shows the part of the decision that flows "
                     "through it (the other backbones' share is not shown); occlusion, LIME and the nearest "
                     "support images explain the whole model")
    if config.head == "logistic":
        notes.append(f"classifier: a logistic regression (C = {config.head_c:g}) fitted on the support embeddings, "
                     "its logits scaled by a temperature fitted by leave-one-out on the support set; the class "
                     "prototypes are kept for the nearest-support explanation")
    if config.auto_weights:
        notes.append(f"layer weights {list(config.layer_weights or [])} chosen by leave-one-out NLL on the support set")
    if config.support_flip:
        notes.append("support augmentation: the mirror of every support image is an extra support embedding")
    if config.flip:
        notes.append("test-time flip: features are averaged over each image and its mirror")
    if config.transductive:
        notes.append(f"transductive: the prototypes are refined by {config.transductive} soft k-means step(s) on "
                     "each batch being predicted, so a prediction depends on the other images predicted with it "
                     "(in `pellucid predict`, the images passed together); the stored prototypes never change")
    if notes:
        out["notes"] = notes
    return out


def _prototypes_card(support_dir: Path, samples, classes: list[str], task: str, spec, info: dict, size: int,
                     config: ProtoConfig, fitted, metrics: dict, *, seconds: float, extras=(), candidates=None,
                     criterion: str = "nll", channels: int = 3) -> ModelCard:
    """The ``card.json`` of a prototypes model folder built by :func:`fit_prototypes`."""
    import pellucid

    return ModelCard.from_dict({
        "kind": "prototypes",
        "pellucid_version": pellucid.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "task": task,
        "title": f"few-shot prototypes from {support_dir.name}",
        "classes": classes,
        "positive_class": None,
        "modality": "other",
        "intended_use": "Research prototype: few-shot classification from a few labelled examples "
                        f"({'a logistic head on' if config.head == 'logistic' else 'nearest prototype in'} a frozen "
                        "ImageNet embedding); not validated for clinical use.",
        "explainers": ["gradcam"],
        "backbone": spec.to_dict(),
        "weights": info,
        "preprocessing": {"image_size": size, "channels_in": channels, "resize": "squash", "input_range": [0.0, 1.0],
                          "mean": list(spec.mean), "std": list(spec.std)},
        "threshold": None,
        "calibration": {"temperature": 1.0, "method": "logit scale fitted by leave-one-out NLL on the support set"
                        if fitted else "none"},
        "fewshot": _fewshot_section(config, extras, candidates, criterion, spec.name),
        "support": [{"path": str(Path(s.path).resolve()), "label": s.label} for s in samples],
        "metrics": metrics,
        "split": {},
        "training": {"seconds": seconds, "python": platform.python_version(),
                     "torch": torch.__version__, "support_dir": str(support_dir.resolve())},
        "recipe": {"mode": "frozen features"},
    })


def candidate_embeddings(bb, config: ProtoConfig, *, pretrained: bool | str = True,
                         extras_pool: dict | None = None) -> list[tuple[str, PrototypicalNetwork]]:
    """The embeddings a support set chooses from, as ``[(name, network)]`` in candidate order (the
    first is the fallback): with ``config.auto_backbones``, ``bb`` alone and ``bb`` with each extra
    set (a candidate's ``"@<side>"`` entries are input sides its embedding also runs at, and its name
    ends with them, e.g. ``"efficientnet_lite0+efficientnet_lite2+@320"``); else the one embedding of
    ``config.backbones``. Each network's ``config.image_size`` is its
    input side. ``extras_pool`` (``{name: (backbone, weight info)}``) keeps the extra backbones built
    here, one per name, shared by the candidates."""
    several = bool(config.backbones or config.auto_backbones or config.scales)
    candidates = list(dict.fromkeys([(), *config.auto_backbones])) if config.auto_backbones else [config.backbones]
    pool = {} if extras_pool is None else extras_pool
    out = []
    for cand in candidates:
        names, sides = split_candidate(cand)
        for name in names:
            if name not in pool:
                pool[name] = create_backbone(name, pretrained=pretrained)
        extras = [pool[name][0] for name in names]
        if several:
            scales = tuple(dict.fromkeys([*config.scales, *sides]))
            cfg = embedding_config(replace(config, scales=scales), bb.spec, [e.spec for e in extras])
        else:
            cfg = replace(config, image_size=config.resolution or config.image_size)
        cfg = replace(cfg, image_size=int(cfg.image_size or bb.spec.input_size))
        out.append(("+".join([bb.spec.name, *cand]), PrototypicalNetwork(bb, cfg, extras=extras)))
    return out


def embedding_features(net: PrototypicalNetwork, paths, *, weight_info: dict | None = None,
                       cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
                       progress: bool = False, channels: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raw features of ``paths`` for ``net`` at its input side, and those of their mirror images when
    ``config.support_flip`` asks for them (None otherwise; with ``flip`` the features are
    mirror-averaged already). ``channels``: 1 reads the images as luminance (gray replicated)."""
    size = int(net.config.image_size)
    raw = extract_features(net, paths, image_size=size, weight_info=weight_info, cache_dir=cache_dir,
                           progress=progress, channels=channels)
    mirrored = None
    if net.config.support_flip and not net.config.flip:
        mirrored = extract_features(net, paths, image_size=size, weight_info=weight_info, cache_dir=cache_dir,
                                    progress=progress, mirror=True, channels=channels)
    return raw, mirrored


@dataclass
class Choice:
    """What :func:`fit_and_choose` fitted: the chosen candidate's ``name`` and ``net`` (fitted),
    ``chosen`` (the name, or None when the support set could not rank the candidates and the first
    was kept), ``fitted`` (scale, leave-one-out accuracy, leave-one-out NLL) of the model's own
    classifier (None when some class has one image, or when the head's scale was not fitted),
    ``prototype_fit`` (the same for the prototypes, when the classifier is the logistic head) and
    ``fits`` (every candidate's prototype fit, what ranked them)."""

    name: str
    chosen: str | None
    net: PrototypicalNetwork
    fitted: tuple[float, float, float] | None
    prototype_fit: tuple[float, float, float] | None
    fits: dict


def fit_and_choose(parts, labels: torch.Tensor, n_way: int, criterion: str = "nll", *,
                   head_scale: bool = True) -> Choice:
    """What ``fewshot fit`` fits on a support set, from features: :func:`fit_support` on every
    candidate embedding with the prototypes (layer weights and scale by leave-one-out),
    :func:`select_embedding` keeps one, and with ``config.head = "logistic"`` the head is fitted on
    it and (``head_scale``) :func:`fit_head_scale` gives it its scale. The one path of
    :func:`fit_prototypes` and of the episodes of ``pellucid fewshot eval``.

    Args:
        parts: ``{name: (network, raw support features, mirrored features or None)}`` in candidate
            order, e.g. from :func:`candidate_embeddings` and :func:`embedding_features`.
        head_scale: fit the head's logit scale (leave-one-out: one fit per support image). A scale does
            not reorder the classes, so accuracy needs none; the prototypes' scale stays then.
    """
    fits = {}
    for name, (net, raw, mirrored) in parts.items():
        head = net.config.head
        net.config = replace(net.config, head="prototypes")  # the head is fitted on the chosen one only
        fits[name] = fit_support(net, raw, labels, n_way, mirrored=mirrored)
        net.config = replace(net.config, head=head)
    chosen = select_embedding(fits, criterion) if len(fits) > 1 else None
    name = chosen or next(iter(fits))
    net, raw, mirrored = parts[name]
    fitted, proto_fit = fits[name], None
    if net.config.head != "prototypes":
        net.set_support(raw, labels, n_way, mirrored=mirrored)
        proto_fit, fitted = fitted, (fit_head_scale(net, n_way, len(raw)) if head_scale else None)
    return Choice(name, chosen, net, fitted, proto_fit, fits)


def fit_prototypes(support_dir: str | Path, out: str | Path, *, backbone: str = DEFAULT_BACKBONE,
                   pretrained: bool | str = True, checkpoint: str | None = None, config: ProtoConfig | None = None,
                   task: str = "fewshot", cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
                   transductive: int | None = None, criterion: str = "nll", progress: bool = False,
                   overwrite: bool = False, channels: int | None = None) -> Path:
    """Build a prototypes model folder from a folder of labelled support images.

    Args:
        support_dir: one sub-folder per class (or a ``manifest.csv`` with ``path,label[,group]``).
        out: model folder to write (``model.safetensors`` + ``card.json``).
        backbone: registered backbone name.
        pretrained: weight source as in :func:`~pellucid.core.backbones.create_backbone` (``False`` for
            random weights — tests only; the card records it).
        checkpoint: explicit weights file or model folder for the backbone.
        config: embedding and distance; default :func:`~pellucid.core.fewshot.config.default_config`
            of the backbone.
        task: task name written in the card; a registered task name is accepted only when its classes
            are exactly the support classes.
        cache_dir: feature cache folder (None: memory only).
        transductive: when given, overrides ``config.transductive`` (soft k-means steps on each
            predicted batch; opt-in, since a prediction then depends on the rest of its batch).
        criterion: with ``config.auto_backbones``, how the support set ranks the candidate
            embeddings (:data:`CRITERIA`, :func:`select_embedding`).
        progress: show progress bars.
        overwrite: replace what ``out`` holds of another model or run (otherwise that is refused, before
            any work).
        channels: 1 reads every image as luminance (gray replicated), at fitting and, through the card's
            ``preprocessing.channels_in``, at every prediction; 3 keeps colour. Default: a registered
            ``task``'s own channels (the tb app's 1: the colour of its X-rays is a source artefact), else 3.

    Returns:
        The model folder. The card's ``support`` lists every support file with its label (for the
        nearest-example explanation) and ``metrics`` the leave-one-out accuracy on the support set
        (with ``auto_backbones``, also ``embedding_choice``: every candidate's leave-one-out NLL and
        accuracy and the chosen one, which the card's ``fewshot`` section holds as ``backbones``).

    Raises:
        DataError: unreadable support folder. FewShotError: fewer than two classes, or a task name
        that belongs to another task. TrainingError: ``out`` is a file, cannot be written, or holds another
        model or run (without ``overwrite``).
    """
    import time

    from pellucid.core.modelfolder import save_model
    from pellucid.core.runs import claim_out_folder
    from pellucid.datasets.samples import class_counts, load_samples

    t0 = time.time()
    claim_out_folder(out, overwrite, what="this few-shot model", clear=False)  # before any work; cleared only
    # when the new model is ready, so a failed fit leaves the old one in place
    support_dir = Path(support_dir)
    samples = load_samples(support_dir)
    classes = sorted(class_counts(samples))
    _check_support_classes(support_dir, classes, task)
    channels = support_channels(task, channels)
    bb, info = create_backbone(backbone, pretrained=pretrained, checkpoint=checkpoint)
    if config is None:
        config = default_config(bb.spec)
    if transductive is not None:
        config = with_transduction(config, transductive)
    labels = torch.tensor([classes.index(s.label) for s in samples])
    paths = [s.path for s in samples]
    extras_pool: dict[str, tuple] = {}
    parts = {name: (net, *embedding_features(net, paths, weight_info=info, cache_dir=cache_dir, progress=progress,
                                             channels=channels))
             for name, net in candidate_embeddings(bb, config, pretrained=pretrained, extras_pool=extras_pool)}
    choice = fit_and_choose(parts, labels, len(classes), criterion)
    name, chosen, net, fitted, fits = choice.name, choice.chosen, choice.net, choice.fitted, choice.fits
    config = net.config
    size = int(config.image_size)
    metrics: dict = {"n_support": len(samples), "per_class": class_counts(samples)}
    if choice.prototype_fit is not None:
        metrics["prototype_loo_accuracy"] = choice.prototype_fit[1]
    if fitted is None:
        warnings.warn("a class has a single support image: the logit scale is not fitted (probabilities are "
                      "uncalibrated); add a second image per class", stacklevel=2)
    else:
        metrics["support_loo_accuracy"] = fitted[1]
        if getattr(net, "weight_scores", None):
            metrics["layer_weights_loo_nll"] = net.weight_scores
    if len(fits) > 1:
        metrics["embedding_choice"] = {
            "criterion": criterion if chosen else "none (a class has one image: first candidate kept)",
            "chosen": name,
            "loo_nll": {k: None if f is None else float(f"{f[2]:.6g}") for k, f in fits.items()},
            "loo_accuracy": {k: None if f is None else f[1] for k, f in fits.items()}}
    extra_info = [{"name": e.spec.name, "weights": extras_pool[e.spec.name][1], "input_size": net.embedder.side(e),
                   "mean": list(e.spec.mean), "std": list(e.spec.std)} for e in net.embedder.extras]
    card = _prototypes_card(support_dir, samples, classes, task, bb.spec, info, size, config, fitted,
                            metrics, seconds=round(time.time() - t0, 1), extras=extra_info,
                            candidates=list(fits) if len(fits) > 1 else None, criterion=criterion,
                            channels=channels)
    net.support_items = [(str(Path(s.path).resolve()), s.label) for s in samples]
    folder = save_model(claim_out_folder(out, overwrite, what="this few-shot model"), net, card)
    if len(samples) >= 2:  # the domain check of this model: its support images' embeddings
        from pellucid.core.ood import NeighbourReference, save_reference

        save_reference(folder, NeighbourReference.fit(parts[name][1].float().numpy()))
    return folder


def _bad_fewshot_card(folder: Path, err: Exception) -> Exception:
    from pellucid.core.modelfolder import ModelFolderError

    return ModelFolderError(f"{folder}/card.json: its fewshot section does not hold together ({err}); refit the "
                            "model with `pellucid fewshot fit`")


def load_prototypes(folder: str | Path, card: ModelCard) -> PrototypicalNetwork:
    """Rebuild the :class:`PrototypicalNetwork` of a prototypes model folder (eval mode, CPU).

    Raises:
        ModelFolderError: missing weights, or weights that do not fit the card's backbone.
    """
    from safetensors.torch import load_file

    from pellucid.core.modelfolder import ModelFolderError, weights_mismatch

    folder = Path(folder)
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise ModelFolderError(f"{folder} has no model.safetensors: rerun `pellucid fewshot fit`")
    try:
        config = ProtoConfig.from_dict(card.extra["fewshot"])
        bb, _ = create_backbone(card.backbone_name, pretrained=False)
    except (KeyError, TypeError) as err:
        raise ModelFolderError(f"{folder}/card.json: prototypes card is missing or has a bad {err}") from err
    except FewShotError as err:
        raise _bad_fewshot_card(folder, err) from err
    pre = card.preprocessing
    if pre.mean and pre.std:
        bb.spec = replace(bb.spec, mean=tuple(pre.mean), std=tuple(pre.std))
    extras = []
    described = {e.get("name"): e for e in card.extra["fewshot"].get("extra_backbones", [])}
    for name in config.backbones:
        extra, _ = create_backbone(name, pretrained=False)
        e = described.get(name, {})
        if e.get("mean") and e.get("std"):
            extra.spec = replace(extra.spec, mean=tuple(e["mean"]), std=tuple(e["std"]))
        extras.append(extra)
    try:
        net = PrototypicalNetwork(bb, config, extras=extras)
    except FewShotError as err:
        raise _bad_fewshot_card(folder, err) from err
    state = load_file(str(weights))
    state.setdefault("head_weight", torch.zeros(0, 0))  # folders written before the logistic head
    state.setdefault("head_bias", torch.zeros(0))
    if config.head == "logistic" and state["head_weight"].numel() == 0:
        raise ModelFolderError(f"{weights} has no logistic head although {folder}/card.json asks for one: "
                               "refit it with `pellucid fewshot fit`")
    net._resize_buffers(state)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise weights_mismatch(weights, card, err) from err
    if net.n_way != len(card.classes):
        raise ModelFolderError(f"{weights} holds {net.n_way} prototypes but the card lists "
                               f"{len(card.classes)} classes")
    net.support_items = [(s["path"], s["label"]) for s in card.extra.get("support", [])]
    return net.eval()


@torch.no_grad()
def nearest_support(model: PrototypicalNetwork, image: torch.Tensor, k: int = 3) -> list[tuple[str, str, float]]:
    """The ``k`` support images closest to one query: an example-based explanation.

    Args:
        model: a loaded prototypes model (:func:`load_prototypes`).
        image: one image ``(3, S, S)`` or ``(1, 3, S, S)`` in [0, 1], preprocessed as for prediction.
        k: how many neighbours.

    Returns:
        ``[(path, label, distance)]`` nearest first, distances in the model's metric.
    """
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[0] != 1:
        raise FewShotError(f"nearest_support explains one image (3, S, S); got shape {tuple(image.shape)}")
    if not model.support_items:
        raise FewShotError("this prototypes model does not list its support images; refit it with "
                           "`pellucid fewshot fit`")
    was = model.training
    model.eval()
    try:
        emb = model.features(image.to(model.prototypes.device))
    finally:
        model.train(was)
    dist = pairwise_distances(emb, model.support_embeddings, model.config.distance)[0]
    n = len(model.support_items)
    best: dict[int, float] = {}  # image -> its closest row (mirrored copies of support_flip share an image)
    for i in torch.argsort(dist).tolist():
        best.setdefault(i % n, float(dist[i]))
        if len(best) == k:
            break
    return [(model.support_items[i][0], model.support_items[i][1], d) for i, d in best.items()]
