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
from dataclasses import replace
from pathlib import Path

import torch

from pellucid.core.backbones import create_backbone
from pellucid.core.card import ModelCard
from pellucid.core.fewshot.config import DEFAULT_BACKBONE, FewShotError, ProtoConfig, default_config, weight_candidates
from pellucid.core.fewshot.features import DEFAULT_CACHE_DIR, extract_features
from pellucid.core.fewshot.maths import _logits_from_distances, pairwise_distances
from pellucid.core.fewshot.network import PrototypicalNetwork

__all__ = [
    "fit_prototypes",
    "fit_support",
    "load_prototypes",
    "nearest_support",
]


def _fit_scale(emb: torch.Tensor, labels: torch.Tensor, n_way: int, cfg: ProtoConfig,
               n_images: int | None = None) -> tuple[float, float, float] | None:
    """Leave-one-out over the support set: (fitted logit scale, LOO accuracy, LOO NLL at that
    scale), or None when some class has a single support image.

    ``n_images``: the number of support images when ``emb`` also holds their mirrored copies (row
    ``i + k * n_images`` belongs to image ``i``); leaving an image out removes all its rows, and only
    the unmirrored row is scored (queries are not mirrored)."""
    n_images = len(emb) if n_images is None else int(n_images)
    labels = labels.long()
    if bool((torch.bincount(labels[:n_images], minlength=n_way) < 2).any()):
        return None
    from pellucid.core.calibration import fit_temperature

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
    base = _logits_from_distances(dist, cfg, 1.0)
    acc = float((base.argmax(1) == labels[:n_images]).float().mean())
    try:
        temperature = fit_temperature(base.double(), labels[:n_images])
    except ValueError:
        return None
    scale = float(min(max(1.0 / temperature, 1e-2), 1e4))
    nll = float(torch.nn.functional.cross_entropy(base.double() * scale, labels[:n_images]))
    return scale, acc, nll


def _choose_weights(net: PrototypicalNetwork, raw, labels, n_way: int, mirrored) -> dict[str, float]:
    """``auto_weights``: set ``net.config.layer_weights`` to the candidate with the lowest
    leave-one-out NLL on the support set; returns every candidate's NLL (card metrics)."""
    scores: dict[str, float] = {}
    best, original = None, net.config
    for w in weight_candidates(len(net.config.layers)):
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


def fit_support(net: PrototypicalNetwork, raw: torch.Tensor, labels: torch.Tensor, n_way: int,
                mirrored: torch.Tensor | None = None) -> tuple[float, float, float] | None:
    """What ``fewshot fit`` fits from support features: the layer weights when
    ``config.auto_weights``, the prototypes (:meth:`PrototypicalNetwork.set_support`, with the
    ``mirrored`` copies when given) and the logit scale by leave-one-out NLL, written into ``net``
    (its ``config`` and ``log_scale``).

    Returns:
        (scale, leave-one-out accuracy, leave-one-out NLL), or None when some class has a single
        image (scale unchanged).
    """
    if net.config.auto_weights and len(net.config.layers) > 1:
        net.weight_scores = _choose_weights(net, raw, labels, n_way, mirrored)
    net.set_support(raw, labels, n_way, mirrored=mirrored)
    fitted = _fit_scale(net.support_embeddings, net.support_labels, n_way, net.config, n_images=len(raw))
    if fitted is not None:
        net.log_scale.fill_(math.log(fitted[0]))
        net.config = replace(net.config, scale=fitted[0])
    return fitted


def _check_support_classes(support_dir: Path, classes: list[str], task: str) -> None:
    """Refuse fewer than two support classes, or a registered task name whose classes differ."""
    from pellucid.core.tasks import get_task, list_tasks

    if len(classes) < 2:
        raise FewShotError(f"{support_dir}: found {len(classes)} class ({', '.join(classes)}); a prototypes model "
                           "needs at least 2 class sub-folders with a few images each")
    if task in list_tasks() and list(get_task(task).classes) != classes:
        raise FewShotError(f"task name {task!r} belongs to the registered task with classes "
                           f"{list(get_task(task).classes)}, not {classes}; pick another --task name")


