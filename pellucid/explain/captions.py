"""What an explanation means, in words a clinician can read: the one place legends and captions are written.

Every door that shows a map (the web app, the HTML / PDF report, ``pellucid explain`` PNGs and JSON)
asks this module what to say, so the same map gets the same words everywhere:

* :func:`legend_for`: the colour bar's title and what its high and low ends mean for a method
  (for LIME: evidence for the class, or none);
* :func:`method_sentence`: one plain sentence on how the method made the map;
* :func:`score_sentences`: one plain sentence per faithfulness score (deletion, insertion, Average
  Drop, ROAD, the sanity check), with the numbers themselves left to :func:`technical_details`;
* :func:`map_notes`: warnings about the map itself: blank or nearly blank (and why, per method), mostly
  on the image's border (always checked), mostly outside the lungs (when a lung mask is known);
* :func:`read_explanation` gathers all of these for one :class:`~pellucid.core.pipeline.MethodResult`
  into a :class:`Reading`.

:data:`HOW_TO_READ` is the short guide shown beside explanations (``docs/explanations.md`` is the
long one). The thresholds are rules of thumb, stated in :data:`THRESHOLDS`; the numbers behind
every sentence stay available as details.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from pellucid.datasets.readers import BURNED_IN_NOTE
from pellucid.explain.lungshare import border_band, border_share, mask_shares

__all__ = ["BORDER_BAND", "BURNED_IN_CAVEAT", "HOW_TO_READ", "HOW_TO_READ_ITEMS", "SCORE_LABELS", "Legend",
           "Reading", "THRESHOLDS", "burned_in_caveat", "display_method", "legend_for", "map_notes",
           "method_sentence", "read_case_result", "read_explanation", "reading_dict", "score_items",
           "score_sentences", "share_items", "technical_details"]

#: What the report and the web app say of a DICOM whose header says text is burned into its pixels.
BURNED_IN_CAVEAT = ("Burned-in text: this DICOM says text is burned into its pixels, so the pictures of it here may "
                    "show the patient's name or other identifiers — check them before sharing.")


def burned_in_caveat(meta: Mapping | None) -> str | None:
    """:data:`BURNED_IN_CAVEAT` for an image whose reader notes say text is burned into its pixels, else None."""
    notes = (meta or {}).get("notes") or []
    return BURNED_IN_CAVEAT if BURNED_IN_NOTE in notes else None


#: Width of the image's outer band, as a fraction of each side, for the border share (the same band
#: :func:`pellucid.explain.lungshare.border_share` and the lung-share tables use).
BORDER_BAND = 0.08

#: Rules of thumb behind the sentences (ratios are to the explained class's probability).
THRESHOLDS = {
    "deletion_fast": 0.35, "deletion_slow": 0.7,      # deletion AUC / p: below fast = faithful map
    "insertion_fast": 0.7, "insertion_slow": 0.4,     # insertion AUC / p: above fast = faithful map
    "separation": 0.1,                                 # (insertion - deletion) / p below this: no separation
    "ad_low": 15.0, "ad_high": 50.0,                   # Average Drop with the top half kept, percent
    "near_empty_mean": 0.01, "near_empty_cover": 0.01,  # mean value / share of pixels above 0.1
    "border": 0.5,                                     # border share above which a note is shown
}

#: Technical labels of the faithfulness scores shown in details (arrows: which way is better).
SCORE_LABELS = {"deletion_auc": "deletion AUC ↓", "insertion_auc": "insertion AUC ↑", "road": "ROAD ↑",
                "ad_50": "drop with top 50% kept ↓"}

_NAMES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "xgradcam": "XGrad-CAM", "hirescam": "HiResCAM",
          "layercam": "LayerCAM", "eigencam": "Eigen-CAM", "scorecam": "Score-CAM", "lime": "LIME",
          "occlusion": "Occlusion", "ttame": "T-TAME"}
_CAMS = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam", "scorecam")

#: The short guide shown beside explanations, as ``(heading, text)`` items (``docs/explanations.md``
#: is the long one).
HOW_TO_READ_ITEMS = (
    ("Colours", "Each map is drawn over the image; the colour bar under it says what warm (red) and cool (blue) "
                "mean for that method. Warm marks what mattered most for the explained class, blue what mattered "
                "little. For LIME, coloured patches are evidence for the class; blue patches are not (neutral or "
                "against)."),
    ("Methods differ", "Grad-CAM and its relatives read the network's last feature maps (coarse blobs); LIME and "
                       "occlusion hide parts of the image and watch the probability change (model-agnostic, "
                       "slower). Where they agree, trust the map more."),
    ("The sentence under each map", "It says how faithful the map was on this image: if removing the highlighted "
                                    "regions first barely lowered the model's confidence, the map is a weak guide "
                                    "to what the model used. The numbers are under \"details\"."),
    ("Notes", "A blank map means no region stood out; a map on the image's edge or outside the lungs points to a "
              "shortcut (markers, text, the collimation edge), not to disease."),
    ("Not a diagnosis", "A map shows what the model looked at, not whether the model is right."),
)
#: :data:`HOW_TO_READ_ITEMS` as Markdown bullets (the web app).
HOW_TO_READ = "\n".join(f"- **{head}.** {text}" for head, text in HOW_TO_READ_ITEMS)


@dataclass(frozen=True)
class Legend:
    """What a colour bar says: a title and the meaning of its high (warm) and low (cool) ends."""

    title: str
    high: str
    low: str


@dataclass
class Reading:
    """Everything shown in words beside one map.

    Attributes:
        method: explainer name; ``title``: its display name.
        legend: the colour bar's text.
        sentence: how the method made the map (one sentence).
        scores: one plain sentence per faithfulness score present.
        notes: warnings about the map (blank, on the border, outside the lungs).
        details: ``(label, value)`` technical numbers for a "details" expander.
    """

    method: str
    title: str
    legend: Legend
    sentence: str
    scores: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: list[tuple[str, str]] = field(default_factory=list)

    @property
    def caption(self) -> str:
        """A one-line caption: the method and its colour legend."""
        return f"{self.title} — red: {self.legend.high}; blue: {self.legend.low}"


def display_method(method: str) -> str:
    """The method's display name (``gradcam`` → ``Grad-CAM``); unknown names are kept."""
    return _NAMES.get(method, method)


