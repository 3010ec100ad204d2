"""Out-of-domain checks: flag an input that is far from what a model was trained on.

A classifier always answers, even for a photo of a bottle sent to a chest X-ray model; this module
says when its answer should not be trusted. Two levels, and the result always says which one ran:

* **Reference check** (preferred). An :class:`OODReference` holds the mean and the Ledoit-Wolf
  shrunk precision matrix of the model's pooled embeddings on training images — L2-normalised first:
  on linear-probe models of the seven apps, against 200 images of the other apps each, that raised
  the Mahalanobis AUROC from 0.883–1.000 to 0.986–1.000 (sonar 0.883 → 0.986, bpd 0.938 → 0.999,
  waste 0.969 → 0.986; ``bench/bench_ood.py``) — and thresholds at the
  ``quantile`` (default 99 %) of held-out validation images' Mahalanobis distance (Lee et al., "A
  simple unified framework for detecting out-of-distribution samples and adversarial attacks",
  NeurIPS 2018); the energy score (Liu et al., "Energy-based out-of-distribution detection",
  NeurIPS 2020) and its quantile are recorded beside it but do not flag (see :func:`check_domain`).
  By construction about ``1 - quantile`` of in-domain images are flagged. It is stored beside the model
  as ``ood.safetensors`` (no pickles) and is built by :func:`fit_reference` or, from a model folder's
  ``split.json``, by :func:`reference_from_split`. An ensemble (every app's default recipe but one)
  stores none of its own: :class:`MemberReferences` reads each member's reference on that member's
  embedding and averages the distances over their limits.
* **Heuristic check** (always applied; the only check when no reference exists). Images of a
  grey-scale modality (CXR, CT, MR, ...) that are strongly multi-coloured, near-blank images, strips
  (more than 8 times as long as wide) and thumbnails (under 8 px on the short side) are flagged. It
  is weak: measured on the shared sample data it flags about 10 % of waste photos and
  47 % of snow photos, and under 1 % of the TB chest X-rays (some of which are photographs of film)
  — which is why the reference check exists.

A low top-class probability is reported as *uncertain*, separately: the maximum softmax probability
(Hendrycks & Gimpel, ICLR 2017) is a confidence signal, not a domain test.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from pellucid.datasets.readers import Image

__all__ = [
    "GRAY_MODALITIES",
    "MemberReferences",
    "NeighbourReference",
    "OODCheck",
    "OODReference",
    "check_domain",
    "colour_spread",
    "domain_view",
    "energy_score",
    "fit_reference",
    "forward_with_features",
    "load_reference",
    "modality_reasons",
    "reference_from_split",
    "save_reference",
]

log = logging.getLogger(__name__)

#: Modalities whose images are grey-scale by nature (a tint is fine, many hues are not).
GRAY_MODALITIES = frozenset({"CXR", "XR", "X-RAY", "DX", "CR", "CT", "MR", "MRI", "MG", "US", "PT", "NM"})

REFERENCE_FILE = "ood.safetensors"

# Heuristic thresholds (see the module docstring for how they behave on the sample data).
_COLOUR_LIMIT = 0.10  # colour_spread above this on a grey modality is flagged
_BLANK_STD = 0.02  # pixel standard deviation below this is a near-blank image
_CHROMA_MIN = 0.08  # a pixel counts as coloured above this chroma (max - min of RGB)
# Shape: every model squashes its input into a square. The sample data's images are at most 3.9 times as
# long as wide (sonar chips) and at least 28 px on their short side (PneumoniaMNIST), so a strip or a
# thumbnail is not an image any of them was trained on.
_MAX_ASPECT = 8.0
_MIN_SIDE = 8


#: DICOM ``Modality`` values that fit each task modality (upper case). A DICOM input of any other
#: modality is flagged; a task modality not listed here gets no DICOM check.
DICOM_MODALITIES: dict[str, frozenset[str]] = {
    "CXR": frozenset({"CR", "DX"}),
    "XR": frozenset({"CR", "DX"}),
    "HISTOPATHOLOGY": frozenset({"SM"}),
    "PHOTO": frozenset({"XC", "VL"}),
    "SONAR": frozenset(),
}
#: ``BodyPartExamined`` values that fit a task modality, where the tag is present.
BODY_PARTS: dict[str, frozenset[str]] = {"CXR": frozenset({"CHEST", "THORAX", "LUNG", "LUNGS"})}
_TASK_WORDS = {"CXR": "chest radiograph", "XR": "radiograph", "HISTOPATHOLOGY": "slide-microscopy image",
               "PHOTO": "photograph", "SONAR": "sonar image"}


def modality_reasons(meta: dict, task_modality: str | None) -> list[str]:
    """Why a DICOM input does not fit the task's modality (empty when it fits or is not DICOM).

    Looks at the reader's ``modality`` (DICOM ``Modality``), ``body_part`` (``BodyPartExamined``)
    and ``sop_class`` (the SOP class name): a CT, MR, ultrasound or mammography file given to a
    chest X-ray model is flagged with the reason, and so is a DICOM whose modality says nothing
    (``OT``: other) — it cannot be shown to be a radiograph.

    Args:
        meta: an image's reader metadata (``Image.meta``).
        task_modality: the model card's modality (``"CXR"``, ``"photo"`` ...).
    """
    if meta.get("format") != "dicom" or not task_modality:
        return []
    task = task_modality.strip().upper()
    allowed = DICOM_MODALITIES.get(task)
    if allowed is None:
        return []
    found = (meta.get("modality") or "").upper() or "unknown"
    sop = meta.get("sop_class") or ""
    what = f"DICOM Modality {found}" + (f" ({sop})" if sop else "")
    want = _TASK_WORDS.get(task, task_modality)
    expects = f"this {task_modality} model expects {' or '.join(sorted(allowed))}" if allowed else \
        f"this {task_modality} model takes no DICOM images"
    if found not in allowed:
        return [f"{what} is not a {want}; {expects}"]
    reasons = []
    if "MAMMOGRAPHY" in sop.upper():
        reasons.append(f"{what} is a mammogram, not a {want}")
    part = (meta.get("body_part") or "").upper()
    parts = BODY_PARTS.get(task)
    if part and parts and part not in parts:
        reasons.append(f"DICOM BodyPartExamined {part} is not {' / '.join(sorted(parts))}")
    return reasons


@dataclass
class OODCheck:
    """The outcome of :func:`check_domain` for one image.

    Attributes:
        flagged: the image looks out of domain; its prediction should not be used.
        reasons: one short sentence per failed test (empty when not flagged).
        uncertain: the top-class probability is low (reported apart from ``flagged``).
        method: ``"reference"`` when an :class:`OODReference` was used, else ``"heuristic"``.
        scores: the numbers behind the decision (``mahalanobis``, ``energy``, ``colour_spread``,
            ``pixel_std``, ``max_prob`` and the thresholds used).
    """

    flagged: bool
    reasons: list[str] = field(default_factory=list)
    uncertain: bool = False
    method: str = "heuristic"
    scores: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for tables: ``"out of domain: ..."``, ``"uncertain"`` or ``"ok"``."""
        if self.flagged:
            return "out of domain: " + "; ".join(self.reasons)
        return "uncertain" if self.uncertain else "ok"


