"""Recipe search: same folds for every candidate, budgets honoured, paired differences, the table."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pellucid.core.tune import Candidate, _official_split, default_candidates, render_table, tune


def _synthetic(root, n_groups=30, per_group=2, official=True):
    """Two separable classes (a bright disc = 'tuberculosis'), grouped; names keep an official split."""
    rng = np.random.default_rng(0)
    rows = ["path,label,group"]
    for g in range(n_groups):
        label = "tuberculosis" if g % 2 else "normal"
        part = "val" if (official and g >= n_groups - 4) else "train"
        (root / label).mkdir(parents=True, exist_ok=True)
        for j in range(per_group):
            img = rng.normal(90, 25, (48, 48)).clip(0, 255)
            if label == "tuberculosis":
                yy, xx = np.mgrid[:48, :48]
                img[(yy - 24) ** 2 + (xx - 20 - j) ** 2 < 120] = 230
            name = f"{label}/{part}_{g}_{j}.png"
            Image.fromarray(img.astype(np.uint8)).save(root / name)
            rows.append(f"{name},{label},g{g}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def _probe_and_tiny_training(tmp_path, finetune: str, folds: int, **kw) -> dict:
    """Baseline A (a Lite0 probe) and a one-epoch training candidate of ``finetune`` on synthetic data."""
    data = _synthetic(tmp_path / "data", n_groups=20, official=False)
    cands = [Candidate("probe:a", "probe", (("efficientnet_lite0", 64),), role="A"),
             Candidate(finetune, "train", overrides={"backbone": "test_resnet", "pretrained": False,
                                                     "finetune": finetune, "epochs": 1, "batch_size": 8,
                                                     "image_size": 32}, role="B")]
    return tune("tb", str(data), folds=folds, budget_min=30.0, out=tmp_path / "out", work=tmp_path / "work",
                candidate_list=cands, progress=False, **kw)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PELLUCID_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_probe_candidates_share_folds_and_budget_stops_training(tmp_path, cache):
    data = _synthetic(tmp_path / "data")
    (data / "normal" / "train_broken.png").write_bytes(b"not a PNG")  # counted, in no fold, and the table says so
    with (data / "manifest.csv").open("a") as fh:
        fh.write("normal/train_broken.png,normal,gbroken\n")
    lite = "efficientnet_lite0"
    cands = [Candidate("probe:a", "probe", ((lite, 64),), role="A"),
             Candidate("probe:a+flip", "probe", ((lite, 64),), flip=True),
             Candidate("probe:vote", "probe", ((lite, 64), (lite, 72))),
             Candidate("finetune:b", "train", overrides={"backbone": lite, "finetune": "full", "epochs": 1},
                       role="B")]
    res = tune("tb", str(data), folds=3, budget_min=0.0, out=tmp_path / "out", work=tmp_path / "work",
               candidate_list=cands, progress=False, write_recipe=True)
    rows = {r["name"]: r for r in res["candidates"]}
    # every probe ran on every fold; the training candidate was stopped by the zero budget, and says so
    assert all(rows[n]["n_folds"] == 3 for n in ("probe:a", "probe:a+flip", "probe:vote"))
    assert rows["finetune:b"]["n_folds"] == 0 and "budget" in rows["finetune:b"]["stopped"]
    # the folds are the same partitions for everyone, written once, groups never on two sides
    folds = sorted((tmp_path / "work" / "folds").glob("fold_*.json"))
    assert len(folds) == 3
    # separable data: the probes are near perfect; paired difference vs A is computed on common folds
    assert rows["probe:a"]["summary"]["accuracy"]["mean"] > 0.8
    assert rows["probe:vote"]["vs_A"]["n"] == 3 and rows["probe:a"]["vs_B"]["n"] == 0
    assert res["winner"] in ("probe:a", "probe:a+flip", "probe:vote")
    # file names keep an official split: the probes were also scored train_* -> val_*
    assert res["official_split"] and rows["probe:a"]["official"]["metrics"]["accuracy"] is not None
    table = (tmp_path / "out" / "recipes-tb.md").read_text()
    assert "| `probe:a` [A]" in table and "0/3 (budget)" in table and "official split" in table
    assert res["unreadable"] == 1 and f"1 of the {res['n']} files could not be read" in table
    assert res["cpu"] and "CPU:" in table
    recipe = (tmp_path / "out" / "recipes-tb.toml").read_text()
    assert "[recipe]" in recipe and 'finetune = "linear-probe"' in recipe
    # the summaries and winner can be recomputed from the JSON alone
    from pellucid.core.tune import rescore

    (tmp_path / "out" / "recipes-tb.md").unlink()
    again = rescore(tmp_path / "out" / "recipes-tb.json")
    assert again["winner"] == res["winner"] and (tmp_path / "out" / "recipes-tb.md").exists()
    # a second search reads the cached features instead of embedding again
    res2 = tune("tb", str(data), folds=3, budget_min=0.0, out=tmp_path / "out2", work=tmp_path / "work",
                candidate_list=cands[:1] + cands[3:], progress=False)
    assert res2["embed_seconds"] == 0.0
    assert res2["candidates"][0]["summary"] == rows["probe:a"]["summary"]


def test_training_candidate_runs_the_real_training_path(tmp_path, cache):
    res = _probe_and_tiny_training(tmp_path, "lp-ft", folds=2)
    row = res["candidates"][1]
    assert row["n_folds"] == 2 and row["stopped"] is None
    assert set(row["folds"]["0"]["metrics"]) >= {"accuracy", "auroc"}
    assert (tmp_path / "work" / "lp-ft" / "fold_1" / "card.json").exists()
    assert res["candidates"][0]["vs_B"]["n"] == 2 and not res["official_split"]


def test_high_resolution_candidates_for_large_sources_only():
    from pellucid.core.tasks import get_task
    from pellucid.core.tune_candidates import HIGH_RES, LITE_SIZES, MID_RES_SCALE, XHIGH_RES, XXHIGH_RES

    tb = get_task("tb")
    by = {c.name: c for c in default_candidates(tb)}
    hi = by[f"finetune:lite0@{HIGH_RES}"]
    plain = by["finetune:lite0"]
    # B with only the input size changed; it trains (and predicts) at the larger size
    assert hi.recipe(tb)["image_size"] == HIGH_RES > plain.recipe(tb)["image_size"]
    assert {k: v for k, v in hi.recipe(tb).items() if k != "image_size"} == \
        {k: v for k, v in plain.recipe(tb).items() if k != "image_size"}
    vote = by[f"probe:lite0@{HIGH_RES}+lite1@{HIGH_RES}+lite2@{HIGH_RES}"]
    assert [m["image_size"] for m in vote.recipe(tb)["members"]] == [HIGH_RES] * 3
    # both votes pair with every fine-tune; each member keeps its own input size
    hybrid = by[f"{vote.name}+3xfinetune:lite0@{HIGH_RES}"]
    members = hybrid.recipe(tb, by)["members"]
    assert [m["image_size"] for m in members] == [HIGH_RES] * 4 and members[-1]["weight"] == 3.0
    mixed = by[f"{vote.name}+finetune:lite0+long+ema"].recipe(tb, by)["members"]
    assert [m["image_size"] for m in mixed] == [HIGH_RES] * 3 + [tb.image_size]
    assert mixed[-1]["ema"] == by["finetune:lite0+long+ema"].recipe(tb)["ema"]
    assert f"probe:lite0@224+lite1@240+lite2@260+finetune:lite0@{HIGH_RES}" in by
    # the vote at XHIGH_RES px pairs with the fine-tunes too; no fine-tune trains at that size
    xvote = by[f"probe:lite0@{XHIGH_RES}+lite1@{XHIGH_RES}+lite2@{XHIGH_RES}"]
    xmixed = by[f"{xvote.name}+3xfinetune:lite0+long+ema"].recipe(tb, by)["members"]
    assert [m["image_size"] for m in xmixed] == [XHIGH_RES] * 3 + [tb.image_size] and xmixed[-1]["weight"] == 3.0
    assert not any(c.kind == "train" and f"@{XHIGH_RES}" in c.name for c in by.values())
    # the vote at XXHIGH_RES px, alone and with the XHIGH_RES vote (six members, each at its own size): probes only
    xxvote = by[f"probe:lite0@{XXHIGH_RES}+lite1@{XXHIGH_RES}+lite2@{XXHIGH_RES}"]
    assert [m["image_size"] for m in xxvote.recipe(tb)["members"]] == [XXHIGH_RES] * 3
    six = by[f"{xvote.name}+lite0@{XXHIGH_RES}+lite1@{XXHIGH_RES}+lite2@{XXHIGH_RES}"]
    nets = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
    assert [(m["backbone"], m["image_size"]) for m in six.recipe(tb)["members"]] == \
        [(b, s) for s in (XHIGH_RES, XXHIGH_RES) for b in nets]
    assert not any(f"@{XXHIGH_RES}" in c.name for c in by.values() if c.kind != "probe")
    # tiny sources (nuclei's 32-px patches, PneumoniaMNIST's 28 px) get none
    for name in ("nuclei", "bpd"):
        names = [c.name for c in default_candidates(get_task(name))]
        assert not any(f"@{HIGH_RES}" in n or f"@{XHIGH_RES}" in n or f"@{XXHIGH_RES}" in n for n in names)
    # sonar's 160-px input (from 256-512-px images) gets the vote at XHIGH_RES px, with its fine-tunes, but not
    # the HIGH_RES candidates: its own vote already doubles 160 px to 320
    sonar = get_task("sonar")
    names = [c.name for c in default_candidates(sonar)]
    xname = f"probe:lite0@{XHIGH_RES}+lite1@{XHIGH_RES}+lite2@{XHIGH_RES}"
    assert xname in names and f"{xname}+3xfinetune:lite0+sampler+long+ema" in names
    assert not any(f"finetune:lite0@{HIGH_RES}" in n or f"@{XXHIGH_RES}" in n for n in names)
    # ... and fine-tunes at MID_RES_SCALE x its 160 px (its planes and ships are cut from 200-512-px images), with
    # class-balanced batches and the longer, averaged variants; no other app gets them
    by_sonar = {c.name: c for c in default_candidates(sonar)}
    mid = int(MID_RES_SCALE * sonar.image_size)
    assert mid == 240
    for n in (f"finetune:lite0@{mid}", f"finetune:lite0@{mid}+sampler+long+ema"):
        assert by_sonar[n].recipe(sonar)["image_size"] == mid
    assert by_sonar[f"finetune:lite0@{mid}+sampler+long+ema"].recipe(sonar)["balance"] == "sampler"
    assert f"probe:lite0@320+lite1@320+lite2@320+3xfinetune:lite0@{mid}+sampler+long+ema" in by_sonar
    for other in ("tb", "waste", "bpd", "nuclei", "mpox", "snow"):
        task = get_task(other)
        assert not any(c.kind == "train" and c.recipe(task).get("image_size") not in (None, task.image_size, HIGH_RES,
                                                                                      *LITE_SIZES.values())
                       for c in default_candidates(task) if "+at" not in c.name), other


def test_test_size_candidates_for_cropping_augmentations_of_large_sources_only():
    from pellucid.core.tasks import get_task
    from pellucid.core.tune_candidates import test_sizes

    assert test_sizes(224) == [256, 288] and test_sizes(260) == [288, 352]
    waste = get_task("waste")  # 288 x 384-px photographs, random resized crops ("natural")
    by = {c.name: c for c in default_candidates(waste)}
    parent = by["finetune:lite0+long+ema"].recipe(waste)
    twin = by["finetune:lite0+long+ema+at288"].recipe(waste)
    # the same training; only the input the finished model predicts at differs
    assert twin["test_size"] == 288 and twin["image_size"] == parent["image_size"] == 224
    assert {k: v for k, v in twin.items() if k != "test_size"} == parent
    assert by["finetune:lite2+long+ema+at352"].recipe(waste)["image_size"] == 260
    hybrid = by["probe:lite0@448+lite1@448+lite2@448+finetune:lite0+long+ema+at288"].recipe(waste, by)["members"]
    assert hybrid[-1]["test_size"] == 288 and hybrid[-1]["image_size"] == 224
    # never beside its own parent (the same weights) in a vote of two fine-tunes
    assert not any(c.kind == "hybrid" and len(c.parts) == 3 and any("+at" in p for p in c.parts) for c in by.values())
    # chest X-rays train without crops ("cxr"), sonar too, and tiny sources not at all: none for them
    for name in ("tb", "sonar", "bpd", "nuclei"):
        assert not any("+at" in c.name for c in default_candidates(get_task(name)))


def test_cutmix_candidates_mix_the_averaged_fine_tunes_of_photographs_only():
    from pellucid.core.tasks import get_task

    waste = get_task("waste")
    by = {c.name: c for c in default_candidates(waste)}
    parent = by["finetune:lite0+long+ema"].recipe(waste)
    mixed = by["finetune:lite0+long+ema+cutmix"].recipe(waste)
    # the same training but for the mixing of each batch
    assert parent["mixing"] == "none" and mixed["mixing"] == "cutmix"
    assert {**mixed, "mixing": "none"} == parent
    assert by["finetune:lite2+long+ema+cutmix"].recipe(waste)["backbone"] == "efficientnet_lite2"
    assert not any(n.endswith("+long+cutmix") or n.endswith("+snap+cutmix") for n in by)
    members = by["probe:lite0@448+lite1@448+lite2@448+taps+finetune:lite0+long+ema+cutmix"].recipe(waste, by)["members"]
    assert [m["mixing"] for m in members if m.get("finetune") != "linear-probe"] == ["cutmix"]
    # X-rays, sonar and the tiny sources train without crops or at a small input: none for them
    for name in ("tb", "sonar", "bpd", "nuclei"):
        assert not any("cutmix" in c.name for c in default_candidates(get_task(name)))


def test_mixup_candidates_blend_the_averaged_class_balanced_fine_tunes_of_sonar_only():
    from pellucid.core.tasks import get_task

    sonar = get_task("sonar")
    by = {c.name: c for c in default_candidates(sonar)}
    for parent_name in ("finetune:lite0+sampler+long+ema", "finetune:lite0@240+sampler+long+ema"):
        parent, mixed = by[parent_name].recipe(sonar), by[f"{parent_name}+mixup"].recipe(sonar)
        assert parent["mixing"] == "none" and mixed["mixing"] == "mixup"
        assert {**mixed, "mixing": "none"} == parent  # the same training but for the blending of each batch
        assert parent["balance"] == "sampler"
    assert sorted(n for n in by if n.startswith("finetune:") and n.endswith("+mixup")) == [
        "finetune:lite0+sampler+long+ema+mixup", "finetune:lite0@240+sampler+long+ema+mixup"]
    members = by["probe:lite0@320+lite1@320+lite2@320+3xfinetune:lite0+sampler+long+ema+mixup"].recipe(sonar, by)["members"]
    assert [m["mixing"] for m in members if m.get("finetune") != "linear-probe"] == ["mixup"]
    # two-class, cropped and tiny sources get none (waste and nuclei have macro-F1 too)
    for name in ("tb", "waste", "mpox", "nuclei", "bpd", "snow"):
        assert not any("mixup" in c.name for c in default_candidates(get_task(name)))


def test_taps_votes_read_the_last_four_stages_and_join_the_hybrids():
    from pellucid.core.tasks import get_task
    from pellucid.core.tune_candidates import PROBE_TAPS

    waste = get_task("waste")
    by = {c.name: c for c in default_candidates(waste)}
    for size in ("lite0@224+lite1@240+lite2@260", "lite0@320+lite1@320+lite2@320", "lite0@448+lite1@448+lite2@448"):
        cand = by[f"probe:{size}+taps"]
        assert cand.layers == PROBE_TAPS and cand.kind == "probe"
        members = cand.recipe(waste)["members"]
        assert [m["probe_layers"] for m in members] == [list(PROBE_TAPS)] * 3
        assert all("probe_layers" not in m for m in by[f"probe:{size}"].recipe(waste)["members"])
    hybrid = by["probe:lite0@448+lite1@448+lite2@448+taps+finetune:lite0+long+ema"].recipe(waste, by)["members"]
    assert [("probe_layers" in m, m["finetune"]) for m in hybrid] == [(True, "linear-probe")] * 3 + [(False, "full")]
    # the recipe the search writes is a valid task recipe (the taps only on the probes)
    from pellucid.core.tasks import task_from_dict

    task_from_dict({"name": "t", "classes": ["a", "b"], "recipe": {"finetune": "linear-probe", "epochs": 0,
                                                                   "members": hybrid}})
    # and the TOML the search writes for it (--write-recipe) keeps the layers as an array
    import tomllib

    from pellucid.core.tune_report import _recipe_toml

    written = tomllib.loads(_recipe_toml({"finetune": "linear-probe", "epochs": 0, "image_size": 448,
                                          "members": hybrid}, "x"))["recipe"]
    assert written["members"][0]["probe_layers"] == list(PROBE_TAPS)
    task_from_dict({"name": "t", "classes": ["a", "b"], "recipe": written})
    # 28-px and 32-px sources get only the vote at their doubled size with taps
    bpd = [c.name for c in default_candidates(get_task("bpd")) if c.kind == "probe" and c.layers]
    assert bpd == ["probe:lite0@128+lite1@128+lite2@128+taps"]


def test_probe_with_layers_fits_on_the_wider_features(tmp_path, cache):
    """A probe candidate with ``layers`` embeds the pooled inner layers beside the embedding (its own
    cache entry) and scores on the same folds as the plain probe."""
    import torch

    from pellucid.core.features import embed_samples
    from pellucid.datasets.samples import load_samples

    data = _synthetic(tmp_path / "data", n_groups=12, official=False)
    lite = "efficientnet_lite0"
    cands = [Candidate("probe:a", "probe", ((lite, 64),), role="A"),
             Candidate("probe:a+taps", "probe", ((lite, 64),), layers=("blocks.4", "blocks.5")),
             Candidate("finetune:b", "train", overrides={"backbone": lite, "finetune": "full", "epochs": 1}, role="B")]
    res = tune("tb", str(data), folds=3, budget_min=0.0, out=tmp_path / "out", work=tmp_path / "work",
               candidate_list=cands, progress=False)
    rows = {r["name"]: r for r in res["candidates"]}
    assert rows["probe:a+taps"]["n_folds"] == 3 and rows["probe:a+taps"]["summary"]["accuracy"]["mean"] > 0.8
    kept = sorted(p.name for p in (cache / "features").iterdir())
    assert len(kept) == 2 and sum("-taps-" in n for n in kept) == 1  # each kept apart in the cache
    samples = load_samples(str(data), classes=("normal", "tuberculosis"))
    plain = embed_samples(samples, lite, 64, cache=False)
    wide = embed_samples(samples, lite, 64, layers=("blocks.4", "blocks.5"), cache=False)
    assert wide.feats.shape[1] == plain.feats.shape[1] + 112 + 192
    assert torch.allclose(wide.feats[:, -plain.feats.shape[1]:], plain.feats, atol=1e-4)


def test_seed_twin_is_the_same_fine_tune_with_the_next_training_seed(tmp_path, monkeypatch):
    """A seed ensemble: the twin of an averaged longer fine-tune differs only by its training seed (the
    fold seed + 1 in the search, ``seed = 1`` in the member a recipe writes), and it pairs only with its
    original in the vote."""
    import json
    from pathlib import Path

    from pellucid.core import training
    from pellucid.core import tune as tune_mod
    from pellucid.core.tasks import get_task

    waste = get_task("waste")
    by = {c.name: c for c in default_candidates(waste)}
    one, twin = by["finetune:lite0+long+ema"], by["finetune:lite0+long+ema+seed"]
    assert twin.recipe(waste) == {**one.recipe(waste), "seed": 1}
    pairs = [c for c in by.values() if c.kind == "hybrid" and twin.name in c.parts]
    assert {c.parts[1:] for c in pairs} == {(one.name, twin.name)} and {c.train_weight for c in pairs} == {1.0, 2.0}
    members = pairs[0].recipe(waste, by)["members"]
    assert "seed" not in members[-2] and members[-1]["seed"] == 1
    assert all(c.name.endswith("+long+ema+seed") for c in by.values() if c.kind == "train" and "seed" in c.name)
    seen = []

    def fake_train(cfg):
        seen.append(cfg.seed)
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"metrics": {"accuracy": {"value": 0.5}}}))
        (out / "card.json").write_text("{}")
        return out

    monkeypatch.setattr(training, "train", fake_train)
    split = tmp_path / "split.json"
    split.write_text("{}")
    for cand in (one, twin):
        res = tune_mod._run_train(waste, cand, str(tmp_path), split, tmp_path / cand.name.replace(":", "_"), seed=1)
        assert res["metrics"] == {"accuracy": 0.5}
    assert seen == [1, 2]


def test_default_candidates_include_both_baselines_and_recipes_are_trainable():
    from pellucid.core.tasks import get_task

    for name in ("tb", "nuclei", "snow"):
        task = get_task(name)
        cands = default_candidates(task)
        roles = [c.role for c in cands]
        assert roles.count("A") == 1 and roles.count("B") == 1 and "current" in roles
        assert len({c.name for c in cands}) == len(cands)
        a = next(c for c in cands if c.role == "A")
        assert a.recipe(task) == {"backbone": "efficientnet_lite0", "finetune": "linear-probe", "epochs": 0,
                                  "image_size": task.image_size}
        vote = next(c for c in cands if len(c.members) == 3 and not c.flip)
        assert [m["backbone"] for m in vote.recipe(task)["members"]] == [
            "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
        # mirrored views are written as a recipe: each probe fits plain and mirrored images and predicts both views
        flip = next(c for c in cands if len(c.members) == 3 and c.flip is True and not c.layers)
        assert all(m["probe_flip"] and m["tta"] == "flip" for m in flip.recipe(task)["members"])
        fit = next(c for c in cands if len(c.members) == 3 and c.flip == "fit")
        assert all(m["probe_flip"] and "tta" not in m for m in fit.recipe(task)["members"])
        by = {c.name: c for c in cands}
        hyb = next(c for c in cands if c.kind == "hybrid" and c.parts[0] == flip.name and len(c.parts) == 3)
        members = hyb.recipe(task, by)["members"]
        assert [m.get("tta") for m in members] == ["flip"] * 3 + [None, None]
        # probes are scored before training runs (cheap first)
        kinds = [c.kind for c in cands]
        assert kinds == sorted(kinds, key=lambda k: k != "probe")
    # a shipped recipe that is one trained model (nuclei's 20-epoch fine-tune) also joins the hybrids, with
    # its own keys; one that is already an ensemble (tb's, mpox's) does not
    nuclei = get_task("nuclei")
    by = {c.name: c for c in default_candidates(nuclei)}
    hyb = next(c for c in by.values() if c.kind == "hybrid" and c.parts[1] == "current" and c.train_weight == 3)
    last = hyb.recipe(nuclei, by)["members"][-1]
    assert last["finetune"] == nuclei.recipe["finetune"] and last["epochs"] == nuclei.recipe["epochs"]
    assert last["weight"] == 3.0 and "members" not in last
    for name in ("tb", "mpox"):
        assert not any(c.kind == "hybrid" and "current" in c.parts for c in default_candidates(get_task(name)))
    # where macro-F1 is a metric and classes are many (sonar), B is also tried with class-balanced batches
    sonar = {c.name: c for c in default_candidates(get_task("sonar"))}
    assert sonar["finetune:lite0+sampler"].recipe(get_task("sonar"))["balance"] == "sampler"
    assert any(c.kind == "hybrid" and c.parts[1] == "finetune:lite0+sampler" for c in sonar.values())
    assert not any("sampler" in c.name for c in default_candidates(get_task("tb")))  # binary: not offered
    # every fine-tune is also tried 2.5x longer, with the same keys otherwise, and joins the hybrids
    long = sonar["finetune:lite0+sampler+long"].recipe(get_task("sonar"))
    short = sonar["finetune:lite0+sampler"].recipe(get_task("sonar"))
    assert long["epochs"] == long["patience"] == 15 and short["epochs"] == 6
    assert {k: v for k, v in long.items() if k not in ("epochs", "patience")} == \
        {k: v for k, v in short.items() if k not in ("epochs", "patience")}
    assert any(c.kind == "hybrid" and c.parts[1] == "finetune:lite0+long" and c.train_weight == 3 for c in sonar.values())
    assert "lp-ft:lite0+long" not in sonar
    # B on Lite2 at its own input size, same keys otherwise; not for tiny sources (nuclei's 32 px)
    waste = {c.name: c for c in default_candidates(get_task("waste"))}
    lite2 = waste["finetune:lite2"].recipe(get_task("waste"))
    plain_b = waste["finetune:lite0"].recipe(get_task("waste"))
    assert lite2["backbone"] == "efficientnet_lite2" and lite2["image_size"] == 260
    assert {k: v for k, v in lite2.items() if k not in ("backbone", "image_size")} == \
        {k: v for k, v in plain_b.items() if k not in ("backbone", "image_size")}
    assert "finetune:lite2+long" in waste and any(c.kind == "hybrid" and c.parts[1] == "finetune:lite2"
                                                  for c in waste.values())
    lpft2 = waste["lp-ft:lite2"].recipe(get_task("waste"))
    assert lpft2["finetune"] == "lp-ft" and lpft2["backbone"] == "efficientnet_lite2" and lpft2["image_size"] == 260
    assert "lp-ft:lite2+long" not in waste
    assert not any("lite2" in c.name and c.kind == "train" for c in default_candidates(get_task("nuclei")))
    # weight averaging on the longer fine-tunes and on LP-FT, same keys otherwise
    ema = waste["finetune:lite0+long+ema"].recipe(get_task("waste"))
    assert ema["ema"] == 2.0 and {k: v for k, v in ema.items() if k != "ema"} == \
        waste["finetune:lite0+long"].recipe(get_task("waste"))
    assert "lp-ft:lite0+ema" in waste and "finetune:lite0+ema" not in waste
    # stochastic weight averaging on the longer plain fine-tunes only, same keys otherwise, in the vote too
    swa = waste["finetune:lite0+long+swa"].recipe(get_task("waste"))
    assert swa["swa"] == 0.5 and {k: v for k, v in swa.items() if k != "swa"} == \
        waste["finetune:lite0+long"].recipe(get_task("waste"))
    assert "lp-ft:lite0+swa" not in waste and "finetune:lite0+swa" not in waste
    assert "finetune:lite0+long+swa+seed" not in waste
    hybrid = waste["probe:lite0@320+lite1@320+lite2@320+3xfinetune:lite0+long+swa"].recipe(get_task("waste"), waste)
    assert hybrid["members"][-1]["swa"] == 0.5 and hybrid["members"][-1]["weight"] == 3.0
    # a snapshot ensemble (3 cycles of 5 epochs) of the longer plain fine-tunes, in the vote too
    snap = waste["finetune:lite0+long+snap"].recipe(get_task("waste"))
    assert snap["snapshots"] == 3 and {k: v for k, v in snap.items() if k != "snapshots"} == \
        waste["finetune:lite0+long"].recipe(get_task("waste"))
    assert "finetune:lite0+snap" not in waste and "finetune:lite0+long+snap+seed" not in waste
    hybrid = waste["probe:lite0@320+lite1@320+lite2@320+3xfinetune:lite0+long+snap"].recipe(get_task("waste"), waste)
    assert hybrid["members"][-1]["snapshots"] == 3 and hybrid["members"][-1]["epochs"] == 15
    # two fine-tunes in the vote: every pair of trained candidates, weight 1 or 2 each
    pair = waste["probe:lite0@224+lite1@240+lite2@260+2x(finetune:lite2, finetune:lite0+long)"]
    assert pair.parts[1:] == ("finetune:lite2", "finetune:lite0+long")
    tuned = pair.recipe(get_task("waste"), waste)["members"][3:]
    assert [(m["backbone"], m["image_size"], m["epochs"], m["weight"]) for m in tuned] == [
        ("efficientnet_lite2", 260, 6, 2.0), ("efficientnet_lite0", 224, 15, 2.0)]


def test_official_split_needs_train_and_val_names(tmp_path):
    from pellucid.datasets.samples import Sample

    s = [Sample(path=f"/x/{p}_{i}.png", label="a", group=str(i)) for i, p in enumerate(["train", "val", "train"])]
    assert _official_split(s) == {"train": [0, 2], "val": [1]}
    assert _official_split(s[:1] + [Sample(path="/x/other.png", label="a", group="9")]) is None


def test_table_marks_the_winner_and_missing_values():
    result = {"task": "t", "data": "/d", "n": 10, "k": 2, "seed": 0, "cpu": "cpu", "torch": "2", "threads": 1,
              "seconds": 1.0, "embed_seconds": 0.5, "metrics": ["accuracy", "auroc"], "official_split": False,
              "winner": "x",
              "candidates": [{"name": "x", "role": "A", "about": "a", "stopped": None, "n_folds": 2, "fold_seconds": 1.0,
                              "summary": {"accuracy": {"mean": 0.9, "sd": 0.01}, "auroc": {"mean": None, "sd": None}},
                              "vs_A": {"mean": 0.0, "sd": 0.0, "n": 2}, "vs_B": {"mean": None, "sd": None, "n": 0}}]}
    text = render_table(result)
    assert "**(winner)**" in text and "0.900 ± 0.010" in text and "| — |" in text


def test_train_folds_limits_training_candidates_and_they_cannot_win(tmp_path, cache):
    res = _probe_and_tiny_training(tmp_path, "full", folds=3, train_folds=1)
    row = res["candidates"][1]
    assert row["n_folds"] == 1 and "first 1 fold" in row["stopped"]
    assert res["winner"] == "probe:a" and res["candidates"][0]["vs_B"]["n"] == 1
    assert "1/3 (subset)" in (tmp_path / "out" / "recipes-tb.md").read_text()


def test_one_standard_error_rule_prefers_the_cheaper_candidate_that_beats_both_baselines():
    from pellucid.core.tune import _choose

    def row(name, kind, mean, sd, members=1, n=5, role="", vs_a=0.01, vs_b=None):
        return {"name": name, "kind": kind, "n_folds": n, "summary": {"acc": {"mean": mean, "sd": sd}},
                "recipe": {"members": [{}] * members if members > 1 else []}, "role": role,
                "vs_A": {"mean": vs_a, "n": n}, "vs_B": {"mean": vs_b, "n": 0 if vs_b is None else 2}}

    rows = [row("probe:a", "probe", 0.950, 0.02, role="A", vs_a=None),
            row("probe:vote", "probe", 0.986, 0.009, members=3, vs_a=0.034),
            row("probe:vote+flip", "probe", 0.989, 0.012, members=3, vs_a=0.036),
            row("ft", "train", 0.99, 0.01, n=2, role="B")]
    win, rule = _choose(rows, 5, "acc")
    assert win == "probe:vote" and "one-standard-error" in rule  # +flip is within one SE at twice the passes
    # the baseline itself never wins while a candidate beats it, even when it is within one SE
    rows[0]["summary"]["acc"]["mean"] = 0.985
    assert _choose(rows, 5, "acc")[0] == "probe:vote"
    # a candidate that lost to B on the folds B ran is not eligible; mirrored views (+flip, probe_flip + tta = flip)
    # are a recipe like any other, and win when nothing cheaper reaches the bar
    rows[1]["vs_B"] = {"mean": -0.01, "n": 2}
    rows.append(row("probe:c", "probe", 0.97, 0.01, vs_a=0.02, vs_b=0.005))
    assert _choose(rows, 5, "acc")[0] == "probe:vote+flip"
    rows[2]["vs_B"] = {"mean": -0.001, "n": 2}
    assert _choose(rows, 5, "acc")[0] == "probe:c"
    assert _choose([row("x", "probe", 0.9, 0.1, n=3)], 5, "acc")[0] is None
    # cost weighs each pass by its pixels: three probes at 320 px (3 x 2.04) are dearer than three probes at
    # 224-260 px and a 224-px fine-tune (4.5), though they run fewer passes
    sized = lambda sides: {"members": [{"image_size": x} for x in sides]}  # noqa: E731
    big = row("probe:vote@320", "probe", 0.95, 0.08, members=3, vs_a=0.03, vs_b=0.1)
    big["recipe"] = sized([320] * 3)
    hyb = row("probe:vote+ft", "hybrid", 0.96, 0.08, members=4, vs_a=0.05, vs_b=0.1)
    hyb["recipe"] = sized([224, 240, 260, 224])
    base = [row("probe:a", "probe", 0.90, 0.05, role="A", vs_a=None)]
    assert _choose(base + [big, hyb], 5, "acc")[0] == "probe:vote+ft"
    big["recipe"] = sized([224] * 3)  # at 224 px the three-pass vote is the cheaper one within the bar
    assert _choose(base + [big, hyb], 5, "acc")[0] == "probe:vote@320"
    # a member's test-time views multiply its passes: mirrored probes cost the hybrid three more passes
    from pellucid.core.tune import _cost, _passes

    flipped = row("probe:vote+flip+ft", "hybrid", 0.96, 0.08, members=4)
    flipped["recipe"] = {"members": [{"image_size": x, "tta": "flip"} for x in (224, 240, 260)] + [{"image_size": 224}]}
    assert _passes(hyb) == 4 and _passes(flipped) == 7
    assert _cost(flipped) == pytest.approx(2 * (1 + (240 / 224) ** 2 + (260 / 224) ** 2) + 1, abs=0.01)
    old_row = row("probe:vote+flip", "probe", 0.96, 0.08, members=3)  # written before +flip carried tta: by name
    old_row["recipe"] = sized([224] * 3)
    assert _passes(old_row) == 6 and _cost(old_row) == 6.0


def test_single_group_classes_are_cut_into_blocks_so_every_fold_trains_on_them():
    from pellucid.core.tune import _block_single_group_classes
    from pellucid.datasets.samples import Sample

    s = ([Sample(f"/r/fish_{i}.png", "fish", "rec1") for i in range(40)]
         + [Sample(f"/r/ship_{i}.png", "ship", f"s{i}") for i in range(40)])
    out, blocked = _block_single_group_classes(s, 5)
    assert blocked == ["fish"]
    fish_groups = [x.group for x in out if x.label == "fish"]
    assert len(set(fish_groups)) == 10 and fish_groups[:4] == ["rec1#0"] * 4  # frame order, 4 per block
    assert [x.group for x in out if x.label == "ship"] == [f"s{i}" for i in range(40)]
    assert _block_single_group_classes(s[40:], 5) == (s[40:], [])


def test_hybrid_is_scored_from_its_parts_folds_and_resume_reuses_trained_folds(tmp_path, cache, monkeypatch):
    data = _synthetic(tmp_path / "data", n_groups=20)
    b = {"backbone": "test_resnet", "pretrained": False, "finetune": "full", "epochs": 1, "batch_size": 8,
         "image_size": 32, "members": []}
    cands = [Candidate("probe:a", "probe", (("efficientnet_lite0", 64),), role="A"),
             Candidate("ft", "train", overrides=b, role="B"),
             Candidate("probe:a+3xft", "hybrid", parts=("probe:a", "ft"), train_weight=3.0)]
    kw = dict(folds=2, budget_min=30.0, out=tmp_path / "out", work=tmp_path / "work", candidate_list=cands,
              progress=False, name="tb_other", write_recipe=True)
    res = tune("tb", str(data), **kw)
    rows = {r["name"]: r for r in res["candidates"]}
    hyb = rows["probe:a+3xft"]
    assert hyb["n_folds"] == 2 and hyb["stopped"] is None and hyb["vs_A"]["n"] == 2 and hyb["vs_B"]["n"] == 2
    assert 0.5 <= hyb["summary"]["accuracy"]["mean"] <= 1.0
    # the fine-tune's fold logits were kept beside its model; the hybrid costs the probe plus the training
    assert (tmp_path / "work" / "ft" / "fold_0" / "fold_logits.pt").exists()
    assert hyb["folds"]["0"]["seconds"] >= rows["ft"]["folds"]["0"]["seconds"]
    # the file names keep an official split: the fine-tune trained on it once, so the hybrid is checked there too
    assert rows["ft"]["official"]["metrics"]["accuracy"] is not None
    assert hyb["official"]["metrics"]["accuracy"] is not None
    # the hybrid's recipe trains as one ensemble: the probe member, then the fine-tune with its weight
    members = hyb["recipe"]["members"]
    assert [m["finetune"] for m in members] == ["linear-probe", "full"] and members[1]["weight"] == 3.0
    assert "members" not in members[1] or members[1]["members"] == []
    assert (tmp_path / "out" / "recipes-tb_other.md").read_text().startswith("# Recipe search: tb_other")
    assert "earlier searches" not in (tmp_path / "out" / "recipes-tb_other.md").read_text()
    # resume: the trained folds are reused (no training: the model files are untouched), the scores equal
    model = tmp_path / "work" / "ft" / "fold_1" / "model.safetensors"
    stamp = model.stat().st_mtime_ns
    monkeypatch.setattr("pellucid.core.tune._cpu_line", lambda: "another CPU")
    again = tune("tb", str(data), resume=True, **kw)
    # the header names this search's CPU and the one the kept rows were scored on
    assert again["cpu"] == "another CPU" and again["earlier_cpus"] == [res["cpu"]]
    table = (tmp_path / "out" / "recipes-tb_other.md").read_text()
    assert "CPU: another CPU;" in table
    assert f"earlier searches (`--resume`) were scored there, on: {res['cpu']}." in table
    rows2 = {r["name"]: r for r in again["candidates"]}
    assert model.stat().st_mtime_ns == stamp
    assert rows2["ft"]["folds"] == rows["ft"]["folds"]
    assert rows2["probe:a+3xft"]["summary"] == hyb["summary"]
    # a new checkout: the models are gone and the table is the record — nothing trains, the hybrid keeps its scores
    (tmp_path / "work" / "ft").rename(tmp_path / "ft_away")
    fourth = {r["name"]: r for r in tune("tb", str(data), resume=True, **kw)["candidates"]}
    assert not (tmp_path / "work" / "ft").exists()
    assert fourth["ft"]["folds"] == rows["ft"]["folds"] and fourth["ft"]["official"] == rows["ft"]["official"]
    assert fourth["probe:a+3xft"]["folds"] == rows2["probe:a+3xft"]["folds"]
    assert fourth["probe:a+3xft"]["official"] == rows2["probe:a+3xft"]["official"]
    (tmp_path / "ft_away").rename(tmp_path / "work" / "ft")
    # another recipe under the same name is trained again, not reused
    cands[1] = Candidate("ft", "train", overrides={**b, "lr": 0.5}, role="B")
    third = tune("tb", str(data), resume=True, **{**kw, "candidate_list": cands, "folds": 2})
    assert model.stat().st_mtime_ns != stamp and third["candidates"][1]["n_folds"] == 2
    logits = tmp_path / "work" / "ft" / "fold_1" / "fold_logits.pt"
    assert logits.stat().st_mtime_ns >= model.stat().st_mtime_ns  # the hybrid read the new model's logits


def test_jobs_train_folds_in_worker_processes_and_keep_the_fold_limit(tmp_path, cache):
    res = _probe_and_tiny_training(tmp_path, "full", folds=3, jobs=2, train_folds=2)
    row = res["candidates"][1]
    # two folds trained at once in spawned workers; the third is left out by --train-folds and says so
    assert sorted(row["folds"]) == ["0", "1"] and "first 2 fold" in row["stopped"]
    assert all((tmp_path / "work" / "full" / f"fold_{f}" / "card.json").exists() for f in (0, 1))
    assert not (tmp_path / "work" / "full" / "fold_2").exists()
    assert set(row["folds"]["1"]["metrics"]) >= {"accuracy", "auroc"} and row["folds"]["1"]["seconds"] > 0
    assert res["candidates"][0]["vs_B"]["n"] == 2


def test_resume_reads_fold_results_kept_beside_the_models_when_the_table_is_lost(tmp_path, cache):
    res = _probe_and_tiny_training(tmp_path, "full", folds=2)
    model = tmp_path / "work" / "full" / "fold_1" / "model.safetensors"
    stamp = model.stat().st_mtime_ns
    assert (tmp_path / "work" / "full" / "fold_1" / "fold_result.json").exists()
    (tmp_path / "out" / "recipes-tb.json").unlink()  # a search stopped before it wrote its table
    again = _probe_and_tiny_training(tmp_path, "full", folds=2, resume=True)
    assert model.stat().st_mtime_ns == stamp  # nothing trained again
    assert again["candidates"][1]["folds"] == res["candidates"][1]["folds"]
    # a fold trained on other folds (another k) is not taken for this one
    third = _probe_and_tiny_training(tmp_path, "full", folds=3, resume=True)
    assert model.stat().st_mtime_ns != stamp and third["candidates"][1]["n_folds"] == 3


def test_two_fine_tune_hybrid_skip_keeps_rows_and_refit_trains_again(tmp_path, cache):
    data = _synthetic(tmp_path / "data", n_groups=20, official=False)
    b = {"backbone": "test_resnet", "pretrained": False, "finetune": "full", "epochs": 1, "batch_size": 8,
         "image_size": 32, "members": []}
    cands = [Candidate("probe:a", "probe", (("efficientnet_lite0", 64),), role="A"),
             Candidate("ft", "train", overrides=b, role="B"),
             Candidate("ft2", "train", overrides={**b, "ema": 1.0, "seed": 1}),
             Candidate("probe:a+2x(ft, ft2)", "hybrid", parts=("probe:a", "ft", "ft2"), train_weight=2.0)]
    kw = dict(folds=2, budget_min=30.0, out=tmp_path / "out", work=tmp_path / "work", candidate_list=cands,
              progress=False)
    rows = {r["name"]: r for r in tune("tb", str(data), **kw)["candidates"]}
    pair = rows["probe:a+2x(ft, ft2)"]
    assert pair["n_folds"] == 2 and pair["stopped"] is None and 0.5 <= pair["summary"]["accuracy"]["mean"] <= 1.0
    # it trains as one ensemble: the probe member, then both fine-tunes with their weight, each its own keys
    members = pair["recipe"]["members"]
    assert [m["finetune"] for m in members] == ["linear-probe", "full", "full"]
    assert [m.get("weight") for m in members[1:]] == [2.0, 2.0] and members[2]["ema"] == 1.0
    assert pair["folds"]["0"]["seconds"] >= rows["ft"]["folds"]["0"]["seconds"] + rows["ft2"]["folds"]["0"]["seconds"]
    # a resumed search that skips ft2 keeps its rows (and the pair's) from the earlier table
    model = tmp_path / "work" / "ft2" / "fold_0" / "model.safetensors"
    stamp = model.stat().st_mtime_ns
    kept = {r["name"]: r for r in tune("tb", str(data), resume=True, skip=["ft2"], **kw)["candidates"]}
    assert kept["ft2"]["folds"] == rows["ft2"]["folds"] and kept["probe:a+2x(ft, ft2)"]["folds"] == pair["folds"]
    assert model.stat().st_mtime_ns == stamp
    chosen = {r["name"]: r for r in tune("tb", str(data), resume=True, candidates=["probe:a"], **kw)["candidates"]}
    assert chosen["ft2"]["folds"] == rows["ft2"]["folds"] and list(chosen) == list(rows)  # so does --candidates
    # models gone (a new checkout): --refit trains ft2's folds again, so the pair is scored from models again
    import shutil

    shutil.rmtree(tmp_path / "work" / "ft2")
    again = {r["name"]: r for r in tune("tb", str(data), resume=True, refit=["ft2"], **kw)["candidates"]}
    assert model.exists() and again["ft2"]["n_folds"] == 2
    assert (tmp_path / "work" / "ft2" / "fold_1" / "fold_logits.pt").exists()
    assert again["probe:a+2x(ft, ft2)"]["n_folds"] == 2


def test_another_fold_seed_works_in_its_own_folder(tmp_path, cache, monkeypatch):
    """A search on other folds (``--seed 1``) must not overwrite the fold files and fold models of the
    seed-0 search, which its table's hybrids and ``--resume`` still point at."""
    data = _synthetic(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    cands = [Candidate("probe:a", "probe", (("efficientnet_lite0", 64),), role="A")]
    for seed in (0, 1):
        tune("tb", str(data), folds=3, budget_min=0.0, out=tmp_path / f"out{seed}", candidate_list=cands,
             progress=False, seed=seed)
    zero, one = tmp_path / "runs" / "tune" / "tb" / "folds", tmp_path / "runs" / "tune" / "tb-seed1" / "folds"
    assert len(list(zero.glob("fold_*.json"))) == 3 and len(list(one.glob("fold_*.json"))) == 3
    assert (zero / "fold_0.json").read_text() != (one / "fold_0.json").read_text()


def test_a_table_written_before_a_recipe_key_existed_keeps_its_rows():
    from pellucid.core.tune_candidates import _same_recipe

    new = {"backbone": "efficientnet_lite0", "finetune": "full", "epochs": 6, "tta": "none", "probe_flip": False}
    older = {"recipe": {"backbone": "efficientnet_lite0", "finetune": "full", "epochs": 6}}  # no tta, no probe_flip
    assert _same_recipe(older, new)
    assert not _same_recipe(older, {**new, "tta": "flip"})  # views on are another recipe
    assert not _same_recipe(older, {**new, "epochs": 8})
