"""T-TAME: a trainable attention explainer fitted once per model, then one forward pass per map.

Ntrougkas, Gkalelis & Mezaris, "T-TAME: Trainable Attention Mechanism for Explaining Convolutional
Networks and Vision Transformers", IEEE Access 12, 2024 (doi:10.1109/ACCESS.2024.3405788); written
here from the paper, not from its (non-commercial) code.

Forward hooks tap the feature maps of several late stages of the frozen classifier (the backbone
spec's ``tap_layers``, shallow to deep). Each tap goes through a *feature branch* (1×1 convolution
keeping the channel count, batch norm, skip connection, ReLU); the branches are upsampled
bilinearly to the largest tap's resolution, concatenated, and a *fusion* 1×1 convolution makes one
map per class; a sigmoid puts the maps in [0, 1] (:class:`TTAMEAttention`). The map of the explained
class, upsampled to the input size, is the explanation — computed in the same forward pass that
gives the model's prediction.

Training (:meth:`TTAME.fit`, on Lightning, with the classifier frozen and left bit-identical): each
image is multiplied by the upsampled map of the class the model predicts for it, and the loss is
(:func:`ttame_loss`)

    ``λ_ce · CE(f(x ⊙ up(A_ŷ)), ŷ) + λ_area · mean_b (mean_ij A_ŷ)^p + λ_tv · TV(A_ŷ)``

— cross-entropy of the classifier on the masked image against its own prediction, an area term
(the paper's power form, exponent ``p``) that keeps masks small, and a total-variation term that
keeps them smooth. The area and smoothness terms are taken on the attention map at its own
resolution (before the upsampling to the input size). The frozen taps and predictions of the
training images are computed once and cached, so one step costs one forward + one backward pass of
the classifier on the masked batch.

The attention weights live in the model folder as ``ttame.safetensors`` (no pickles) and are
recorded in ``card.json`` under ``explainers_fitted.ttame``; :func:`load_ttame` reads them back and
``get_explainer("ttame")`` finds them through ``folder=`` or the folder a model was loaded from.
``pellucid fit-explainer ttame --model DIR`` (:func:`run_cli`) fits on the training part of the
folder's ``split.json``.

One concern per module, every public name re-exported here (importing this package registers the
``"ttame"`` explainer): :mod:`~pellucid.explain.ttame.loss` (the loss terms),
:mod:`~pellucid.explain.ttame.attention` (the architecture), :mod:`~pellucid.explain.ttame.taps`
(where the classifier is tapped), :mod:`~pellucid.explain.ttame.data` (training images and cached
taps), :mod:`~pellucid.explain.ttame.training` (the Lightning loop),
:mod:`~pellucid.explain.ttame.explainer` (:class:`TTAME`), :mod:`~pellucid.explain.ttame.persistence`
(the model-folder files) and :mod:`~pellucid.explain.ttame.cli` (:func:`run_cli`).
"""
from __future__ import annotations

from pellucid.explain.ttame.loss import LossWeights, area_loss, masked_ce_loss, ttame_loss, variation_loss
from pellucid.explain.ttame.attention import FeatureBranch, TTAMEAttention
from pellucid.explain.ttame.taps import _resolve_layers, _Taps, default_tap_layers  # noqa: F401 (tests use the privates)
from pellucid.explain.ttame.persistence import WEIGHTS_FILE, has_ttame, load_ttame, save_ttame
from pellucid.explain.ttame.data import _decode, _resolve_paths, _split_of, folder_images  # noqa: F401 (bench uses the privates)
from pellucid.explain.ttame.explainer import TTAME  # registers the "ttame" explainer
from pellucid.explain.ttame.cli import run_cli

__all__ = [
    "LossWeights",
    "area_loss",
    "variation_loss",
    "masked_ce_loss",
    "ttame_loss",
    "FeatureBranch",
    "TTAMEAttention",
    "TTAME",
    "default_tap_layers",
    "save_ttame",
    "load_ttame",
    "has_ttame",
    "WEIGHTS_FILE",
    "run_cli",
]
