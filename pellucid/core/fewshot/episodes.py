"""Episode sampling: :class:`Episode` and :class:`EpisodeSampler`, N-way K-shot Q-query episodes
that never put one ``group`` in both the support and the query set and are checked for feasibility
before the first episode is drawn, plus :func:`split_single_group_classes` for classes whose images
all share one group (frames of one recording)."""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pellucid.core.fewshot.config import FewShotError

__all__ = [
    "Episode",
    "EpisodeSampler",
    "split_single_group_classes",
]


@dataclass(frozen=True)
class Episode:
    """One N-way K-shot Q-query task.

    Attributes:
        support: dataset indices of the support images, shape (n_way * n_shot,), class-major.
        support_labels: episode class index (0..n_way-1) of each support image.
        query: dataset indices of the query images, shape (n_way * n_query,), class-major.
        query_labels: episode class index of each query image.
        classes: the dataset labels of episode classes 0..n_way-1.
    """

    support: np.ndarray
    support_labels: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray
    classes: tuple


def _subset_sums(sizes: Sequence[int]) -> dict[int, tuple[int, int]]:
    """Reachable subset sums of ``sizes`` → (last item index, previous sum) for reconstruction."""
    reach: dict[int, tuple[int, int]] = {0: (-1, -1)}
    for j, s in enumerate(sizes):
        for total in sorted(reach, reverse=True):
            if total + s not in reach:
                reach[total + s] = (j, total)
    return reach


def _support_sums(sizes: Sequence[int], n_shot: int, n_query: int) -> tuple[list[int] | None, int]:
    """A set of group positions whose images can hold ``n_shot`` support images while the other
    groups hold ``n_query`` query images (None if impossible), and the largest query count any
    valid support choice leaves."""
    reach = _subset_sums(sizes)
    total = sum(sizes)
    ok = sorted(s for s in reach if s >= n_shot)
    best_query = total - ok[0] if ok else -1
    fits = [s for s in ok if total - s >= n_query]
    if not fits:
        return None, best_query
    chosen, s = [], fits[0]
    while s > 0:
        j, prev = reach[s]
        chosen.append(j)
        s = prev
    return chosen, best_query


