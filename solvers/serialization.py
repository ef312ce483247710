"""JSON-ready copies of results: the one encoder every record of a run (run.json, eval.json, analysis.json, the
allocation and per-layer records) goes through.

It lives in ``solvers`` because that is the lowest layer whose results are written (layer results, allocation
and verification records); ``llm_adapters`` and ``optprune`` import it from here.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

__all__ = ["to_json", "COMPACT_MAX_ITEMS"]

#: with ``compact=True``, a longer list or tuple is left out (a per-layer record keeps small summaries only)
COMPACT_MAX_ITEMS = 64

#: key types ``json.dumps`` writes itself (as strings); with ``string_keys=False`` they stay as they are
_JSON_KEY_TYPES = (str, int, float, bool, type(None))


def to_json(value, *, string_keys: bool = True, compact: bool = False):
    """A copy of ``value`` that ``json.dumps`` writes without help.

    Dicts, lists and tuples are copied item by item (tuples become lists); a tensor of one element becomes its
    number and a larger one a nested list; a NumPy scalar its Python number; a non-finite float the string
    ``"nan"``, ``"inf"`` or ``"-inf"``; a ``torch.dtype`` its short name (``"float16"``); anything else its
    ``str``.

    ``string_keys``: every dict key becomes a string (as a reader of the written file sees it); ``False`` keeps
    the keys JSON accepts (``int`` block numbers, for instance) so that a record used in memory is indexed as
    before and written alike.

    ``compact``: what a per-layer record keeps of a method's ``info``: a value of another type (a path, a dtype,
    an object), a tensor of more than one element and a list longer than :data:`COMPACT_MAX_ITEMS` are left
    out instead of written as text: a dict drops that entry, a list holding one is left out whole (``None``);
    non-finite floats stay floats.
    """
    if isinstance(value, dict):
        return _dict_to_json(value, string_keys, compact)
    if isinstance(value, (list, tuple)):
        if compact and len(value) > COMPACT_MAX_ITEMS:
            return None
        items = [to_json(x, string_keys=string_keys, compact=compact) for x in value]
        return None if compact and any(x is None for x in items) else items
    if isinstance(value, float):
        return value if compact or math.isfinite(value) else str(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if torch.is_tensor(value):
        if value.numel() == 1:
            return value.item()
        return None if compact else value.tolist()
    if isinstance(value, np.generic) and value.size == 1:
        return to_json(value.item(), string_keys=string_keys, compact=compact)
    if compact:
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return str(value)


def _dict_to_json(value: dict, string_keys: bool, compact: bool) -> dict:
    out = {}
    for key, item in value.items():
        if string_keys or not isinstance(key, _JSON_KEY_TYPES):
            key = str(key)
        item = to_json(item, string_keys=string_keys, compact=compact)
        if item is not None or not compact:
            out[key] = item
    return out
