"""The case pipeline's predict half: every door's one way from inputs to decided, domain-checked Cases.

``read ▸ preprocess ▸ predict ▸ calibrate ▸ decide ▸ domain check`` for files, folders or images
already in memory. Each input becomes one :class:`Case` — an unreadable one carries its error (a
one-line, path-scrubbed message) instead of stopping the run — and Cases stream out in input order,
one batch at a time, so a folder of any size runs in bounded memory: files are decoded (and
preprocessed) in DataLoader worker processes when ``workers > 0``, and a Case keeps its image only when
asked (``keep_images``). The CLI (``predict``, ``eval``, ``explain``, ``report``), the web app and the
library all call :class:`CasePipeline`; the explain half (:mod:`pellucid.explain.pipeline`) attaches
explanations and their scores to the same Cases.

The domain check of every Case combines the model's out-of-domain reference (when the model folder
has one), the image heuristics and the DICOM modality check of :mod:`pellucid.core.ood`. What happens
to a flagged input is the *domain policy*: ``"label"`` keeps the model's label beside the flag,
``"withhold"`` leaves the label empty (the probabilities stay, for audit). The card's
``domain_policy`` sets the default — radiology and pathology models (grey modalities, histopathology)
withhold, the others label — and callers may override it.
"""
from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from pellucid.core.calibration import apply_temperature
from pellucid.core.card import ModelCard, as_card
from pellucid.core.ood import GRAY_MODALITIES, OODCheck, check_domain, domain_view, forward_with_features
from pellucid.core.privacy import display_name, read_quietly, safe_meta, safe_text, scrub_path, sha256_file
from pellucid.datasets.readers import DICOM_SUFFIXES, Image, ImageReadError, check_file, is_dicom

__all__ = ["DOMAIN_POLICIES", "Case", "CasePipeline", "CaseWriter", "MethodResult", "PipelineError", "Progress",
           "csv_fields", "default_domain_policy"]

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
DOMAIN_POLICIES = ("label", "withhold")


class PipelineError(ValueError):
    """A request the pipeline cannot run as given (no inputs found, an unknown policy)."""


@dataclass(eq=False)
class MethodResult:
    """One explainer's output for one case.

    Attributes:
        method: explainer name.
        heatmap: ``(h, w)`` float in [0, 1] at the image's resolution, or None if it failed.
        scores: faithfulness (and anatomy) scores by metric name.
        note: why the heatmap or scores are missing (empty when all went well).
        detail: how the map was computed, where that varies per image (LIME's precision).
        extras: the explainer's JSON-safe extras (target, statistics) for file outputs.
    """

    method: str
    heatmap: np.ndarray | None
    scores: dict[str, float] = field(default_factory=dict)
    note: str = ""
    detail: str = ""
    extras: dict = field(default_factory=dict)


