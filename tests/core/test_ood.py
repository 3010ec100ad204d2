"""Out-of-domain reference files as a model folder carries them: whatever is in ``ood.safetensors``, every
door that loads the folder gets the reference or one line naming the file."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pellucid.core import ood
from pellucid.core.card import ModelFolderError


def _neighbours(tmp_path):
    rng = np.random.default_rng(0)
    ood.save_reference(tmp_path, ood.NeighbourReference.fit(rng.normal(size=(6, 8))))
    return tmp_path / ood.REFERENCE_FILE


def test_a_damaged_reference_file_is_one_line_at_load(tmp_path):
    """A hand-made or damaged ``ood.safetensors`` ended ``pellucid predict`` (and every other door) in a JSON,
    key, type or safetensors traceback, or "error: distance_threshold"; a support of one row loaded."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    path = _neighbours(tmp_path)
    back = ood.load_reference(tmp_path)
    assert isinstance(back, ood.NeighbourReference) and back.support.shape == (6, 8)
    with safe_open(str(path), framework="numpy") as fh:
        meta, support = json.loads(fh.metadata()["pellucid_ood"]), fh.get_tensor("support")
    damaged = {
        "not JSON": ({"pellucid_ood": "{"}, {"support": support}),
        "nested too deep": ({"pellucid_ood": "[" * 100_000 + "]" * 100_000}, {"support": support}),
        "a list": ({"pellucid_ood": "[]"}, {"support": support}),
        "no threshold": ({"pellucid_ood": json.dumps({"kind": "neighbours"})}, {"support": support}),
        "a text threshold": ({"pellucid_ood": json.dumps({**meta, "distance_threshold": "x"})}, {"support": support}),
        "a NaN threshold": ({"pellucid_ood": json.dumps({**meta, "distance_threshold": float("nan")})},
                            {"support": support}),
        "one support row": ({"pellucid_ood": json.dumps(meta)}, {"support": support[:1]}),
        "no support": ({"pellucid_ood": json.dumps(meta)}, {"other": support}),
        "a Gaussian without its precision": ({"pellucid_ood": json.dumps({"distance_threshold": 1.0})},
                                             {"mean": support[0]}),
    }
    for what, (metadata, tensors) in damaged.items():
        save_file(tensors, str(path), metadata=metadata)
        with pytest.raises(ModelFolderError, match="the out-of-domain reference is damaged") as err:
            ood.load_reference(tmp_path)
        message = str(err.value)
        assert "\n" not in message and str(path) in message and "remove it" in message, what
    path.write_bytes(path.read_bytes()[:40])  # cut short
    with pytest.raises(ModelFolderError, match="damaged"):
        ood.load_reference(tmp_path)
