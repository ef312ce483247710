"""The one JSON encoder (``optprune.solvers.serialization.to_json``): what every run record goes through."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from optprune.solvers.serialization import COMPACT_MAX_ITEMS, to_json


def test_record_values_become_json_and_read_back():
    value = {"path": Path("/tmp/x"), "dtype": torch.float16, "scalar": torch.tensor(2.5), "vec": torch.arange(3),
             "np_int": np.int64(7), "np_float": np.float32(0.5), "nan": float("nan"), "inf": -math.inf,
             "nested": ({"a": (1, 2)}, None), "flag": True, 3: "int key", "obj": object}
    out = to_json(value)
    back = json.loads(json.dumps(out, allow_nan=False))  # no NaN/Inf, no foreign types left
    assert back == out
    assert out["path"] == "/tmp/x" and out["dtype"] == "float16" and out["scalar"] == 2.5
    assert out["vec"] == [0, 1, 2] and out["np_int"] == 7 and type(out["np_int"]) is int
    assert out["np_float"] == 0.5 and out["nan"] == "nan" and out["inf"] == "-inf"
    assert out["nested"] == [{"a": [1, 2]}, None] and out["flag"] is True
    assert out["3"] == "int key" and out["obj"] == str(object)


def test_keys_json_accepts_are_kept_on_request():
    value = {0: 0.5, 1.5: "x", (1, 2): "tuple key", "s": {2: 1}}
    out = to_json(value, string_keys=False)
    assert out == {0: 0.5, 1.5: "x", "(1, 2)": "tuple key", "s": {2: 1}}
    assert json.loads(json.dumps(out)) == json.loads(json.dumps(to_json(value)))  # the same file either way


def test_compact_keeps_small_values_and_leaves_out_the_rest():
    info = {"iters": 12, "gap": float("inf"), "note": "ok", "scalar": torch.tensor(3.0), "path": Path("/x"),
            "matrix": torch.ones(2, 2), "short": [1, 2.0, "a"], "long": list(range(COMPACT_MAX_ITEMS + 1)),
            "mixed": [1, object()], "none": None, "graph": {"deg": np.int32(4), "obj": object()}}
    out = to_json(info, compact=True)
    assert out == {"iters": 12, "gap": math.inf, "note": "ok", "scalar": 3.0, "short": [1, 2.0, "a"],
                   "graph": {"deg": 4}}
    assert to_json(list(range(COMPACT_MAX_ITEMS)), compact=True) == list(range(COMPACT_MAX_ITEMS))


@pytest.mark.parametrize("value", [1, 1.25, "x", None, False])
def test_plain_values_pass_unchanged(value):
    assert to_json(value) is value and to_json(value, compact=True) is value