def _cls(class_name: str | None) -> str:
    return f"“{class_name}”" if class_name else "the explained class"


def legend_for(method: str, class_name: str | None = None) -> Legend:
    """The colour bar text of ``method``'s maps for the explained class."""
    c = _cls(class_name)
    if method == "lime":
        return Legend(f"LIME evidence for {c}", f"strong evidence for {c}", "no evidence for it (neutral or against)")
    if method == "occlusion":
        return Legend(f"Occlusion: drop in P({class_name or 'class'}) when hidden",
                      f"hiding this lowers {c} most", "hiding it changes little")
    return Legend(f"{display_method(method)}: influence on {c}", f"more influence on {c}", "less influence")


def method_sentence(method: str, class_name: str | None = None) -> str:
    """One plain sentence on how ``method`` made its map."""
    c = _cls(class_name)
    if method in _CAMS:
        return (f"{display_method(method)} shows where the network's last feature maps raised its score for {c}; "
                "it is coarse, a few blobs across the image.")
    if method == "lime":
        return (f"LIME hid random patches (superpixels) of the image and measured how the probability of {c} "
                f"changed; coloured patches are evidence for {c}.")
    if method == "occlusion":
        return (f"Occlusion slid a patch over the image and recorded how much the probability of {c} fell "
                "where it was hidden.")
    if method == "ttame":
        return (f"T-TAME, a small attention network trained on the model's features, marks the regions that "
                f"mattered most for {c}.")
    return f"{display_method(method)} highlights the regions that mattered most for {c}."


def _finite(v) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) and math.isfinite(float(v))


def _ratio(value: float, confidence: float | None) -> float:
    """``value`` relative to the explained class's probability (the curve's starting point)."""
    if confidence is None or not _finite(confidence) or confidence <= 0:
        return float(value)
    return float(value) / float(confidence)


def _deletion(v: float, confidence: float | None) -> str:
    r, t = _ratio(v, confidence), THRESHOLDS
    if r < t["deletion_fast"]:
        return ("Removing the highlighted regions first made the model's confidence fall quickly: the map points "
                "at what the model used.")
    if r < t["deletion_slow"]:
        return ("Removing the highlighted regions first lowered the model's confidence only gradually: the map is "
                "a partial guide to what the model used.")
    return ("Removing the highlighted regions first lowered the model's confidence slowly: this map is a weak "
            "guide to what the model used.")


def _insertion(v: float, confidence: float | None) -> str:
    r, t = _ratio(v, confidence), THRESHOLDS
    if r >= t["insertion_fast"]:
        return ("Showing only the highlighted regions (on a blurred image) brought the confidence back quickly: "
                "they carry most of the evidence.")
    if r >= t["insertion_slow"]:
        return "Showing only the highlighted regions brought the confidence back partly: they carry some of the evidence."
    return ("Showing only the highlighted regions brought little of the confidence back: much of the evidence "
            "lies elsewhere.")