@dataclass(eq=False)
class Case:
    """One input on its way through the pipeline.

    Attributes:
        name: display name, safe to show (``DICOM <hash>`` for DICOM unless identifiers were asked for).
        sha256: SHA-256 of the input's bytes.
        is_dicom: whether the input was DICOM.
        image: the image as read (DICOM windowed), or None when unreadable or released.
        label / index / probs: decided class (None when withheld or on error), the model's decided
            index, calibrated probabilities by class.
        logits: raw logits ``(C,)``.
        true_label: the class named by the parent folder, when it names one.
        ood: the domain check (out-of-domain reference, heuristics and DICOM modality).
        explanations: one :class:`MethodResult` per requested method (the explain half fills them).
        identifiers: DICOM identifying tags; filled only when identifiers were asked for.
        error: one line when the input could not be read.
        path: where the file is (never written out for DICOM unless identifiers were asked for).
        window: DICOM window ``(center, width)`` the image was read with, None for the file's own.
        meta: non-identifying reader metadata.
        lung_mask: ``(H, W)`` bool lung mask, when a lung segmenter ran.
        withheld: the label was withheld by the domain policy.
    """

    name: str
    sha256: str = ""
    is_dicom: bool = False
    image: Image | None = None
    label: str | None = None
    index: int | None = None
    probs: dict[str, float] = field(default_factory=dict)
    logits: np.ndarray | None = None
    true_label: str | None = None
    ood: OODCheck | None = None
    explanations: list[MethodResult] = field(default_factory=list)
    identifiers: dict[str, str] = field(default_factory=dict)
    error: str = ""
    path: Path | None = None
    window: tuple[float, float] | None = None
    meta: dict = field(default_factory=dict)
    lung_mask: np.ndarray | None = None
    withheld: bool = False

    @property
    def domain(self) -> OODCheck | None:
        """The domain check (alias of ``ood``)."""
        return self.ood

    @property
    def confidence(self) -> float:
        """Probability of the decided class (NaN when there is none)."""
        return self.probs.get(self.label, math.nan) if self.label else math.nan

    def row(self, classes: Sequence[str], extra: Sequence[str] = ()) -> dict:
        """The predictions-CSV row: ``path,label,prob_<class>...,domain,domain_reason,error`` and the
        ``extra`` fields asked for (``true_label``, ``sha256``)."""
        r = {"path": self.name, "label": self.label or ""}
        for c in classes:
            r[f"prob_{c}"] = f"{self.probs[c]:.6f}" if c in self.probs and not self.error else ""
        if self.ood is None:
            r["domain"], r["domain_reason"] = "", ""
        else:
            r["domain"] = "out_of_domain" if self.ood.flagged else "uncertain" if self.ood.uncertain else "ok"
            r["domain_reason"] = "; ".join(self.ood.reasons)
        r["error"] = self.error
        for k in extra:
            r[k] = getattr(self, k) or ""
        return r


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value):
    """A text cell that a spreadsheet would run as a formula (first character ``= + - @``, tab or CR: a
    hand-crafted file name such as ``=HYPERLINK(...).png``) gets a leading apostrophe; numbers such as
    ``-1`` and every other value are kept as they are."""
    if not isinstance(value, str) or not value.startswith(_FORMULA_START):
        return value
    try:
        float(value)
        return value
    except ValueError:
        return "'" + value


