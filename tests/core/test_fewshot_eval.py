"""Tests for ``pellucid fewshot eval``: it scores the model that ``fewshot fit`` would fit, refitted on
each episode's support set (:func:`~pellucid.core.fewshot.evaluation.evaluate_fit`) — the same
classifier, the same choice of embedding by leave-one-out, groups kept apart — and the command line
passes the same options to both."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pellucid.core import fewshot as fs
from pellucid.core.fewshot import ProtoConfig
from tests.core.test_fewshot import _write_images


@pytest.fixture()
def tiny_backbone():
    torch.manual_seed(0)
    return fs.create_backbone("test_resnet", pretrained=False)[0]


def _hidden_direction(n: int, seed: int, width: int = 10) -> tuple[torch.Tensor, list[int], list[str]]:
    """Two classes told apart by dimension 0 only (means ±1, sd 0.1) under nuisance dimensions of sd 3;
    every image its own group."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(2).repeat_interleave(n)
    x = torch.randn(2 * n, width, generator=g) * 3.0
    x[:, 0] = (2.0 * y - 1.0) + 0.1 * torch.randn(2 * n, generator=g)
    return x, y.tolist(), [f"g{i}" for i in range(2 * n)]


def test_eval_scores_the_classifier_that_fit_fits(tiny_backbone):
    x, labels, groups = _hidden_direction(60, seed=0)
    acc = {}
    for head in ("prototypes", "logistic"):
        net = fs.PrototypicalNetwork(tiny_backbone, ProtoConfig(head=head))
        res = fs.evaluate_fit({"only": (net, x, None)}, labels, groups, n_shot=20, n_query=10, n_episodes=15)
        assert res["episodes"] == 15 and res["n_way"] == 2 and res["chosen"] == {"only": 15}
        acc[head] = res["accuracy"]
        # every query of every episode is in the pooled confusion matrix, and its diagonal is the accuracy
        cm = np.array(res["confusion"])
        assert res["classes"] == ["0", "1"] and cm.sum() == 15 * 2 * 10 and (cm.sum(1) == 150).all()
        assert np.trace(cm) / cm.sum() == pytest.approx(res["accuracy"])
        assert res["recall"] == {c: pytest.approx(cm[i, i] / 150) for i, c in enumerate(res["classes"])}
    # the logistic head finds the class direction; the nearest prototype is swamped by the nuisance
    assert acc["logistic"] >= 0.9
    assert acc["prototypes"] <= 0.8