@dataclass
class OODReference:
    """Embedding statistics of in-domain images and the thresholds derived from them.

    Attributes:
        mean: embedding mean, shape ``(D,)``.
        precision: shrunk inverse covariance, shape ``(D, D)``.
        distance_threshold: Mahalanobis distance above which an image is flagged.
        energy_threshold: energy score above which an image is flagged.
        quantile: the validation quantile the thresholds were set at.
        n_fit: images the statistics were fitted on.
        n_calib: held-out images the thresholds were set on.
        source: where the images came from (for the card / UI).
    """

    mean: np.ndarray
    precision: np.ndarray
    distance_threshold: float
    energy_threshold: float
    quantile: float
    n_fit: int
    n_calib: int
    source: str = ""
    normalize: bool = False

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of embeddings ``(N, D)`` → ``(N,)`` (of the L2-normalised embeddings
        when the reference was fitted on them, ``normalize``)."""
        f = np.asarray(features, dtype=np.float64).reshape(-1, self.mean.size)
        z = (_unit(f) if self.normalize else f) - self.mean
        # (z P) · z row by row: one matrix product (an unoptimised three-operand einsum cost as much
        # as the model's forward pass when called per image)
        return np.sqrt(np.maximum(((z @ self.precision) * z).sum(axis=1), 0.0))

    def far_reason(self, dist: float) -> str:
        """The reason given when ``dist`` is past the limit."""
        return (f"embedding far from the training images (Mahalanobis {dist:.1f} > {self.quantile:.0%} "
                f"in-domain limit {self.distance_threshold:.1f})")


@dataclass
class MemberReferences:
    """The domain reference of an ensemble: every member's own :class:`OODReference`, each read on that
    member's embedding (the ensemble's features are the members' embeddings side by side).

    An image's distance is the mean over members of its Mahalanobis distance divided by that member's
    limit, and the limit is 1.0. Measured on six apps' default ensembles (``docs/bench-predict-ood.md``):
    a mean rather than "any member", which flagged 3-16 % of the apps' own test images (the mean:
    0-3 %); and 1.0 rather than a limit re-set at the 99 % quantile of the
    ensemble's validation images, which flagged 3 of mpox's 19 test photographs (15 validation images
    set it) for a gain on sonar alone.

    Attributes:
        references: one reference per member, in the ensemble's member order.
        distance_threshold: 1.0 (the members' limits, averaged).
    """

    references: list[OODReference]
    distance_threshold: float = 1.0
    energy_threshold: float | None = None  # an ensemble's output is log-probabilities: no energy score

    @property
    def quantile(self) -> float:
        return min(r.quantile for r in self.references)

    @property
    def n_fit(self) -> int:
        return min(r.n_fit for r in self.references)

    @property
    def n_calib(self) -> int:
        return min(r.n_calib for r in self.references)

    @property
    def source(self) -> str:
        return f"each of the {len(self.references)} members' own reference, averaged"

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mean member distance over member limit, ``(N,)``, of the members' embeddings side by side
        ``(N, D_1 + ... + D_M)``."""
        sizes = [r.mean.size for r in self.references]
        f = np.asarray(features, dtype=np.float64).reshape(-1, sum(sizes))
        parts = np.split(f, np.cumsum(sizes)[:-1], axis=1)
        return np.mean([r.distance(x) / r.distance_threshold for r, x in zip(self.references, parts)], axis=0)

    def far_reason(self, dist: float) -> str:
        """The reason given when ``dist`` is past the limit."""
        return (f"embeddings far from the training images (the {len(self.references)} members' Mahalanobis "
                f"distances average {dist:.2f}x their {self.quantile:.0%} in-domain limits)")


@dataclass
class NeighbourReference:
    """The domain reference of a few-shot model: its support images' L2-normalised raw embeddings.

    An image's distance is the Euclidean distance of its normalised embedding to the nearest support
    image; the limit is the support set's largest leave-one-out nearest distance, raised by ``margin``
    (default ``1/n`` for ``n`` support images: the largest of ``n`` distances is about their
    ``n/(n+1)`` quantile, so small support sets get the wider margin). Five images a class are too few
    for a covariance. Measured on three random 5-shot draws of six apps in ``docs/fewshot.md``,
    "Out-of-domain inputs".

    Attributes:
        support: ``(n, D)`` unit rows. distance_threshold: the limit.
    """

    support: np.ndarray
    distance_threshold: float
    margin: float = 0.10
    energy_threshold: float | None = None  # prototype logits are scaled distances: no energy score

    @classmethod
    def fit(cls, raw: np.ndarray, margin: float | None = None) -> "NeighbourReference":
        """From the support images' raw embeddings ``(n, D)``, ``n >= 2``; ``margin`` default ``1/n``."""
        s = _unit(np.asarray(raw, dtype=np.float64))
        if len(s) < 2:
            raise ValueError(f"a neighbour reference needs at least 2 support images; got {len(s)}")
        margin = 1.0 / len(s) if margin is None else float(margin)
        d = np.linalg.norm(s[:, None, :] - s[None, :, :], axis=2)
        np.fill_diagonal(d, np.inf)
        return cls(s, float(d.min(axis=1).max() * (1.0 + margin)), margin)

    @property
    def quantile(self) -> float:
        return len(self.support) / (len(self.support) + 1.0)  # what the largest of n distances estimates

    @property
    def n_fit(self) -> int:
        return len(self.support)

    @property
    def n_calib(self) -> int:
        return len(self.support)

    @property
    def source(self) -> str:
        return (f"the nearest of the {len(self.support)} support images; limit: their largest leave-one-out "
                f"distance + {self.margin:.0%}")

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Distance ``(N,)`` of the normalised embeddings ``(N, D)`` to their nearest support image."""
        f = _unit(np.asarray(features, dtype=np.float64).reshape(-1, self.support.shape[1]))
        sq = (f * f).sum(1)[:, None] + (self.support * self.support).sum(1)[None, :] - 2.0 * f @ self.support.T
        return np.sqrt(np.maximum(sq.min(axis=1), 0.0))

    def far_reason(self, dist: float) -> str:
        """The reason given when ``dist`` is past the limit."""
        return (f"embedding far from the support images (nearest at {dist:.2f} > limit {self.distance_threshold:.2f}, "
                f"their largest leave-one-out distance + {self.margin:.0%})")


def _unit(f: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def energy_score(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    """Energy ``-logsumexp(logits)`` per row, shape ``(N,)``; higher means less familiar."""
    t = torch.as_tensor(np.asarray(logits, dtype=np.float64)).reshape(-1, np.shape(logits)[-1])
    return (-torch.logsumexp(t, dim=1)).numpy()


DOMAIN_VIEW_SIDE = 256  # the image heuristics look at the image shrunk to this longest side


def domain_view(image: Image | np.ndarray) -> np.ndarray:
    """The small RGB view the image heuristics are computed on: uint8-quantised, longest side at most
    :data:`DOMAIN_VIEW_SIDE` (area averaging), as float32 ``(h, w, 3)`` in [0, 1].

    Idempotent (the view of a view is itself), so a caller that keeps only the view of a large image
    (the pipeline streaming a folder) gets exactly the check of one that keeps the whole image.
    """
    import cv2

    arr = image.rgb if isinstance(image, Image) else np.asarray(image, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    u8 = np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)
    side = max(u8.shape[:2])
    if side > DOMAIN_VIEW_SIDE:
        s = DOMAIN_VIEW_SIDE / side
        size = (max(1, round(u8.shape[1] * s)), max(1, round(u8.shape[0] * s)))
        u8 = cv2.resize(u8, size, interpolation=cv2.INTER_AREA)
    return u8.astype(np.float32) / 255.0


def colour_spread(rgb: np.ndarray) -> float:
    """How multi-coloured an image is, in [0, 1]: 0 for grey or a single tint.

    The fraction of clearly coloured pixels times the spread of their hues (one minus the
    chroma-weighted mean resultant length of the hue angle). A sepia or cyan-tinted radiograph has
    one hue and scores near 0; a photograph of objects scores high.

    Args:
        rgb: float array ``(H, W, 3)`` in [0, 1].
    """
    import cv2

    u8 = np.clip(np.asarray(rgb, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if u8.ndim != 3 or u8.shape[2] != 3:
        return 0.0
    side = max(u8.shape[:2])
    if side > 256:
        s = 256.0 / side
        u8 = cv2.resize(u8, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
    hue = cv2.cvtColor(u8, cv2.COLOR_RGB2HSV_FULL)[..., 0].astype(np.float64) * (2 * np.pi / 256.0)
    x = u8.astype(np.float64) / 255.0
    chroma = x.max(axis=2) - x.min(axis=2)
    coloured = chroma > _CHROMA_MIN
    w = chroma * coloured
    if w.sum() < 1e-6:
        return 0.0
    resultant = np.hypot((w * np.cos(hue)).sum(), (w * np.sin(hue)).sum()) / w.sum()
    return float((1.0 - resultant) * coloured.mean())


@torch.inference_mode()
def forward_with_features(model: torch.nn.Module, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits ``(B, C)`` and pooled embeddings ``(B, D)`` in one pass.

    An ensemble gives its members' embeddings side by side (read by :class:`MemberReferences`);
    models without ``features`` + ``head`` (prototype models) give ``None`` embeddings.
    """
    if hasattr(model, "forward_with_features"):
        logits, feats = model.forward_with_features(batch)
        return logits.float().cpu().numpy(), None if feats is None else feats.float().cpu().numpy()
    if hasattr(model, "features") and hasattr(model, "head"):
        feats = model.features(batch)
        return model.head(feats).float().cpu().numpy(), feats.float().cpu().numpy()
    return model(batch).float().cpu().numpy(), None


def fit_reference(model: torch.nn.Module, fit_batches: Sequence[torch.Tensor],
                  calib_batches: Sequence[torch.Tensor], *, quantile: float = 0.99,
                  source: str = "") -> OODReference:
    """Fit embedding statistics on in-domain images and set thresholds on held-out ones.

    Args:
        model: a classifier with ``features`` and ``head`` (see :func:`forward_with_features`).
        fit_batches: preprocessed batches ``(B, 3, S, S)`` in [0, 1] of training images.
        calib_batches: batches of held-out in-domain images (validation split).
        quantile: share of held-out images that must pass, in (0.5, 1).
        source: free text saying where the images came from.

    Raises:
        ValueError: the model has no embedding, too few images, or a quantile out of range.
    """
    from sklearn.covariance import LedoitWolf

    if not 0.5 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0.5, 1); got {quantile}")
    fit_f = [forward_with_features(model, b)[1] for b in fit_batches]
    if any(f is None for f in fit_f):
        raise ValueError(f"{type(model).__name__} exposes no embedding (features + head); "
                         "an OOD reference needs a single classifier")
    feats = np.concatenate(fit_f)
    calib = [forward_with_features(model, b) for b in calib_batches]
    if feats.shape[0] < 8 or not calib:
        raise ValueError(f"an OOD reference needs at least 8 training and 1 held-out image; got "
                         f"{feats.shape[0]} and {sum(len(c[0]) for c in calib)}")
    lw = LedoitWolf().fit(_unit(feats.astype(np.float64)))
    ref = OODReference(mean=lw.location_, precision=lw.precision_, distance_threshold=0.0,
                       energy_threshold=0.0, quantile=quantile, n_fit=int(feats.shape[0]),
                       n_calib=int(sum(len(c[0]) for c in calib)), source=source, normalize=True)
    dist = ref.distance(np.concatenate([c[1] for c in calib]))
    energy = energy_score(np.concatenate([c[0] for c in calib]))
    ref.distance_threshold = float(np.quantile(dist, quantile))
    ref.energy_threshold = float(np.quantile(energy, quantile))
    return ref