def csv_fields(classes: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """Columns of the predictions CSV (every door writes these)."""
    return ["path", "label", *[f"prob_{c}" for c in classes], "domain", "domain_reason", "error", *extra]


def default_domain_policy(card: ModelCard | dict) -> str:
    """The card's ``domain_policy``, else ``"withhold"`` for radiology/pathology modalities, else ``"label"``."""
    card = as_card(card)
    policy = card.domain_policy
    if policy in DOMAIN_POLICIES:
        return policy
    modality = str(card.modality or "").strip().upper()
    return "withhold" if modality in GRAY_MODALITIES or modality == "HISTOPATHOLOGY" else "label"


def is_dicom_name(path: Path) -> bool:
    """Whether a file's name says DICOM (its name is then hidden unless identifiers are asked for)."""
    return path.suffix.lower() in DICOM_SUFFIXES


def _class_of(path: Path, classes: Sequence[str]) -> str | None:
    folded = {c.casefold(): c for c in classes}
    return folded.get(path.parent.name.casefold())


@dataclass
class _Source:
    """One input file and the name it is shown by (``problem``: why a folder entry cannot be read)."""

    path: Path
    shown: str
    problem: str = ""


class _Reading(torch.utils.data.Dataset):
    """Reads (and, when the predictor allows it, preprocesses) one input file per item: the part of
    the pipeline that runs in DataLoader workers. Never raises: errors travel in the Case."""

    def __init__(self, pipeline: "CasePipeline", sources: Sequence[_Source], preprocess: bool):
        self.pipeline = pipeline
        self.sources = list(sources)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[Case, torch.Tensor | None]:
        case = self.pipeline._read(self.sources[i])
        x = None
        if self.preprocess and case.image is not None:
            x = self.pipeline._preprocess(case)
            if x is not None and not self.pipeline.keep_images:
                # only the small view the domain check reads stays in flight (memory per item: ~1 MB)
                case.image = Image(domain_view(case.image), case.image.meta)
        return case, x


def _collate(items):
    return items


#: images decoded and predicted together at most (a 448-px image is 2.4 MB as a float tensor: 256 of them 0.6 GB)
MAX_BATCH = 256


class CasePipeline:
    """Inputs → Cases with a loaded model folder: the predict half of the one pipeline.

    Args:
        predictor: a :class:`~pellucid.core.predict.Predictor` (model, card, preprocessing).
        reference: the model's out-of-domain reference; ``"auto"`` (default) loads the model folder's
            ``ood.safetensors`` when there is one; None runs the heuristics and modality check only.
        policy: domain policy (``"label"`` or ``"withhold"``); None takes the card's default.
        include_identifiers: show DICOM file names and read their identifying tags.
        window: DICOM ``(center, width)`` for every DICOM input; None keeps each file's own.
        batch_size: images per forward pass.
        workers: DataLoader worker processes that decode files (0: in this process; at most one per CPU core).
        keep_images: keep each Case's image after its domain check (off for large folders).
    """

    def __init__(self, predictor, *, reference="auto", policy: str | None = None, include_identifiers: bool = False,
                 window: tuple[float, float] | None = None, batch_size: int = 16, workers: int = 0,
                 keep_images: bool = True):
        from pellucid.core.ood import load_reference

        if policy is not None and policy not in DOMAIN_POLICIES:
            from pellucid.registry import unknown_name_error

            raise unknown_name_error("domain policy", policy, list(DOMAIN_POLICIES))
        self.predictor = predictor
        if isinstance(reference, str) and reference == "auto":
            folder = getattr(predictor, "folder", None)
            reference = load_reference(folder) if folder is not None else None
        self.reference = reference
        self.policy = policy or default_domain_policy(predictor.card)
        self.include_identifiers = include_identifiers
        self.window = window
        # a batch is decoded and held whole: `--batch-size 100000` on a large folder would hold every image at once
        self.batch_size = min(max(1, int(batch_size)), MAX_BATCH)
        # one decoding process per core at most: `--workers 1000` had asked for a thousand processes, each with torch
        self.workers = min(max(0, int(workers)), os.cpu_count() or 1)
        self.keep_images = keep_images

    @property
    def classes(self) -> list[str]:
        return list(self.predictor.classes)

    # -- reading ---------------------------------------------------------------------------------
    def _sources(self, paths: Iterable[str | Path]) -> list[_Source]:
        from pellucid.datasets.samples import find_images

        roots = [Path(p) for p in paths]
        problems: list[tuple[Path, str]] = []
        files = find_images(roots, problems)
        dirs = [r for r in roots if r.is_dir()]

        def shown(f: Path) -> str:  # inside a folder given: relative to it (no server paths in outputs)
            return safe_text(next((f.relative_to(d).as_posix() for d in dirs if f.is_relative_to(d)), str(f)))

        # unreadable sub-folders and link loops are rows too, so nothing is skipped silently
        return [_Source(Path(f), shown(Path(f))) for f in files] + \
            [_Source(Path(f), shown(Path(f)), problem=msg) for f, msg in problems]

    def _hidden(self, src: _Source) -> str:
        """The name of an input that is never hashed (a problem row): a DICOM-named one is not shown."""
        return "DICOM file" if is_dicom_name(src.path) and not self.include_identifiers else src.shown

    def _shown_name(self, src: _Source) -> str:
        """The name a Case of ``src`` will carry (hashing DICOM files, whose names are hidden)."""
        if src.problem:
            return self._hidden(src)
        try:
            check_file(src.path)  # a named pipe or device is never hashed: its row is an error row
        except ImageReadError:
            return self._hidden(src)
        try:
            if is_dicom(src.path) and not self.include_identifiers:
                return display_name(src.shown, sha256_file(src.path), True)
        except OSError:
            pass
        return src.shown

    def _read(self, src: _Source) -> Case:
        """One file → a Case holding its image, or its error (never raises for a bad file)."""
        try:
            return self._read_file(src)
        except (ImageReadError, OSError, ValueError, MemoryError) as err:  # past the readers' own guards
            # Every input is one row, whatever happens: the message names the file as shown and the
            # kind of failure only (an exception's text could quote header values).
            log.debug("unexpected failure reading an input", exc_info=True)
            shown = "DICOM file" if is_dicom_name(src.path) and not self.include_identifiers else src.shown
            return Case(name=shown, path=src.path,
                        error=f"{shown}: could not be read ({type(err).__name__}); check the file, or re-export it")

    def _read_file(self, src: _Source) -> Case:
        f = src.path
        shown = self._hidden(src)
        if src.problem:
            return Case(name=shown, error=f"{shown}: {src.problem}", path=f)
        try:  # before hashing or sniffing it: a named pipe would block here and a device never end
            check_file(f)
        except ImageReadError as err:
            return Case(name=shown, error=scrub_path(str(err), f, shown), path=f)
        try:
            sha = sha256_file(f)
        except OSError as err:
            return Case(name=shown, error=f"{shown}: cannot be opened ({err.strerror or err})", path=f)
        dcm = is_dicom(f)
        name = display_name(src.shown, sha, dcm, self.include_identifiers)
        case = Case(name=name, sha256=sha, is_dicom=dcm, path=f, window=self.window if dcm else None,
                    true_label=_class_of(f, self.classes))
        try:
            case.image = read_quietly(f, case.window)
            case.meta = safe_meta(case.image.meta)
            if dcm and self.include_identifiers:
                from pellucid.datasets.readers import dicom_identifying_tags

                case.identifiers = dicom_identifying_tags(f)
        except ImageReadError as err:
            case.image = None
            case.error = scrub_path(str(err), f, name)
        return case

    def _preprocess(self, case: Case) -> torch.Tensor | None:
        try:
            return self.predictor.preprocess(case.image)
        except (ValueError, ImageReadError) as err:  # e.g. an image too small for a lung crop
            case.error = scrub_path(f"{case.name}: cannot be prepared for this model ({err})", case.path, case.name)
            case.image = None
            return None
        except (RuntimeError, MemoryError) as err:  # a failure inside the model's preprocessing: one row
            log.debug("preprocessing failed", exc_info=True)
            case.error = f"{case.name}: cannot be prepared for this model ({type(err).__name__})"
            case.image = None
            return None

    # -- predicting ------------------------------------------------------------------------------
    def _decide(self, cases: Sequence[Case], tensors: Sequence[torch.Tensor | None]) -> None:
        """Fill label / index / probs / logits / ood of cases with an image (in place, one batch)."""
        todo = [(c, x) for c, x in zip(cases, tensors) if c.image is not None and not c.error]
        todo = [(c, x if x is not None else self._preprocess(c)) for c, x in todo]
        todo = [(c, x) for c, x in todo if x is not None]
        if not todo:
            return
        pred = self.predictor
        batch = torch.stack([x for _, x in todo]).to(pred.device)
        if batch.dim() == 4:  # channels-last: oneDNN's fast convolution layout, same numbers
            batch = batch.contiguous(memory_format=torch.channels_last)
        logits, feats = forward_with_features(pred.model, batch)
        probs = apply_temperature(torch.from_numpy(logits), pred.temperature)
        idx = pred.decide(probs)
        modality = as_card(pred.card).modality
        dists = self.reference.distance(feats) if self.reference is not None and feats is not None else None
        for j, (c, _) in enumerate(todo):
            if not np.isfinite(probs[j]).all():  # NaN weights or a damaged card: argmax would name a class anyway
                c.error = (f"{c.name}: the model gave no finite probabilities for it (NaN or infinite) — the model "
                           "folder's weights or card are damaged; restore or retrain it")
                continue
            c.logits = logits[j]
            c.index = int(idx[j])
            c.probs = {k: float(v) for k, v in zip(pred.classes, probs[j])}
            c.ood = check_domain(c.image, logits[j], probs[j], modality=modality,
                                 features=None if feats is None else feats[j], reference=self.reference,
                                 distance=None if dists is None else dists[j])
            c.withheld = bool(c.ood.flagged and self.policy == "withhold")
            c.label = None if c.withheld else pred.classes[c.index]

    def _finish(self, cases: list[Case]) -> list[Case]:
        if not self.keep_images:
            for c in cases:
                c.image = None
        for c in cases:  # a name or message may quote a file name of any bytes: every output can carry it
            c.name = safe_text(c.name)
            if c.error:
                c.error = safe_text(c.error)
                log.warning("%s", c.error)
        return cases

    def from_paths(self, paths: Iterable[str | Path], *, skip: Callable[[str], bool] | None = None,
                   progress: Progress | None = None) -> Iterator[Case]:
        """Cases of files and folders (searched recursively), streamed in input order.

        Args:
            paths: files and folders.
            skip: ``skip(shown_name)`` true for inputs already done (a resumed run); they are not
                decoded (DICOM inputs are hashed to find the name they are shown by).
            progress: ``progress(fraction, text)`` after each batch.

        Raises:
            PipelineError: no image files found.
        """
        roots = [Path(p) for p in paths]
        sources = self._sources(roots)
        if not sources:
            raise PipelineError(f"no image or DICOM files in {', '.join(map(str, roots))}: give image files or a "
                                "folder of them (.png, .jpg, .tif, .bmp, .dcm, or DICOM files without a suffix)")
        total = len(sources)
        if skip is not None:
            sources = [s for s in sources if not skip(self._shown_name(s))]
        # preprocessing happens where the file is read (in a worker, when there are workers), so only
        # model-sized tensors and small domain views are held per batch; a lung-masking model segments
        # in this process instead
        reading = _Reading(self, sources, getattr(self.predictor, "masker", None) is None)
        if self.workers > 0 and len(sources) > self.batch_size:
            loader = torch.utils.data.DataLoader(reading, batch_size=self.batch_size, num_workers=self.workers,
                                                 collate_fn=_collate, prefetch_factor=2, persistent_workers=False)
        else:
            loader = (([reading[i] for i in range(s, min(s + self.batch_size, len(reading)))])
                      for s in range(0, len(reading), self.batch_size))
        done = total - len(sources)
        for items in loader:
            cases = [c for c, _ in items]
            self._decide(cases, [x for _, x in items])
            done += len(cases)
            yield from self._finish(cases)
            if progress:
                progress(done / total, f"predicted {done} of {total}")

    def from_images(self, images: Sequence[Image | np.ndarray], names: Sequence[str] | None = None,
                    sha256s: Sequence[str] | None = None, dicom: Sequence[bool] | None = None) -> list[Case]:
        """Cases of images already in memory (uploads, arrays), in batches.

        Args:
            images: images as read (``Image``, or float ``(H, W[, C])`` arrays in [0, 1]).
            names: display names (already privacy-safe); default ``image0``, ``image1`` ...
            sha256s: SHA-256 of each input's bytes, when known.
            dicom: which inputs were DICOM.
        """
        n = len(images)
        names = list(names) if names is not None else [f"image{i}" for i in range(n)]
        sha256s = list(sha256s) if sha256s is not None else [""] * n
        dicom = list(dicom) if dicom is not None else [False] * n
        cases = []
        for im, name, sha, dcm in zip(images, names, sha256s, dicom):
            img = im if isinstance(im, Image) else Image(np.asarray(im, dtype=np.float32), {})
            cases.append(Case(name=name, sha256=sha, is_dicom=dcm, image=img, meta=safe_meta(img.meta)))
        for s in range(0, n, self.batch_size):
            chunk = cases[s:s + self.batch_size]
            self._decide(chunk, [None] * len(chunk))
        return self._finish(cases)


def _drop_partial_line(path: Path) -> None:
    """Cut a file back to its last newline (a run killed mid-row leaves a partial last line)."""
    with path.open("rb+") as fh:
        fh.seek(0, 2)
        size = fh.tell()
        step = min(size, 1 << 16)
        fh.seek(size - step)
        tail = fh.read(step)
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n")
        fh.truncate(size - step + cut + 1 if cut >= 0 else 0)


class CaseWriter:
    """Predictions CSV written row by row as Cases arrive, resumable.

    ``path,label,prob_<class>...,domain,domain_reason,error``; a cell a spreadsheet would run as a
    formula starts with an apostrophe (:func:`spreadsheet_safe`). With ``resume=True`` an existing file
    with the same header is appended to, and :meth:`done` says which inputs it already holds (so a
    rerun skips them); otherwise the file is started afresh.
    """

    def __init__(self, path: str | Path | None, classes: Sequence[str], *, resume: bool = False, stream=None,
                 extra: Sequence[str] = ()):
        self.fields = csv_fields(classes, extra)
        self.extra = tuple(extra)
        self.classes = list(classes)
        self._done: set[str] = set()
        self.rows = 0
        self.errors = 0
        self.flagged = 0
        if path is None:  # an open text stream (stdout): no resume
            self.path, self._fh, self._own = None, stream, False
            self._w = csv.DictWriter(self._fh, fieldnames=self.fields)
            self._w.writeheader()
            return
        self.path, self._own = Path(path), True
        append = False
        if resume and self.path.is_file():
            _drop_partial_line(self.path)
        if resume and self.path.is_file() and self.path.stat().st_size > 0:
            with self.path.open(newline="", encoding="utf-8", errors="backslashreplace") as fh:
                reader = csv.DictReader(fh)
                if reader.fieldnames == self.fields:
                    self._done = {r["path"] for r in reader if r.get("path")}
                    append = True
                else:
                    raise PipelineError(f"{self.path}: its columns are not this model's predictions columns; "
                                        "give another --out or delete the file")
        self._fh = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a" if append else "w", newline="", encoding="utf-8")
            self._w = csv.DictWriter(self._fh, fieldnames=self.fields)
            if not append:
                self._w.writeheader()
                self._fh.flush()
        except OSError as err:
            self._abandon()
            raise self._write_error(err) from None

    def _write_error(self, err: OSError) -> PipelineError:
        """A full disk or a vanished folder while writing: one line, and what the user keeps."""
        return PipelineError(f"{self.path}: cannot be written ({err.strerror or type(err).__name__}); free some space "
                             "or give another --out (the rows already written are kept, and a rerun with the same "
                             "--out continues after them)")

    def _abandon(self) -> None:
        """Close the file after a failed write without writing more (its buffer may not fit either)."""
        fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fh.close()
            except OSError:
                pass

    def done(self, name: str) -> bool:
        """Whether ``name`` already has a row (from an earlier run)."""
        return spreadsheet_safe(name) in self._done

    @property
    def resumed(self) -> int:
        return len(self._done)

    def write(self, case: Case) -> None:
        try:
            self._w.writerow({k: spreadsheet_safe(v) for k, v in case.row(self.classes, self.extra).items()})
            self._fh.flush()  # whole rows reach the file one by one: a killed run leaves no half row behind
        except OSError as err:
            if not self._own:
                raise  # a stream the caller owns (stdout): the caller decides
            self._abandon()
            raise self._write_error(err) from None
        self.rows += 1
        self.errors += bool(case.error)
        self.flagged += bool(case.ood is not None and case.ood.flagged)

    def close(self) -> None:
        if self._fh is None:  # abandoned after a failed write
            return
        if self._own:
            try:
                self._fh.close()
            except OSError as err:
                self._fh = None
                raise self._write_error(err) from None
        else:
            self._fh.flush()

    def __enter__(self) -> "CaseWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