def _average_drop(v: float) -> str:
    t = THRESHOLDS
    if v < t["ad_low"]:
        return (f"Keeping only the most highlighted half of the image cost {v:.0f}% of the confidence: that half "
                "holds almost all of the evidence.")
    if v < t["ad_high"]:
        return (f"Keeping only the most highlighted half of the image cost {v:.0f}% of the confidence: it holds "
                "much, not all, of the evidence.")
    return (f"Keeping only the most highlighted half of the image cost {v:.0f}% of the confidence: the evidence "
            "lies largely outside the highlighted half.")


def _road(v: float) -> str:
    if v > 0:
        return ("Blurring away the most highlighted pixels hurt the model more than blurring the least "
                "highlighted ones, as a faithful map should.")
    return ("Blurring away the most highlighted pixels hurt the model no more than blurring the least "
            "highlighted ones: the map's ranking is not borne out.")


def score_sentences(scores: Mapping[str, float], confidence: float | None = None) -> list[str]:
    """One plain sentence per faithfulness score (deletion, insertion, Average Drop at 50 %, ROAD, sanity).

    Args:
        scores: metric name → value (:func:`pellucid.explain.metrics.score_explanations` keys).
        confidence: the model's probability of the explained class; deletion and insertion AUCs are
            read relative to it (the curves start there). None reads them as they are.
    """
    out = []
    deletion, insertion = scores.get("deletion_auc"), scores.get("insertion_auc")
    if _finite(deletion):
        out.append(_deletion(deletion, confidence))
    if _finite(insertion):
        if _finite(deletion) and _ratio(insertion - deletion, confidence) < THRESHOLDS["separation"]:
            out.append("Showing only the highlighted regions did no better than removing them: the map does not "
                       "separate what the model needs from what it does not.")
        else:
            out.append(_insertion(insertion, confidence))
    if _finite(scores.get("ad_50")):
        insensitive = _finite(deletion) and _ratio(deletion, confidence) >= THRESHOLDS["deletion_slow"]
        if insensitive and float(scores["ad_50"]) < THRESHOLDS["ad_low"]:
            out.append(f"Keeping only the most highlighted half of the image cost {float(scores['ad_50']):.0f}% of the "
                       "confidence, but removing that half did not lower it either: the model barely reacts to "
                       "what is hidden, so these scores say little about the map.")
        else:
            out.append(_average_drop(float(scores["ad_50"])))
    if _finite(scores.get("road")):
        out.append(_road(float(scores["road"])))
    if scores.get("sanity_pass") is not None:
        out.append("The map changed when the model's weights were randomised, as it should." if scores["sanity_pass"]
                   else "The map barely changed when the model's weights were randomised: it may show the image "
                        "more than the model.")
    return out


def _empty_reason(method: str, c: str) -> str:
    if method == "occlusion":
        return (f"the model's probability of {c} barely changed when patches were hidden, so no region stands out "
                "(the decision rests on the image as a whole, not on one spot)")
    if method == "lime":
        return f"no superpixel was evidence for {c} when hidden and shown at random"
    if method in _CAMS or method == "ttame":
        return (f"no region's features raised the score of {c}; the decision comes from elsewhere (e.g. the "
                "network's bias), so this map says nothing about it")
    return f"nothing in the image stood out for {c}"


def map_notes(method: str, heatmap: np.ndarray, class_name: str | None = None,
              lung_mask: np.ndarray | None = None) -> list[str]:
    """Warnings about a map itself, in plain words.

    * blank (no positive value) or nearly blank (mean below 1 %, or under 1 % of pixels above 0.1),
      with the method's reason;
    * mostly on the image's border: more than half of the map's mass in the outer
      :data:`BORDER_BAND` band (always checked; a uniform map puts about 29 % there);
    * mostly outside the lungs, when ``lung_mask`` is given: lung share under one half, or under the
      lungs' own area (what a uniform map would get).

    Args:
        method: explainer name.
        heatmap: ``(H, W)`` map in [0, 1].
        class_name: the explained class.
        lung_mask: lung mask covering the same field of view (any resolution), or None.
    """
    h = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float64)), 0, None)
    c, t = _cls(class_name), THRESHOLDS
    if h.size == 0 or h.max() <= 0:
        return [f"This map is blank: {_empty_reason(method, c)}."]
    notes = []
    if h.mean() < t["near_empty_mean"] or (h > 0.1).mean() < t["near_empty_cover"]:
        notes.append(f"This map is nearly blank: {_empty_reason(method, c)}; only a tiny area shows.")
    border = float(h[border_band(h.shape, BORDER_BAND)].sum() / h.sum())
    if border > t["border"]:
        notes.append(f"{border:.0%} of this map lies on the image's outer edge, where markers, text and the "
                     "collimation edge sit, not the anatomy: the model may be using a shortcut.")
    if lung_mask is not None:
        s = mask_shares(h, lung_mask, BORDER_BAND)
        if not s["empty"] and (s["lung_share"] < 0.5 or s["lung_share"] < s["lung_fraction"]):
            notes.append(f"Only {s['lung_share']:.0%} of this map falls inside the lungs (which cover "
                         f"{s['lung_fraction']:.0%} of the image): the model may be looking outside the anatomy.")
    return notes