def save_reference(folder: str | Path, ref: OODReference | NeighbourReference) -> Path:
    """Write ``ood.safetensors`` (tensors + JSON metadata) into ``folder``."""
    from safetensors.numpy import save_file

    path = Path(folder) / REFERENCE_FILE
    if isinstance(ref, NeighbourReference):
        meta = {"kind": "neighbours", "distance_threshold": ref.distance_threshold, "margin": ref.margin}
        save_file({"support": ref.support.astype(np.float32)}, str(path), metadata={"pellucid_ood": json.dumps(meta)})
        return path
    meta = {"distance_threshold": ref.distance_threshold, "energy_threshold": ref.energy_threshold,
            "quantile": ref.quantile, "n_fit": ref.n_fit, "n_calib": ref.n_calib, "source": ref.source,
            "normalize": ref.normalize}
    save_file({"mean": ref.mean.astype(np.float32), "precision": ref.precision.astype(np.float32)},
              str(path), metadata={"pellucid_ood": json.dumps(meta)})
    return path


def load_reference(folder: str | Path) -> OODReference | MemberReferences | NeighbourReference | None:
    """The stored reference of a model folder, or ``None`` when it has none.

    An ensemble folder stores none of its own: its members' references are read together
    (:class:`MemberReferences`) when every member has one.

    Raises:
        ModelFolderError: the reference file is damaged (one line: remove it, or retrain).
    """
    path = Path(folder) / REFERENCE_FILE
    if not path.exists():
        return _member_references(Path(folder))
    try:
        return _read_reference(path)
    except Exception as err:  # noqa: BLE001 - safetensors, JSON, a missing, mistyped or misshapen field
        from pellucid.core.card import ModelFolderError

        raise ModelFolderError(
            f"{path}: the out-of-domain reference is damaged ({type(err).__name__}) — remove it to predict without "
            "out-of-domain flags (the web app's Model page can build another from the training split), or retrain"
        ) from None