class EpisodeSampler:
    """N-way K-shot Q-query episodes in which support and query never share a ``group``.

    For each episode the sampler draws ``n_way`` classes; for each class it shuffles the class's
    groups, takes groups for the support set until they hold ``n_shot`` images, draws the support
    images from them and the query images from the remaining groups. Episode ``i`` depends only on
    ``(seed, i)``, so runs are reproducible and episodes can be drawn in any order.

    Args:
        labels: class label of every image (any hashable), length N.
        groups: group of every image (images of one group — patient, recording, near-duplicates —
            never sit in both support and query); None makes every image its own group.
        n_way: classes per episode; None uses every class.
        n_shot: support images per class.
        n_query: query images per class.
        n_episodes: episodes per iteration.
        seed: random seed.
        classes: restrict episodes to these labels (default: every label, sorted).

    Raises:
        FewShotError: before any episode is drawn, when a class cannot provide ``n_shot`` support and
            ``n_query`` query images from disjoint groups; the message names the class and counts.
    """

    def __init__(self, labels: Sequence, groups: Sequence | None = None, n_way: int | None = None, n_shot: int = 5,
                 n_query: int = 10, n_episodes: int = 500, seed: int = 0, classes: Sequence | None = None):
        self.labels = np.asarray(list(labels))
        self.groups = np.arange(len(self.labels)) if groups is None else np.asarray(list(groups))
        if len(self.groups) != len(self.labels):
            raise FewShotError(f"{len(self.labels)} labels but {len(self.groups)} groups; give one group per image")
        present = sorted(set(self.labels.tolist()))
        if classes is None:
            self.classes = present
        else:
            self.classes = list(classes)
            missing = [c for c in self.classes if c not in present]
            if missing:
                raise FewShotError(f"class(es) {missing} have no images; present: {present}")
        for name, v in (("n_shot", n_shot), ("n_query", n_query), ("n_episodes", n_episodes)):
            if int(v) < 1:
                raise FewShotError(f"{name} must be at least 1, got {v}")
        self.n_way = len(self.classes) if n_way is None else int(n_way)
        if not 2 <= self.n_way <= len(self.classes):
            raise FewShotError(f"{self.n_way}-way episodes need between 2 and {len(self.classes)} classes; the data "
                               f"has {len(self.classes)}: {', '.join(map(str, self.classes))}")
        self.n_shot, self.n_query, self.n_episodes, self.seed = int(n_shot), int(n_query), int(n_episodes), int(seed)
        self._groups: dict = {}
        self._fallback: dict = {}
        problems = []
        for c in self.classes:
            idx = np.flatnonzero(self.labels == c)
            by_group: dict = {}
            for i in idx:
                by_group.setdefault(self.groups[i], []).append(int(i))
            members = [np.array(v) for _, v in sorted(by_group.items(), key=lambda kv: str(kv[0]))]
            self._groups[c] = members
            chosen, best_query = _support_sums([len(m) for m in members], self.n_shot, self.n_query)
            if chosen is None:
                problems.append(self._infeasible(c, members, best_query))
            self._fallback[c] = chosen
        if problems:
            raise FewShotError("; ".join(problems))

    def _infeasible(self, c, members: list[np.ndarray], best_query: int) -> str:
        n, g = sum(len(m) for m in members), len(members)
        need = f"{self.n_shot}-shot + {self.n_query}-query"
        head = f"class {c!r} has {n} image{'s' * (n != 1)} in {g} group{'s' * (g != 1)}"
        if n < self.n_shot + self.n_query:
            return f"{head}; {need} needs {self.n_shot + self.n_query} images (lower the shots or queries)"
        if g == 1:
            return (f"{head}; {need} needs support and query from different groups, so at least 2 groups "
                    "(split the group, e.g. a recording into time blocks, or drop the class)")
        return (f"{head} (largest {max(len(m) for m in members)}); {need} needs support and query from disjoint "
                f"groups, and the best split leaves {max(best_query, 0)} query images for {self.n_shot} support")

    def __len__(self) -> int:
        return self.n_episodes

    def __iter__(self) -> Iterator[Episode]:
        for i in range(self.n_episodes):
            yield self.episode(i)

    def _split_class(self, c, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        members = self._groups[c]
        for _ in range(20):
            order = rng.permutation(len(members))
            taken, k = [], 0
            for j in order:
                taken.append(j)
                k += len(members[j])
                if k >= self.n_shot:
                    break
            rest = [members[j] for j in order[len(taken):]]
            if rest and sum(len(m) for m in rest) >= self.n_query:
                break
        else:  # rare: group sizes leave few valid splits; use the one found by the feasibility check
            taken = list(self._fallback[c])
            rest = [m for j, m in enumerate(members) if j not in set(taken)]
        pool_s = np.concatenate([members[j] for j in taken])
        pool_q = np.concatenate(rest)
        return (rng.choice(pool_s, self.n_shot, replace=False), rng.choice(pool_q, self.n_query, replace=False))

    def episode(self, i: int) -> Episode:
        """Episode number ``i`` (deterministic in ``(seed, i)``)."""
        rng = np.random.default_rng([self.seed, int(i)])
        picked = sorted(rng.choice(len(self.classes), self.n_way, replace=False).tolist())
        classes = tuple(self.classes[k] for k in picked)
        sup, que = [], []
        for c in classes:
            s, q = self._split_class(c, rng)
            sup.append(s)
            que.append(q)
        return Episode(support=np.concatenate(sup), support_labels=np.repeat(np.arange(self.n_way), self.n_shot),
                       query=np.concatenate(que), query_labels=np.repeat(np.arange(self.n_way), self.n_query),
                       classes=classes)

    @staticmethod
    def max_query(labels: Sequence, groups: Sequence | None, n_shot: int, classes: Sequence | None = None) -> int:
        """The largest query count per class that every class allows with ``n_shot`` support images
        (0 when some class cannot even provide the support)."""
        labels = np.asarray(list(labels))
        groups = np.arange(len(labels)) if groups is None else np.asarray(list(groups))
        best = None
        for c in (sorted(set(labels.tolist())) if classes is None else classes):
            sizes: dict = {}
            for g in groups[labels == c]:
                sizes[g] = sizes.get(g, 0) + 1
            _, q = _support_sums(list(sizes.values()), n_shot, 1)
            best = q if best is None else min(best, q)
        return max(int(best or 0), 0)


def split_single_group_classes(samples: Sequence, n_blocks: int = 10) -> list:
    """Split every class whose images all share one group into ``n_blocks`` contiguous blocks.

    Meant for classes that are frames of one recording (e.g. sonar ``fish`` and ``mine``): files
    are ordered by their name with numbers compared numerically (frame order) and cut into blocks
    named ``<group>#<k>``, so episodes can put support and query in different stretches of the
    recording. This is weaker than true group separation (neighbouring frames at block edges look
    alike); say so wherever the numbers are reported. Emits a warning naming the classes.

    Args:
        samples: :class:`~pellucid.datasets.samples.Sample` records.
        n_blocks: blocks per single-group class.

    Returns:
        New samples (same order) with the split groups.
    """
    from pellucid.datasets.samples import Sample

    def natural(path: str):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", Path(path).name)]

    by_class: dict[str, set] = {}
    for s in samples:
        by_class.setdefault(s.label, set()).add(s.group)
    single = sorted(c for c, g in by_class.items() if len(g) == 1)
    if not single:
        return list(samples)
    warnings.warn(f"class(es) {single} are one group each; split into {n_blocks} blocks in file-name order "
                  "(weaker than group separation)", stacklevel=2)
    new_group: dict[str, str] = {}
    for c in single:
        items = sorted((s for s in samples if s.label == c), key=lambda s: natural(s.path))
        for k, s in enumerate(items):
            new_group[s.path] = f"{s.group}#{k * n_blocks // len(items)}"
    return [Sample(s.path, s.label, new_group.get(s.path, s.group)) for s in samples]