def _fewshot_section(config: ProtoConfig) -> dict:
    """The card's ``fewshot`` section: every :class:`ProtoConfig` field, the method, and what the
    opt-in levers mean for a user."""
    out = {**config.to_dict(), "method": "prototypical network (Snell et al., 2017)"}
    notes = []
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
                     config: ProtoConfig, fitted, metrics: dict, *, seconds: float) -> ModelCard:
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
        "intended_use": "Research prototype: nearest-prototype classification from a few labelled examples; "
                        "not validated for clinical use.",
        "explainers": ["gradcam"],
        "backbone": spec.to_dict(),
        "weights": info,
        "preprocessing": {"image_size": size, "channels_in": 3, "resize": "squash", "input_range": [0.0, 1.0],
                          "mean": list(spec.mean), "std": list(spec.std)},
        "threshold": None,
        "calibration": {"temperature": 1.0, "method": "logit scale fitted by leave-one-out NLL on the support set"
                        if fitted else "none"},
        "fewshot": _fewshot_section(config),
        "support": [{"path": str(Path(s.path).resolve()), "label": s.label} for s in samples],
        "metrics": metrics,
        "split": {},
        "training": {"seconds": seconds, "python": platform.python_version(),
                     "torch": torch.__version__, "support_dir": str(support_dir.resolve())},
        "recipe": {"mode": "frozen features"},
    })


def fit_prototypes(support_dir: str | Path, out: str | Path, *, backbone: str = DEFAULT_BACKBONE,
                   pretrained: bool | str = True, checkpoint: str | None = None, config: ProtoConfig | None = None,
                   task: str = "fewshot", cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
                   transductive: int | None = None, progress: bool = False) -> Path:
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
        progress: show progress bars.

    Returns:
        The model folder. The card's ``support`` lists every support file with its label (for the
        nearest-example explanation) and ``metrics`` the leave-one-out accuracy on the support set.

    Raises:
        DataError: unreadable support folder. FewShotError: fewer than two classes, or a task name
        that belongs to another task.
    """
    import time

    from pellucid.core.modelfolder import save_model
    from pellucid.datasets.samples import class_counts, load_samples

    t0 = time.time()
    support_dir = Path(support_dir)
    samples = load_samples(support_dir)
    classes = sorted(class_counts(samples))
    _check_support_classes(support_dir, classes, task)
    bb, info = create_backbone(backbone, pretrained=pretrained, checkpoint=checkpoint)
    if config is None:
        config = default_config(bb.spec)
    if transductive is not None:
        config = replace(config, transductive=transductive)
    size = int(config.image_size or bb.spec.input_size)
    config = replace(config, image_size=size)
    net = PrototypicalNetwork(bb, config)
    paths = [s.path for s in samples]
    labels = torch.tensor([classes.index(s.label) for s in samples])
    raw = extract_features(net, paths, image_size=size, weight_info=info, cache_dir=cache_dir, progress=progress)
    mirrored = None
    if config.support_flip and not config.flip:  # with flip the features are mirror-averaged already
        mirrored = extract_features(net, paths, image_size=size, weight_info=info, cache_dir=cache_dir,
                                    progress=progress, mirror=True)
    fitted = fit_support(net, raw, labels, len(classes), mirrored=mirrored)
    config = net.config
    metrics: dict = {"n_support": len(samples), "per_class": class_counts(samples)}
    if fitted is None:
        warnings.warn("a class has a single support image: the logit scale is not fitted (probabilities are "
                      "uncalibrated); add a second image per class", stacklevel=2)
    else:
        metrics["support_loo_accuracy"] = fitted[1]
        if getattr(net, "weight_scores", None):
            metrics["layer_weights_loo_nll"] = net.weight_scores
    card = _prototypes_card(support_dir, samples, classes, task, bb.spec, info, size, config, fitted,
                            metrics, seconds=round(time.time() - t0, 1))
    net.support_items = [(str(Path(s.path).resolve()), s.label) for s in samples]
    return save_model(out, net, card)


def load_prototypes(folder: str | Path, card: ModelCard) -> PrototypicalNetwork:
    """Rebuild the :class:`PrototypicalNetwork` of a prototypes model folder (eval mode, CPU).

    Raises:
        ModelFolderError: missing weights, or weights that do not fit the card's backbone.
    """
    from safetensors.torch import load_file

    from pellucid.core.modelfolder import ModelFolderError

    folder = Path(folder)
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise ModelFolderError(f"{folder} has no model.safetensors: rerun `pellucid fewshot fit`")
    try:
        config = ProtoConfig.from_dict(card.extra["fewshot"])
        bb, _ = create_backbone(card.backbone_name, pretrained=False)
    except (KeyError, TypeError) as err:
        raise ModelFolderError(f"{folder}/card.json: prototypes card is missing or has a bad {err}") from err
    pre = card.preprocessing
    if pre.mean and pre.std:
        bb.spec = replace(bb.spec, mean=tuple(pre.mean), std=tuple(pre.std))
    net = PrototypicalNetwork(bb, config)
    state = load_file(str(weights))
    net._resize_buffers(state)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise ModelFolderError(f"{weights} does not fit backbone {card.backbone_name!r}: "
                               f"{str(err).splitlines()[0]}") from err
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