def _read_reference(path: Path) -> OODReference | NeighbourReference:
    """The reference in ``path``, its metadata and arrays checked (a hand-made or damaged file had ended in a
    JSON, key or safetensors traceback at every door)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        meta = json.loads((fh.metadata() or {}).get("pellucid_ood", "{}"))
        if not isinstance(meta, dict):
            raise TypeError("metadata")
        if meta.get("kind") == "neighbours":
            support = fh.get_tensor("support").astype(np.float64)
            _check_arrays(support.ndim == 2 and len(support) >= 2, support)
            return NeighbourReference(_unit(support), _finite(meta["distance_threshold"]),
                                      _finite(meta.get("margin", 0.10)))
        mean = fh.get_tensor("mean").astype(np.float64)
        precision = fh.get_tensor("precision").astype(np.float64)
    _check_arrays(mean.ndim == 1 and precision.shape == (len(mean), len(mean)), mean, precision)
    return OODReference(mean=mean, precision=precision, distance_threshold=_finite(meta["distance_threshold"]),
                        energy_threshold=_finite(meta["energy_threshold"]), quantile=_finite(meta["quantile"]),
                        n_fit=int(meta["n_fit"]), n_calib=int(meta["n_calib"]), source=str(meta.get("source", "")),
                        normalize=bool(meta.get("normalize", False)))  # references written before: raw embeddings


def _check_arrays(shaped: bool, *arrays: np.ndarray) -> None:
    if not shaped or not all(a.size and np.isfinite(a).all() for a in arrays):
        raise ValueError("arrays")


def _finite(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ValueError("threshold")
    return float(value)


def _member_references(folder: Path) -> MemberReferences | None:
    """The members' references of an ensemble folder (the card's ``members``, in order), or None when
    it is not an ensemble or a member has none."""
    try:
        card = json.loads((folder / "card.json").read_text())
    except (OSError, ValueError):
        return None
    entries = card.get("members") if isinstance(card, dict) else None
    if not isinstance(entries, list) or not entries:
        return None
    refs = []
    for entry in entries:
        rel = entry.get("path") if isinstance(entry, dict) else entry
        member = (folder / str(rel)).resolve()
        if folder.resolve() not in member.parents:
            return None  # load_ensemble refuses such a folder in one line
        ref = load_reference(member)
        if not isinstance(ref, OODReference):
            return None
        refs.append(ref)
    return MemberReferences(refs)


def reference_from_split(folder: str | Path, model: torch.nn.Module, preprocess: Callable[[Image], torch.Tensor],
                         *, max_fit: int = 256, max_calib: int = 128, batch_size: int = 32, seed: int = 0,
                         progress: Callable[[float, str], None] | None = None) -> OODReference:
    """Build a reference from the training / validation images listed in ``folder/split.json``.

    Paths in ``split.json`` are found by :func:`pellucid.datasets.splits.load_split` (as written, then
    relative to the model folder). Unreadable files are skipped.

    Raises:
        FileNotFoundError: no ``split.json`` or none of its images can be found.
    """
    from pellucid.datasets.readers import ImageReadError, read_image
    from pellucid.datasets.splits import load_split, split_file

    folder = Path(folder)
    split_path = split_file(folder)
    if not split_path.is_file():
        raise FileNotFoundError(f"{split_path} not found: the OOD reference is built from the training split; "
                                "retrain with `pellucid train` or call fit_reference with your own images")
    split = load_split(split_path)
    rng = np.random.default_rng(seed)

    def pick(part: str, n: int) -> list[str]:
        paths = split.paths(part)
        if len(paths) > n:
            paths = [paths[i] for i in sorted(rng.choice(len(paths), n, replace=False))]
        return paths

    fit_paths, calib_paths = pick("train", max_fit), pick("val", max_calib)
    total = max(1, len(fit_paths) + len(calib_paths))
    done = 0

    def batches(paths: list[str]) -> list[torch.Tensor]:
        nonlocal done
        out, cur = [], []
        for p in paths:
            done += 1
            try:
                cur.append(preprocess(read_image(p)))
            except (ImageReadError, OSError):
                continue
            if len(cur) == batch_size:
                out.append(torch.stack(cur))
                cur = []
                if progress:
                    progress(done / total, "embedding training images")
        if cur:
            out.append(torch.stack(cur))
        return out

    fit_b, calib_b = batches(fit_paths), batches(calib_paths)
    if not fit_b or not calib_b:
        raise FileNotFoundError(f"the images listed in {split_path} could not be read from here "
                                f"(first: {fit_paths[:1] or calib_paths[:1]}); run from the folder training ran in")
    return fit_reference(model, fit_b, calib_b, source=f"{split_path.name}: train/val split {split.hash or ''}")


def _sides(image: Image | np.ndarray) -> tuple[int, int]:
    """The short and long side of the image as its file holds it (the reader's ``original_size``: a
    streamed folder keeps only a small view of each image), else of the array given."""
    size = image.meta.get("original_size") if isinstance(image, Image) else None
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size):
        short, long_ = sorted(int(v) for v in size)
    else:
        short, long_ = sorted((image.array if isinstance(image, Image) else np.asarray(image)).shape[:2])
    return short, long_


def check_domain(image: Image | np.ndarray, logits: np.ndarray, probs: np.ndarray, *, modality: str | None,
                 features: np.ndarray | None = None, reference: OODReference | None = None,
                 uncertain_below: float | None = None, distance: float | None = None) -> OODCheck:
    """Decide whether one image is out of the model's domain.

    Args:
        image: the image as read (``Image`` or float ``(H, W, C)`` in [0, 1]).
        logits: the model's raw logits, shape ``(C,)``.
        probs: calibrated probabilities, shape ``(C,)``.
        modality: the card's modality (``"CXR"``, ``"photo"``...); grey modalities get the colour test.
        features: pooled embedding ``(D,)``; needed for the reference check.
        reference: in-domain statistics; without it only heuristics run.
        uncertain_below: top probability under which the result is *uncertain*; default halfway
            between chance and certainty (0.75 for two classes).
        distance: the Mahalanobis distance of ``features`` when already computed for a batch.
    """
    arr = domain_view(image)
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    k = p.size
    limit = uncertain_below if uncertain_below is not None else 1.0 / k + 0.5 * (1.0 - 1.0 / k)
    energy = float(energy_score(np.asarray(logits).reshape(1, -1))[0])
    scores: dict[str, float] = {"max_prob": float(p.max()), "energy": energy,
                                "pixel_std": float(arr.std()), "colour_spread": colour_spread(arr)}
    reasons: list[str] = []
    if scores["pixel_std"] < _BLANK_STD:
        reasons.append(f"the image is almost blank (pixel std {scores['pixel_std']:.3f})")
    short, long_ = _sides(image)
    scores["aspect_ratio"] = long_ / max(short, 1)
    if scores["aspect_ratio"] > _MAX_ASPECT:
        reasons.append(f"the image is a strip, {scores['aspect_ratio']:.0f} times as long as it is wide "
                       f"(the model squashes every image into a square)")
    elif short < _MIN_SIDE:
        reasons.append(f"the image is only {short} px on its short side: too small to show what the model reads")
    gray = (modality or "").strip().upper() in GRAY_MODALITIES
    if gray and scores["colour_spread"] > _COLOUR_LIMIT:
        reasons.append(f"many colours ({scores['colour_spread']:.2f} > {_COLOUR_LIMIT}) for a "
                       f"grey-scale {modality} task")
    if isinstance(image, Image):
        reasons.extend(modality_reasons(image.meta, modality))
    method = "heuristic"
    if reference is not None and features is not None:
        method = "reference"
        dist = float(distance) if distance is not None else \
            float(reference.distance(np.asarray(features).reshape(1, -1))[0])
        scores.update(mahalanobis=dist, mahalanobis_threshold=reference.distance_threshold)
        if reference.energy_threshold is not None:
            scores["energy_threshold"] = reference.energy_threshold
        if dist > reference.distance_threshold:
            reasons.append(reference.far_reason(dist))
        # The energy score is reported (scores["energy"], the stored threshold) but decides nothing: on
        # the seven apps' models its AUROC against other apps' images was 0.12-0.85 (worse than chance
        # on five), so its 99 % limit flagged in-domain images more often than foreign ones.
    return OODCheck(flagged=bool(reasons), reasons=reasons, uncertain=bool(p.max() < limit),
                    method=method, scores=scores)