def _fmt(v) -> str:
    return f"{float(v):.3f}" if _finite(v) else "n/a"


def score_items(scores: Mapping[str, float]) -> list[tuple[str, str]]:
    """The scores as technical ``(label, "0.123")`` rows (see :data:`SCORE_LABELS`; percentages for the
    Average Drop / Increase columns); every score when none of the labelled ones is present."""
    shown = [(k, label) for k, label in SCORE_LABELS.items() if k in scores] or [(k, k) for k in scores]
    return [(label, f"{scores[k]:.1f}%" if k.startswith(("ad_", "ic_")) and _finite(scores[k]) else _fmt(scores[k]))
            for k, label in shown]


def share_items(heatmap: np.ndarray, mask: np.ndarray) -> list[tuple[str, str]]:
    """Where a map's mass falls, as ``(label, "38.2%")``: lung share, the lung area (a uniform
    map's lung share) and border share; an all-zero map says so instead of showing NaN."""
    r = mask_shares(heatmap, mask, BORDER_BAND)
    if r["empty"]:
        return [("lung share", "n/a (empty map)"), ("lung area", f"{r['lung_fraction']:.1%}")]
    return [("lung share", f"{r['lung_share']:.1%}"), ("lung area", f"{r['lung_fraction']:.1%}"),
            ("border share", f"{r['border_share']:.1%}")]


def technical_details(scores: Mapping[str, float], heatmap: np.ndarray | None = None,
                      lung_mask: np.ndarray | None = None, detail: str = "") -> list[tuple[str, str]]:
    """The numbers behind the sentences, as ``(label, value)`` rows for a "details" expander."""
    rows = list(score_items({k: v for k, v in scores.items() if _finite(v)}))
    if heatmap is not None:
        h = np.asarray(heatmap, dtype=np.float64)
        rows.append(("map mean / max", f"{h.mean():.3f} / {h.max():.3f}"))
        if lung_mask is not None:
            rows += share_items(heatmap, lung_mask)
        elif h.max() > 0:
            rows.append(("border share", f"{border_share(h, BORDER_BAND):.1%}"))
    if detail:
        rows.append(("computed", detail))
    return rows


def read_explanation(result, class_name: str | None = None, confidence: float | None = None,
                     lung_mask: np.ndarray | None = None) -> Reading:
    """Everything said in words about one explanation.

    Args:
        result: a :class:`~pellucid.core.pipeline.MethodResult` (``method``, ``heatmap``, ``scores``,
            ``detail``, ``extras``).
        class_name: the explained class (default: ``result.extras["target_name"]``).
        confidence: the model's probability of that class (reads deletion / insertion relative to it).
        lung_mask: the case's lung mask, or None.
    """
    extras = getattr(result, "extras", {}) or {}
    class_name = class_name or extras.get("target_name")
    scores = dict(getattr(result, "scores", {}) or {})
    heat = result.heatmap
    notes = [] if heat is None else map_notes(result.method, heat, class_name, lung_mask)
    return Reading(method=result.method, title=display_method(result.method),
                   legend=legend_for(result.method, class_name), sentence=method_sentence(result.method, class_name),
                   scores=score_sentences(scores, confidence), notes=notes,
                   details=[("method", result.method),
                            *technical_details(scores, heat, lung_mask, getattr(result, "detail", "") or "")])


def read_case_result(case, result) -> Reading:
    """:func:`read_explanation` of one of a case's results, with the case's probability of the
    explained class and its lung mask (every door reads a map this way)."""
    name = (getattr(result, "extras", {}) or {}).get("target_name")
    if name is None and getattr(case, "index", None) is not None and getattr(case, "probs", None):
        name = list(case.probs)[case.index]
    confidence = (getattr(case, "probs", None) or {}).get(name)
    return read_explanation(result, name, confidence, getattr(case, "lung_mask", None))


def reading_dict(reading: Reading) -> dict:
    """A :class:`Reading` as plain JSON-safe data (for ``pellucid explain`` JSON and report contexts)."""
    return {"title": reading.title, "legend": {"title": reading.legend.title, "high": reading.legend.high,
                                               "low": reading.legend.low},
            "sentence": reading.sentence, "scores_text": list(reading.scores), "notes": list(reading.notes),
            "details": [list(d) for d in reading.details]}

