"""Few-shot configuration: the :class:`ProtoConfig` that says how a prototypical network embeds and
compares images, the presets :data:`PLAIN` and :data:`IMPROVED` (with :func:`improved_config`, the
multi-layer frozen-feature variant), the supported :data:`DISTANCES`, and :class:`FewShotError`,
the error every few-shot module raises for requests it cannot serve."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Mapping

from pellucid.registry import unknown_name_error

__all__ = [
    "FewShotError",
    "ProtoConfig",
    "PLAIN",
    "IMPROVED",
    "improved_config",
    "default_config",
    "weight_candidates",
    "embedding_weight_candidates",
    "layer_groups",
    "DEFAULT_BACKBONE",
    "BACKBONE_CANDIDATES",
    "DISTANCES",
    "HEADS",
    "HEAD_C",
]

DISTANCES = ("euclidean", "cosine")
#: The classifiers on the embedding: the nearest prototype (Snell et al.) or a logistic regression
#: fitted on the support embeddings (:mod:`pellucid.core.fewshot.head`).
HEADS = ("prototypes", "logistic")
#: Inverse L2 strength of the logistic head (scikit-learn's ``C``); 10, 30 and 100 scored within 0.0003
#: of each other on the dev draws' mean accuracy, 30 the best (bench/results/fewshot-head-plain-scale.md).
HEAD_C = 30.0
#: Bounds on a card's numbers (a model folder may come from anyone): soft k-means steps per predicted batch (the
#: opt-in default is 2; 10**7 held `pellucid predict` for good), pooled layers, extra input sides.
MAX_TRANSDUCTIVE = 50
MAX_LAYERS = 64
MAX_SCALES = 8


class FewShotError(ValueError):
    """A few-shot request that cannot be served as given (impossible episode, bad support folder)."""


@dataclass(frozen=True)
class ProtoConfig:
    """How a prototypical network embeds images and compares them.

    Attributes:
        distance: ``"euclidean"`` (squared, as in Snell et al.) or ``"cosine"``.
        layers: dotted backbone paths whose outputs are average-pooled and concatenated; ``()`` uses
            the backbone's own pooled embedding.
        flip: average the raw features of the image and its horizontal mirror (test-time
            augmentation; doubles the cost of a forward pass, and CAM explainers hooking a layer
            then see two passes — leave it off for models that will be explained).
        power: exponent of the power transform ``sign(x) |x|^p`` applied to raw features, or None.
        center: subtract the mean of the (transformed) support features before the final
            normalisation.
        normalize: L2-normalise the embedding (and, with several layers, each layer's block first).
        image_size: input side in pixels; None uses the backbone's default.
        scale: multiplier of the logits (``-scale * distance`` or ``scale * cosine``).
        layer_weights: with several layers and ``normalize``, the weight of each L2-normalised layer
            block in the concatenation (one per layer), or None for equal weights.
        support_flip: support augmentation — the horizontal mirror of every support image is added
            as an extra support embedding of its class (fitting only; prediction costs nothing more).
            Redundant with ``flip``, whose features are already mirror-averaged.
        auto_weights: at fitting time, choose ``layer_weights`` among :func:`weight_candidates` by
            the leave-one-out NLL on the support set (the chosen weights are stored in
            ``layer_weights``; prediction is unchanged). Needs several layers.
        transductive: soft k-means steps that refine the prototypes on the batch being classified
            (:func:`~pellucid.core.fewshot.maths.refine_prototypes`); 0 turns it off. With steps > 0
            a prediction depends on the other images of the same batch (in ``pellucid predict``, the
            images passed together); the stored prototypes never change.
        backbones: extra backbones (registry names) whose pooled tap layers are concatenated after
            the primary backbone's; their entries in ``layers`` are written ``"<name>:<module>"``
            (see :class:`~pellucid.core.fewshot.network.Embedder`). ``()``: the primary alone.
        auto_backbones: candidate sets of extra backbones that fitting chooses from, per support
            set, by the leave-one-out NLL (the primary alone is always a candidate; each candidate's
            layer weights are chosen as with ``auto_weights``). The chosen set is stored in
            ``backbones`` (with its ``layers`` and ``layer_weights``), so prediction is deterministic
            and runs only the chosen backbones. A candidate may also name input sides, written
            ``"@<side>"`` (e.g. ``("efficientnet_lite2", "@320")``): that candidate runs every
            backbone again at those sides (``scales``, added to the config's own); the chosen
            candidate's sides are stored in ``scales``.
        resolution: input side every backbone of the embedding sees, in pixels: the images are
            decoded at this side and no backbone gets them resized inside the model (with
            ``auto_backbones``, every candidate runs at it). None (the default, and cards written
            before this field): the primary runs at ``image_size`` and each extra backbone at its
            own input size. Opt-in: 320 helps everyday objects (waste) and hurts chest X-rays and
            sonar (bench/results/fewshot-resolution.md).
        head: the classifier on the embedding (:data:`HEADS`): ``"prototypes"`` (logits = scaled
            negative distances to the class prototypes; the default of cards written before this
            field) or ``"logistic"`` (a multinomial logistic regression fitted on the support
            embeddings, its logits scaled by a temperature fitted by leave-one-out; the prototypes are
            still kept, for the nearest-support explanation). Transductive refinement moves
            prototypes, so it needs ``"prototypes"``.
        head_c: the logistic head's inverse L2 strength (scikit-learn's ``C``).
        scales: more input sides at which every backbone of the embedding runs again, its pooled
            layers appended after those at the backbones' own sides (a multi-scale embedding;
            ``layers`` then name them ``"@<side>:<module>"`` for the primary and
            ``"<name>@<side>:<module>"`` for an extra backbone, see
            :class:`~pellucid.core.fewshot.network.Embedder`). The images are decoded at the largest
            side and resized (antialiased) for the others. ``()``: one side per backbone. Each side
            costs a pass of every backbone at it.
    """

    distance: str = "euclidean"
    layers: tuple[str, ...] = ()
    flip: bool = False
    power: float | None = None
    center: bool = False
    normalize: bool = False
    image_size: int | None = None
    scale: float = 1.0
    layer_weights: tuple[float, ...] | None = None
    support_flip: bool = False
    auto_weights: bool = False
    transductive: int = 0
    backbones: tuple[str, ...] = ()
    auto_backbones: tuple[tuple[str, ...], ...] = ()
    resolution: int | None = None
    head: str = "prototypes"
    head_c: float = HEAD_C
    scales: tuple[int, ...] = ()

    def __post_init__(self):
        if self.distance not in DISTANCES:
            raise unknown_name_error("distance", self.distance, list(DISTANCES))
        object.__setattr__(self, "layers", tuple(self.layers))
        # a model folder may come from anyone: its card's numbers are bounded before any of them is used
        if len(self.layers) > MAX_LAYERS or not all(isinstance(n, str) and n for n in self.layers):
            raise FewShotError(f"layers must be at most {MAX_LAYERS} layer names, got {len(self.layers)} entries")
        if len(set(self.layers)) != len(self.layers):  # each is pooled once; a repeat broke the embedding's split
            raise FewShotError(f"layers lists a layer twice: {list(self.layers)}")
        for name, value, low, high in (("power", self.power, 0.0, 4.0), ("scale", self.scale, 0.0, 1e6)):
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                          and low < value <= high):
                raise FewShotError(f"{name} must be a number above {low:g} and at most {high:g}, got {value!r}")
        if self.layer_weights is not None:
            try:
                weights = tuple(float(w) for w in self.layer_weights)
            except (TypeError, ValueError):
                weights = (float("nan"),)
            if not all(math.isfinite(w) and w >= 0 for w in weights):
                raise FewShotError(f"layer_weights must be finite numbers of 0 or more, got "
                                   f"{list(self.layer_weights)!r}")
            object.__setattr__(self, "layer_weights", weights)
            if len(self.layer_weights) != len(self.layers):
                raise FewShotError(f"layer_weights has {len(self.layer_weights)} values for {len(self.layers)} "
                                   f"layer(s) {list(self.layers)}; give one weight per layer")
        if self.head not in HEADS:
            raise unknown_name_error("head", self.head, list(HEADS))
        try:
            c = float(self.head_c)
        except (TypeError, ValueError):
            c = float("nan")
        if not (c > 0 and c != float("inf")):
            raise FewShotError(f"head_c must be > 0 (the logistic head's inverse L2 strength), got {self.head_c!r}")
        object.__setattr__(self, "head_c", c)
        if self.transductive and self.head != "prototypes":
            raise FewShotError(f"transductive refinement moves the prototypes, so it needs head='prototypes'; "
                               f"got head={self.head!r}")
        if isinstance(self.transductive, bool) or not isinstance(self.transductive, (int, float)) \
                or int(self.transductive) != self.transductive or not 0 <= self.transductive <= MAX_TRANSDUCTIVE:
            raise FewShotError(f"transductive must be a whole number of steps from 0 to {MAX_TRANSDUCTIVE}, "
                               f"got {self.transductive!r}")
        object.__setattr__(self, "transductive", int(self.transductive))
        object.__setattr__(self, "support_flip", bool(self.support_flip))
        object.__setattr__(self, "auto_weights", bool(self.auto_weights))
        object.__setattr__(self, "backbones", tuple(str(b) for b in (self.backbones or ())))
        object.__setattr__(self, "auto_backbones", tuple(tuple(str(b) for b in c) for c in (self.auto_backbones or ())))
        from pellucid.core.card import MAX_INPUT_SIDE

        for name in {b for c in (self.backbones, *self.auto_backbones) for b in c}:
            from pellucid.core.backbones import get_backbone_spec

            if name.startswith("@") and name not in self.backbones:  # an input side of a candidate
                if not (name[1:].isdigit() and 8 <= int(name[1:]) <= MAX_INPUT_SIDE):
                    raise FewShotError(f"auto_backbones: {name!r} is not an input side such as '@320' "
                                       f"(8 to {MAX_INPUT_SIDE} px)")
                continue
            get_backbone_spec(name)  # an unknown name gets a did-you-mean

        for name in ("resolution", "image_size"):  # a 99999-px input had asked OpenCV for 30 GB
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or int(value) != value or not 8 <= value <= MAX_INPUT_SIDE:
                raise FewShotError(f"{name} must be a whole number of pixels from 8 to {MAX_INPUT_SIDE} (or None for "
                                   f"the backbones' own sizes), got {value!r}")
            object.__setattr__(self, name, int(value))
        scales = []
        if len(tuple(self.scales or ())) > MAX_SCALES:
            raise FewShotError(f"scales lists {len(tuple(self.scales))} input sides; at most {MAX_SCALES} (each costs "
                               "a pass of every backbone)")
        for value in tuple(self.scales or ()):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value \
                    or not 8 <= value <= MAX_INPUT_SIDE:
                raise FewShotError(f"scales must be whole numbers of pixels from 8 to {MAX_INPUT_SIDE}, got "
                                   f"{list(self.scales)!r}")
            scales.append(int(value))
        if len(set(scales)) != len(scales):
            raise FewShotError(f"scales lists a side twice: {scales}")
        object.__setattr__(self, "scales", tuple(scales))
        if len(set(self.backbones)) != len(self.backbones):
            raise FewShotError(f"backbones lists a backbone twice: {list(self.backbones)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        d["layer_weights"] = None if self.layer_weights is None else list(self.layer_weights)
        d["backbones"] = list(self.backbones)
        d["auto_backbones"] = [list(c) for c in self.auto_backbones]
        d["scales"] = list(self.scales)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> ProtoConfig:
        known = set(cls.__dataclass_fields__)
        tuples = ("layers", "layer_weights", "backbones", "scales")
        out = {k: (tuple(v) if k in tuples and v is not None else v) for k, v in d.items() if k in known}
        if out.get("auto_backbones") is not None:
            out["auto_backbones"] = tuple(tuple(c) for c in out["auto_backbones"])
        return cls(**out)


#: Plain prototypes (Snell et al.): pooled embedding, squared Euclidean distance.
PLAIN = ProtoConfig()
#: Power transform (p = 0.5), centering on the support mean and L2 normalisation ("CL2N") of the
#: backbone's pooled embedding; the transform of :func:`improved_config` and of episodic training.
IMPROVED = ProtoConfig(power=0.5, center=True, normalize=True, scale=10.0)


def improved_config(spec, image_size: int | None = None) -> ProtoConfig:
    """The frozen-feature variant measured best over the three dev sets (bench/bench_fewshot.py):
    :data:`IMPROVED` on the concatenated pooled outputs of the backbone's ``tap_layers`` (each
    L2-normalised, the two shallower ones at weight 0.5).

    Args:
        spec: a :class:`~pellucid.core.backbones.BackboneSpec`.
        image_size: input side (default: the spec's).
    """
    taps = tuple(spec.tap_layers)
    weights = tuple([0.5] * (len(taps) - 1) + [1.0])
    return replace(IMPROVED, layers=taps, layer_weights=weights, image_size=image_size or spec.input_size)


def with_transduction(config: ProtoConfig, steps: int) -> ProtoConfig:
    """``config`` with ``transductive = steps``: transductive refinement moves prototypes, so asking
    for it (steps > 0) selects the prototype classifier. What ``fewshot fit`` and ``fewshot eval`` do
    with ``--transductive``."""
    steps = int(steps)
    return replace(config, transductive=steps, head="prototypes" if steps else config.head)


def weight_candidates(n_layers: int) -> list[tuple[float, ...]]:
    """Layer weightings (shallow to deep) that ``auto_weights`` chooses from: deep-heavy (the
    :func:`improved_config` default), equal, shallow-heavy, and the deepest layer alone. Shallow
    layers suit textures and X-rays, deep ones objects; the support set decides."""
    n = int(n_layers)
    if n < 2:
        return [tuple([1.0] * n)]
    return [tuple([0.5] * (n - 1) + [1.0]), tuple([1.0] * n), tuple([1.0] + [0.5] * (n - 1)),
            tuple([0.0] * (n - 1) + [1.0])]


def layer_groups(layers) -> list[tuple[str, list[str]]]:
    """``layers`` grouped by backbone, in order: ``[(backbone prefix, [layers])]``; the primary
    backbone's layers (no ``"name:"`` prefix) have the prefix ``""``."""
    groups: list[tuple[str, list[str]]] = []
    for layer in layers:
        name = layer.rpartition(":")[0]
        if not groups or groups[-1][0] != name:
            groups.append((name, []))
        groups[-1][1].append(layer)
    return groups


def embedding_weight_candidates(layers) -> list[tuple[float, ...]]:
    """The ``auto_weights`` candidates for ``layers`` that may span several backbones: each of
    :func:`weight_candidates` applied to every backbone's block of layers alike (one backbone:
    exactly :func:`weight_candidates`)."""
    per = [weight_candidates(len(g)) for _, g in layer_groups(layers)]
    if not per:
        return [()]
    n = max(len(c) for c in per)
    return [tuple(w for c in per for w in c[min(k, len(c) - 1)]) for k in range(n)]


#: Extra-backbone sets that ``auto_backbones`` chooses from in ``pellucid fewshot fit`` by default
#: (the primary, EfficientNet-Lite0, alone is always the first candidate): Lite0 alone, Lite0 +
#: Lite2, or Lite0 + Lite2 with both also run at 320 px (a multi-scale embedding; 30 dev and 30
#: confirm draws, ``python -m bench.fewshot_screens --study multiscale``: waste +0.011 and +0.013,
#: tb_cxr +0.001 and -0.004, sonar +0.002 and +0.000 against the two candidates before it). Adding
#: Lite0 + Lite1 + Lite2 as a candidate scored the same over the three dev sets (0.775 vs 0.774 on
#: the dev draws) for a third backbone; see docs/fewshot.md.
BACKBONE_CANDIDATES: tuple[tuple[str, ...], ...] = (("efficientnet_lite2",), ("efficientnet_lite2", "@320"))

#: The backbone ``pellucid fewshot fit`` uses unless told otherwise (chosen over many support draws,
#: ``python -m bench.fewshot_draws``; see docs/fewshot.md).
DEFAULT_BACKBONE = "efficientnet_lite0"


def split_candidate(candidate) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """An ``auto_backbones`` candidate as (its extra backbones' names, the input sides its ``"@<side>"``
    entries name)."""
    names = tuple(n for n in candidate if not n.startswith("@"))
    return names, tuple(int(n[1:]) for n in candidate if n.startswith("@"))


def default_config(spec, image_size: int | None = None) -> ProtoConfig:
    """What ``pellucid fewshot fit`` fits by default: :func:`improved_config` of the backbone with the
    levers that won over many 5-shot support draws on the three dev sets
    (``python -m bench.fewshot_draws``, bench/results/fewshot-draws.md, docs/fewshot.md):
    ``auto_weights`` (layer weights chosen by leave-one-out on the support set; +0.03 on tb_cxr)
    and, on :data:`DEFAULT_BACKBONE`, ``auto_backbones`` = :data:`BACKBONE_CANDIDATES` (the support
    set chooses between Lite0 alone and Lite0 + Lite2 concatenated by leave-one-out NLL; on the
    confirm draws +0.036 on waste, +0.006 sonar, +0.001 tb_cxr,
    bench/results/fewshot-embedding.md; then Lite0 + Lite2 also at 320 px joined them as a third
    candidate, bench/results/fewshot-multiscale*.md). Other primary backbones get no extra candidates. The
    classifier on the chosen embedding is the logistic head (``head = "logistic"``, C =
    :data:`HEAD_C`): against the nearest prototype on the same embeddings, +0.006 tb_cxr, +0.015
    waste, +0.005 sonar over 50 dev draws, +0.006, +0.016, +0.004 over 50 confirm draws
    (bench/results/fewshot-head*.md).
    Measured and left off: ``support_flip`` and ``flip`` (within 0.006 everywhere; ``flip`` doubles
    the prediction cost), EfficientNet-Lite1/Lite2 alone (Lite2 helps waste, hurts tb_cxr and sonar),
    a third candidate Lite0 + Lite1 + Lite2, and the input size (``resolution`` 192 or 320 px, or
    chosen per support set: 320 helps waste by 0.02 and costs tb_cxr and sonar as much;
    bench/results/fewshot-resolution.md) — ``resolution=320`` is an opt-in for everyday objects —,
    and Lite0 + Lite2 also at 320 px as the only embedding (waste +0.021 and +0.015, but tb_cxr
    -0.002 and -0.007).
    Transductive refinement is never a default: it makes a prediction depend on the rest of its
    batch (opt in with ``replace(config, transductive=steps)`` or ``fit_prototypes(transductive=)``).
    Opt out of the backbone choice with ``replace(config, auto_backbones=())``.

    Args:
        spec: a :class:`~pellucid.core.backbones.BackboneSpec`.
        image_size: input side (default: the spec's).
    """
    config = replace(improved_config(spec, image_size), auto_weights=True, head="logistic")
    if spec.name == DEFAULT_BACKBONE:
        config = replace(config, auto_backbones=BACKBONE_CANDIDATES)
    return config