def test_eval_chooses_the_embedding_per_support_set_as_fit_does(tiny_backbone):
    x, labels, groups = _hidden_direction(40, seed=1, width=4)
    signal = x[:, :1].repeat(1, 4) + 0.05 * torch.randn(len(x), 4, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(len(x), 4, generator=torch.Generator().manual_seed(3))
    parts = {name: (fs.PrototypicalNetwork(tiny_backbone, ProtoConfig(head="logistic")), feats, None)
             for name, feats in (("noise", noise), ("signal", signal))}
    res = fs.evaluate_fit(parts, labels, groups, n_shot=5, n_query=10, n_episodes=12)
    assert res["chosen"] == {"noise": 0, "signal": 12}  # leave-one-out NLL on the support picks the signal
    assert res["accuracy"] >= 0.95
    # one episode by hand: fit_and_choose on its support set, score its queries
    sampler = fs.EpisodeSampler(labels, groups, None, 5, 10, 12)
    ep = next(iter(sampler))
    s = torch.as_tensor(ep.support)
    choice = fs.fit_and_choose({k: (n, f[s], None) for k, (n, f, _) in parts.items()},
                               torch.from_numpy(ep.support_labels).long(), 2, head_scale=False)
    assert choice.name == "signal" and choice.chosen == "signal" and choice.prototype_fit is not None
    assert choice.net.head_weight.shape == (2, 4)  # the head is fitted on the chosen embedding only
    assert parts["noise"][0].head_weight.numel() == 0


def test_cli_eval_takes_fits_options_and_says_what_it_scored(tmp_path, monkeypatch, capsys):
    from pellucid.cli import build_parser
    from pellucid.core import fewshot_cli

    monkeypatch.chdir(tmp_path)  # the feature cache goes under runs/ of the working folder
    data = _write_images(tmp_path / "data", per_class=8)
    seen = {}
    for head in (None, "prototypes"):
        argv = ["fewshot", "eval", "--data", str(data), "--backbone", "test_resnet", "--shots", "2",
                "--episodes", "6", "--out", str(tmp_path / f"e-{head}")] + (["--head", head] if head else [])
        args = build_parser().parse_args(argv)
        args.pretrained = False
        assert fewshot_cli.run(args) == 0
        printed = capsys.readouterr().out
        assert ("nearest prototype" if head else "logistic head (C = 30)") in printed
        assert "| 2 | 3 | 6 | 6 |" in printed  # 3-way, 6 queries per class (8 images, 2 shots), 6 episodes
        saved = json.loads((tmp_path / f"e-{head}" / "fewshot_eval.json").read_text())
        seen[head] = saved["config"]["head"]
        assert 0.0 <= saved["rows"][0]["accuracy"] <= 1.0 and sum(saved["rows"][0]["chosen"].values()) == 6
        # each class's recall under the table, and the pooled confusion matrix as a picture
        assert "2-shot recall: blue " in printed and np.array(saved["rows"][0]["confusion"]).sum() == 6 * 3 * 6
        assert (tmp_path / f"e-{head}" / "confusion_2shot.png").stat().st_size > 1000
    assert seen == {None: "logistic", "prototypes": "prototypes"}
    args = build_parser().parse_args(["fewshot", "eval", "--data", str(data), "--backbone", "test_resnet",
                                      "--shots", "2", "--episodes", "3", "--transductive", "2"])
    args.pretrained = False
    assert fewshot_cli.run(args) == 0
    assert "nearest prototype, transductive refinement (2 steps)" in capsys.readouterr().out


def test_cli_eval_of_one_recording_classes_says_how_and_splits_when_asked(tmp_path, monkeypatch, capsys):
    from pellucid.cli import build_parser
    from pellucid.core import fewshot_cli
    from pellucid.core.fewshot import FewShotError

    monkeypatch.chdir(tmp_path)
    data = _write_images(tmp_path / "data", per_class=8)
    rows = ["path,label,group"]
    for p in sorted(data.rglob("*.png")):  # red and green: one group per image; blue: one recording
        label = p.parent.name
        rows.append(f"{p.relative_to(data)},{label},{'rec' if label == 'blue' else p.stem}")
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    base = ["fewshot", "eval", "--data", str(data), "--backbone", "test_resnet", "--shots", "1", "--episodes", "4"]
    args = build_parser().parse_args(base)
    args.pretrained = False
    with pytest.raises(FewShotError, match="class 'blue' has 8 images in 1 group.*--split-single-groups 10") as err:
        fewshot_cli.run(args)
    assert "\n" not in str(err.value)
    args = build_parser().parse_args(base + ["--split-single-groups", "4", "--out", str(tmp_path / "e")])
    args.pretrained = False
    assert fewshot_cli.run(args) == 0
    assert "blue: one group each, cut into 4 blocks" in capsys.readouterr().out
    saved = json.loads((tmp_path / "e" / "fewshot_eval.json").read_text())
    assert saved["split_single_groups"] == {"blocks": 4, "classes": ["blue"]}
    args = build_parser().parse_args(base + ["--split-single-groups", "1"])
    with pytest.raises(FewShotError, match="at least 2 blocks"):
        fewshot_cli.run(args)


def test_the_table_names_each_class_recall_and_the_largest_confusions():
    from pellucid.core.fewshot.evaluation import format_shot_table, most_confused

    row = {"n_shot": 5, "n_way": 3, "n_query": 10, "episodes": 4, "accuracy": 0.8, "ci95": 0.05,
           "classes": ["plane", "sea", "ship"], "recall": {"plane": 0.7, "sea": 1.0, "ship": 0.7},
           "confusion": [[28, 0, 12], [0, 40, 0], [8, 4, 28]]}
    assert most_confused(row) == [("plane", "ship", 0.3), ("ship", "plane", 0.2), ("ship", "sea", 0.1)]
    text = format_shot_table([row, {"n_shot": 40, "error": "class 'sea' has 8 images"}])
    assert "5-shot recall: plane 0.70, sea 1.00, ship 0.70; most confused: plane taken for ship 30%; " \
           "ship taken for plane 20%; ship taken for sea 10%" in text
    assert "| 40 | – | – | – | n/a | class 'sea' has 8 images |" in text
    assert most_confused({**row, "confusion": [[40, 0, 0], [0, 40, 0], [0, 0, 40]]}) == []  # none below 1 %
    # rows without the pooled matrix (the plain prototype table) print as before
    plain = format_shot_table([{k: v for k, v in row.items() if k not in ("recall", "confusion", "classes")}])
    assert "recall" not in plain
