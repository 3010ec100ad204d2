"""Candidate recipes of the recipe search (:mod:`pellucid.core.tune`): what a candidate is
(:class:`Candidate`: a linear probe or a soft vote of probes on cached frozen features, a training run,
or a hybrid vote of both) and the list a task gets (:func:`default_candidates`)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Sequence

__all__ = ["CANDIDATE_KINDS", "CROPPING_AUGMENTS", "Candidate", "EMA_EPOCHS", "HIGH_RES", "LITE_SIZES",
           "MID_RES_SCALE", "PROBE_TAPS", "TEST_SCALES", "XHIGH_RES", "XXHIGH_RES", "SWA_START", "default_candidates",
           "test_sizes"]

CANDIDATE_KINDS = ("probe", "train", "hybrid")
LITE_SIZES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
#: the larger input of the high-resolution candidates (sources of 200 px and more): fine detail such as
#: a chest X-ray's small opacities is lost at the networks' own 224-260 px
HIGH_RES = 320
#: a larger input still, for the probes' vote only (frozen features cost one pass per image; a fine-tune at this
#: size would cost four times B's steps): small objects in a photograph get more of the networks' resolution
XHIGH_RES = 448
#: the largest input, again for the probes' vote only and for sources of 200 px and more (waste's photographs are
#: 288 x 384 px): alone and beside the vote at XHIGH_RES px (six probes, two input sizes per network)
XXHIGH_RES = 576
#: sources below 200 px that were cut from larger images (sonar's 160-px input; its planes and ships are 200-512 px)
#: also fine-tune at this multiple of their input, rounded to 16 px: about 2.25x B's cost per step, where the
#: probes' doubled input would cost four times
MID_RES_SCALE = 1.5
EMA_EPOCHS = 2.0  # the time constant of the weight-averaging candidates (``ema`` in a recipe), in epochs
SWA_START = 0.5  # stochastic weight averaging candidates (``swa`` in a recipe): the averaged last half of the epochs
SNAPSHOTS = 3  # snapshot ensemble candidates (``snapshots`` in a recipe): cosine cycles of a longer fine-tune
#: the test-time input candidates (``test_size`` in a recipe): the plain fine-tunes predict at these
#: multiples of their training size. Random resized crops of 60-100 % of the area show objects about 1.1x larger
#: in training than a whole image does at prediction; a larger test input gives them back that size (FixRes)
TEST_SCALES = (1.15, 1.3)
#: augmentation presets that train on random resized crops (pellucid.datasets.augment)
CROPPING_AUGMENTS = ("natural", "skin", "skin_tone")
#: the inner layers the ``+taps`` probes pool beside each Lite network's embedding (``probe_layers`` in a recipe):
#: the last four of its seven stages, whose mid-level features (textures, parts) the 1280-wide last layer,
#: shaped by ImageNet's classes, keeps only in part
PROBE_TAPS = ("blocks.3", "blocks.4", "blocks.5", "blocks.6")
_SHORT = {"efficientnet_lite0": "lite0", "efficientnet_lite1": "lite1", "efficientnet_lite2": "lite2"}


@dataclass(frozen=True)
class Candidate:
    """One recipe to score.

    Attributes:
        name: short unique name (what ``--candidates`` selects).
        kind: ``probe`` (linear head(s) on cached frozen features) or ``train`` (a training run).
        members: probe: ``(backbone, image_size)`` per member; more than one is a soft vote.
        flip: probe: ``True`` is test-time augmentation — the head is fitted on plain and mirrored
            features and predicts the mean of both (``probe_flip = true`` and ``tta = "flip"`` in a recipe: two
            passes per image);
            ``"fit"`` fits on plain and mirrored features and predicts from the plain image alone
            (``probe_flip = true`` in a recipe: training-time augmentation of the probe, no cost at
            prediction).
        layers: probe: inner layers each member pools beside its embedding (``probe_layers``).
        overrides: train: :class:`~pellucid.core.training.TrainConfig` overrides.
        role: ``A`` / ``B`` for the two baselines, ``current`` for the shipped recipe.
        about: one line for the table.
        parts: hybrid: the names of a probe candidate and one or two training candidates whose
            calibrated probabilities are soft-voted (scored from their folds, nothing is trained again).
        train_weight: hybrid: each training candidate's voting weight (each probe member weighs 1).
    """

    name: str
    kind: str
    members: tuple[tuple[str, int], ...] = ()
    flip: bool | str = False
    layers: tuple[str, ...] = ()
    overrides: dict = field(default_factory=dict, hash=False, compare=False)
    role: str = ""
    about: str = ""
    parts: tuple[str, ...] = ()
    train_weight: float = 1.0

    def recipe(self, task, others: dict | None = None) -> dict:
        """The ``[recipe]`` keys (plus ``image_size``) that train this candidate with ``pellucid train``."""
        if self.kind == "train":
            return _effective({**task.recipe, **self.overrides,
                               "image_size": self.overrides.get("image_size", task.image_size)})
        if self.kind == "hybrid":
            probe = (others or {})[self.parts[0]]
            pr = probe.recipe(task)
            members = pr.get("members") or [{k: v for k, v in pr.items() if k in (
                "backbone", "image_size", "finetune", "epochs", "probe_flip", "probe_layers", "tta")}]
            tuned = []
            for part in self.parts[1:]:
                trained = (others or {})[part]
                keys = trained.recipe(task) if trained.role == "current" else trained.overrides
                tm = {k: v for k, v in keys.items() if k != "members"}
                tm.setdefault("image_size", task.image_size)
                tuned.append({**tm, "weight": self.train_weight})
            return {"finetune": "linear-probe", "epochs": 0, "image_size": members[0]["image_size"],
                    "members": [dict(m) for m in members] + tuned}
        keys = {"probe_flip": True} if self.flip else {}
        if self.flip is True:  # mirrored test-time views too: the mean of the image's and its mirror's logits
            keys["tta"] = "flip"
        if self.layers:
            keys["probe_layers"] = list(self.layers)
        if len(self.members) == 1:
            backbone, size = self.members[0]
            return {"backbone": backbone, "finetune": "linear-probe", "epochs": 0, "image_size": size, **keys}
        return {"finetune": "linear-probe", "epochs": 0, "image_size": self.members[0][1],
                "members": [{"backbone": b, "image_size": s, "finetune": "linear-probe", "epochs": 0, **keys}
                            for b, s in self.members]}


_PROGRESSIVE_ONLY = ("stages_per_epoch", "max_stages", "lr_decay")


def _effective(recipe: dict) -> dict:
    """A training recipe without the keys its fine-tune strategy ignores (the progressive schedule's
    stage keys on any other strategy) or that are off by default (``probe_flip``; ``tta = "none"``), so that
    equal recipes compare equal — and a table written before a key existed keeps its rows."""
    out = {k: v for k, v in recipe.items() if not (k in ("probe_flip", "ema", "swa", "snapshots", "test_size",
                                                          "probe_layers")
                                                      and not v) and not (k == "tta" and v in (None, "none"))}
    if recipe.get("finetune") == "progressive":
        return out
    return {k: v for k, v in out.items() if k not in _PROGRESSIVE_ONLY}


def _same_recipe(old: dict | None, recipe: dict) -> bool:
    return bool(old) and _effective(old.get("recipe") or {}) == _effective(json.loads(json.dumps(recipe, default=str)))


def _probe(members: Sequence[tuple[str, int]], role: str = "", flip: bool | str = False, about: str = "",
           layers: Sequence[str] = ()) -> Candidate:
    name = "probe:" + "+".join(f"{_SHORT.get(b, b)}@{s}" for b, s in members) + {True: "+flip", "fit": "+flipfit"}.get(
        flip, "") + ("+taps" if layers else "")
    return Candidate(name, "probe", tuple(members), flip=flip, layers=tuple(layers), role=role, about=about)


def test_sizes(train_size: int) -> list[int]:
    """The test-time inputs of a fine-tune trained at ``train_size`` px: :data:`TEST_SCALES` of it, to 32 px."""
    return [int(round(train_size * r / 32)) * 32 for r in TEST_SCALES]


def _mixed(cands: list, trained: list[str], parent_suffix: str, mixing: str, about: str) -> None:
    """Add ``<part>+<mixing>`` (recipe key ``mixing``) for each fine-tune in ``trained`` ending in ``parent_suffix``."""
    for part in [p for p in trained if p.startswith("finetune:") and p.endswith(parent_suffix)]:
        over = next(c for c in cands if c.name == part).overrides
        cands.append(Candidate(f"{part}+{mixing}", "train", overrides={**over, "mixing": mixing},
                               about=f"{part} with {about}"))
        trained.append(f"{part}+{mixing}")


def default_candidates(task, fine_tune_epochs: int = 6) -> list[Candidate]:
    """The candidates of a task, cheapest first: probes at the task's size and at each Lite
    network's own, their soft vote, a mirrored-TTA probe, then baseline B, LP-FT, B on Lite2 at its
    own size and LP-FT on it, B and the vote at ``HIGH_RES`` px (those four for inputs of 200 px and more),
    the vote at ``XHIGH_RES`` px (inputs of 100 px and more, such as sonar's 160 px), the vote at
    ``XXHIGH_RES`` px and the six probes at both sizes (inputs of 200 px and more; probes only, no hybrids),
    B at ``MID_RES_SCALE`` x the input for sources of 100-199 px (sonar: 240 px), B with class-balanced batches
    (macro-F1 tasks of more than two classes; at both inputs), each plain fine-tune again 2.5x longer (``+long``),
    weight averaging (``+ema``, and ``+swa`` on the longer plain fine-tunes), a snapshot ensemble of each
    longer plain fine-tune (``+snap``), CutMix on each averaged longer fine-tune (``+cutmix``; photographs of 200 px
    and more trained on random resized crops), each plain fine-tune predicting at a larger input
    (``+at<px>``, :func:`test_sizes`; inputs of 200 px and more trained on random resized crops), MixUp on each
    averaged longer class-balanced fine-tune of a macro-F1 task without crops (``+mixup``; sonar), each
    exponentially averaged longer fine-tune again with another training seed (``+seed``), the shipped recipe, and
    the hybrids of the vote with each trained candidate, with two of them, and with a fine-tune and its seed twin
    (a seed ensemble)."""
    small = task.image_size < 200  # inputs below the networks' own sizes: the probes' vote doubles them
    # tiny sources (28-px PneumoniaMNIST, 32-px nuclei patches, read at 64 px) gain nothing at 448 px; sonar's 160-px
    # input comes from 256-512-px sonar images, which do
    tiny = task.image_size < 100
    size = task.image_size
    base = "efficientnet_lite0"
    cands = [_probe([(base, size)], role="A", about="baseline A: frozen Lite0 + linear head"),
             _probe([(base, size)], flip=True, about="Lite0 probe, mirrored test-time augmentation (tta = flip)")]
    sizes = {b: (2 * size if small else s) for b, s in LITE_SIZES.items()}
    if small:
        cands.append(_probe([(base, sizes[base])], about="Lite0 probe, input upsampled 2x"))
    for b in ("efficientnet_lite1", "efficientnet_lite2"):
        cands.append(_probe([(b, sizes[b])], about=f"{_SHORT[b].title()} probe"))
    trio = [(b, sizes[b]) for b in LITE_SIZES]
    hi_trio = [(b, HIGH_RES) for b in LITE_SIZES]
    xhi_trio = [(b, XHIGH_RES) for b in LITE_SIZES]
    cands.append(_probe(trio, about="soft vote of the three Lite probes"))
    cands.append(_probe(trio, flip=True, about="soft vote, each probe fitted on plain and mirrored images and "
                                                "predicting the mean of both views (tta = flip: twice the passes)"))
    cands.append(_probe([(base, size)], flip="fit", about="Lite0 probe fitted on plain and mirrored training "
                                                          "images (probe_flip; prediction unchanged)"))
    cands.append(_probe(trio, flip="fit", about="soft vote of the three Lite probes, each fitted on plain and "
                                                "mirrored training images (probe_flip)"))
    if not small:
        cands.append(_probe(hi_trio, about=f"soft vote of the three Lite probes, every input at {HIGH_RES} px"))
    if not tiny:
        cands.append(_probe(xhi_trio, about=f"soft vote of the three Lite probes, every input at {XHIGH_RES} px"))
    # the votes again, each probe also reading the pooled outputs of its network's last four stages
    taps_trios = [trio] + ([hi_trio] if not small else []) + ([xhi_trio] if not tiny else [])
    for t in taps_trios:
        cands.append(_probe(t, layers=PROBE_TAPS, about=f"soft vote of the three Lite probes at {t[0][1]} px"
                                                        f"{'' if t != trio else ' (their own sizes)'}, each reading "
                                                        f"its network's last four stages beside its embedding "
                                                        f"(probe_layers)"))
    if not small:
        xxhi_trio = [(b, XXHIGH_RES) for b in LITE_SIZES]
        cands.append(_probe(xxhi_trio, about=f"soft vote of the three Lite probes, every input at {XXHIGH_RES} px"))
        cands.append(_probe(xhi_trio + xxhi_trio, about=f"soft vote of six Lite probes: each network at {XHIGH_RES} "
                                                        f"and at {XXHIGH_RES} px"))
    plain = {"backbone": base, "finetune": "full", "epochs": fine_tune_epochs, "lr": 5e-4, "head_lr": 1e-3,
             "mixing": "none", "members": [], "probe_patience": 0, "patience": fine_tune_epochs}
    cands.append(Candidate("finetune:lite0", "train", overrides=plain, role="B",
                           about=f"baseline B: plain full fine-tune of Lite0, {fine_tune_epochs} epochs"))
    lpft = {"backbone": base, "finetune": "lp-ft", "epochs": fine_tune_epochs, "lr": 1e-4, "head_lr": 1e-4,
            "mixing": "none", "members": [], "probe_patience": 2}
    cands.append(Candidate("lp-ft:lite0", "train", overrides=lpft,
                           about="LP-FT: probe head first, then everything at a small learning rate"))
    trained = ["finetune:lite0", "lp-ft:lite0"]
    if not small:  # a larger ImageNet network fine-tuned the same way, at its own input size
        cands.append(Candidate("finetune:lite2", "train",
                               overrides={**plain, "backbone": "efficientnet_lite2",
                                          "image_size": LITE_SIZES["efficientnet_lite2"]},
                               about=f"B on EfficientNet-Lite2 at {LITE_SIZES['efficientnet_lite2']} px "
                                     f"(about twice Lite0's cost per step)"))
        cands.append(Candidate("lp-ft:lite2", "train",
                               overrides={**lpft, "backbone": "efficientnet_lite2",
                                          "image_size": LITE_SIZES["efficientnet_lite2"]},
                               about=f"LP-FT on EfficientNet-Lite2 at {LITE_SIZES['efficientnet_lite2']} px"))
        trained += ["finetune:lite2", "lp-ft:lite2"]
        cands.append(Candidate(f"finetune:lite0@{HIGH_RES}", "train", overrides={**plain, "image_size": HIGH_RES},
                               about=f"B with the input at {HIGH_RES} px instead of {size} (about twice the cost "
                                     "per step)"))
        trained.append(f"finetune:lite0@{HIGH_RES}")
    mid = {}
    if small and not tiny:  # B at MID_RES_SCALE x a small input cut from larger images
        mid = {"image_size": int(round(MID_RES_SCALE * size / 16)) * 16}
        cands.append(Candidate(f"finetune:lite0@{mid['image_size']}", "train", overrides={**plain, **mid},
                               about=f"B with the input at {mid['image_size']} px instead of {size} (about "
                                     f"{(mid['image_size'] / size) ** 2:.1f}x the cost per step)"))
        trained.append(f"finetune:lite0@{mid['image_size']}")
    if "macro_f1" in task.metrics and len(task.classes) > 2:  # rare classes matter: class-balanced batches
        cands.append(Candidate("finetune:lite0+sampler", "train", overrides={**plain, "balance": "sampler"},
                               about="B with class-balanced sampling (every batch draws the classes equally "
                                     "often) instead of class weights in the loss"))
        trained.append("finetune:lite0+sampler")
        if mid:
            cands.append(Candidate(f"finetune:lite0@{mid['image_size']}+sampler", "train",
                                   overrides={**plain, **mid, "balance": "sampler"},
                                   about=f"B at {mid['image_size']} px with class-balanced sampling"))
            trained.append(f"finetune:lite0@{mid['image_size']}+sampler")
    # B run 2.5x longer (15 epochs: about the ten minutes of a plain fine-tune on the reference CPU)
    longer = 5 * fine_tune_epochs // 2
    for part in list(trained):
        if part.startswith("finetune:"):
            over = next(c for c in cands if c.name == part).overrides
            cands.append(Candidate(f"{part}+long", "train", overrides={**over, "epochs": longer, "patience": longer},
                                   about=f"{part} for {longer} epochs instead of {fine_tune_epochs}"))
            trained.append(f"{part}+long")
    # an exponential moving average of the weights (time constant EMA_EPOCHS epochs) on the longer
    # fine-tunes and on LP-FT
    for part in [p for p in trained if p.endswith("+long") or p == "lp-ft:lite0"]:
        over = next(c for c in cands if c.name == part).overrides
        cands.append(Candidate(f"{part}+ema", "train", overrides={**over, "ema": EMA_EPOCHS},
                               about=f"{part} with an exponential moving average of its weights "
                                     f"(time constant {EMA_EPOCHS:g} epochs, from the end of the warm-up)"))
        trained.append(f"{part}+ema")
    # stochastic weight averaging on the longer plain fine-tunes: the rate holds from the middle of the
    # run on and the weights at the end of each of those epochs are averaged equally
    for part in [p for p in trained if p.startswith("finetune:") and p.endswith("+long")]:
        over = next(c for c in cands if c.name == part).overrides
        cands.append(Candidate(f"{part}+swa", "train", overrides={**over, "swa": SWA_START},
                               about=f"{part} with stochastic weight averaging (constant rate and an equal "
                                     f"average of the epoch-end weights over the last {1 - SWA_START:.0%} of the epochs)"))
        trained.append(f"{part}+swa")
    # a snapshot ensemble of each longer plain fine-tune: the cosine restarts SNAPSHOTS times and the
    # weights at the end of each cycle vote as equal members
    for part in [p for p in trained if p.startswith("finetune:") and p.endswith("+long")]:
        over = next(c for c in cands if c.name == part).overrides
        if over["epochs"] % SNAPSHOTS == 0:
            cands.append(Candidate(f"{part}+snap", "train", overrides={**over, "snapshots": SNAPSHOTS},
                                   about=f"{part} as a snapshot ensemble: {SNAPSHOTS} cosine cycles of "
                                         f"{over['epochs'] // SNAPSHOTS} epochs, the weights at the end of each "
                                         "a member of an equal vote"))
            trained.append(f"{part}+snap")
    if not small and task.augment in CROPPING_AUGMENTS:  # photographs trained on random resized crops
        # CutMix on the averaged longer fine-tunes: each batch pastes a random box of another image of the batch
        # in, and its labels are mixed by the box's area
        _mixed(cands, trained, "+long+ema", "cutmix",
               "CutMix (mixing: a box of another image of the batch pasted in, the labels mixed by its area)")
        # a larger input at prediction for the plain fine-tunes (one model each)
        for part in [p for p in trained if p.startswith("finetune:") and "+snap" not in p]:
            over = next(c for c in cands if c.name == part).overrides
            for z in test_sizes(int(over.get("image_size", size))):
                cands.append(Candidate(f"{part}+at{z}", "train", overrides={**over, "test_size": z},
                                       about=f"{part}, the trained model predicting at {z} px (test_size; its "
                                             "training is unchanged)"))
                trained.append(f"{part}+at{z}")
    if "macro_f1" in task.metrics and len(task.classes) > 2 and not tiny and task.augment not in CROPPING_AUGMENTS:
        # MixUp on the averaged longer class-balanced fine-tunes of sources without crops (sonar's chips): each batch
        # is blended with a shuffled copy of itself, and so are its labels
        _mixed(cands, trained, "+sampler+long+ema", "mixup",
               "MixUp (each image blended with another of the batch, the labels by the same share)")
    # a seed ensemble: each averaged longer fine-tune again with another training seed (the fold seed + 1,
    # `seed = 1` in a shipped ensemble's member); it only pairs with its twin in the vote below
    twins = [(p, f"{p}+seed") for p in trained if p.startswith("finetune:") and p.endswith("+long+ema")]
    for part, twin in twins:
        over = next(c for c in cands if c.name == part).overrides
        cands.append(Candidate(twin, "train", overrides={**over, "seed": 1},
                               about=f"{part} again with another training seed (a seed ensemble with it)"))
    cands.append(Candidate("current", "train", overrides={}, role="current", about="the recipe in task.toml"))
    # the shipped recipe joins the hybrids when it is one trained model (e.g. mpox's LP-FT)
    single = not task.recipe.get("members") and task.recipe.get("finetune", "full") != "linear-probe"
    every = trained + (["current"] if single else [])
    votes = [(_probe(trio).name, every), (_probe(trio, flip="fit").name, every), (_probe(trio, flip=True).name, every)]
    if not small:  # the high-resolution votes with every fine-tune (each member decodes at its own size)
        votes.append((_probe(hi_trio).name, every))
    if not tiny:
        votes.append((_probe(xhi_trio).name, every))
    votes += [(_probe(t, layers=PROBE_TAPS).name, every) for t in taps_trios]
    for vote, parts in votes:
        for part in parts:
            for w in (1.0, 3.0):
                cands.append(Candidate(f"{vote}+{'' if w == 1 else f'{w:g}x'}{part}", "hybrid",
                                       parts=(vote, part), train_weight=w,
                                       about=f"soft vote of `{vote}` and {part} (weight {w:g} against 1 per "
                                             "probe), scored from both candidates' folds"))
    # two fine-tunes in the vote (a small ensemble of fine-tunes: other length, network, or averaging),
    # each weighted 1 or 2, so together they weigh 2 or 4 against the three probes; the probes with and without
    # their mirrored views
    trained = [t for t in trained if "+at" not in t]  # a test-size twin pairs with nothing: its weights are its parent's
    for vote in (_probe(trio).name, _probe(trio, flip=True).name):
        for i, one in enumerate(trained):
            for two in trained[i + 1:] + [t for p, t in twins if p == one]:
                for w in (1.0, 2.0):
                    cands.append(Candidate(f"{vote}+{'' if w == 1 else f'{w:g}x'}({one}, {two})", "hybrid",
                                           parts=(vote, one, two), train_weight=w,
                                           about=f"soft vote of `{vote}`, {one} and {two} (weight {w:g} each "
                                                 "against 1 per probe), scored from the three candidates' folds"))
    return cands
