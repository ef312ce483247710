"""Which linear sub-layers are pruned: ``targets`` and ``ignore``, matched as llm-compressor users write them.

A pattern matches a sub-layer when it is

* its full module name (``model.layers.0.self_attn.q_proj``),
* its module class name (``Linear``, ``Conv1D``),
* ``re:<regex>`` that :func:`re.match` es the full name (``re:.*self_attn.*``, ``re:model.layers.(0|11)\\.``),
* a module that contains it: a decoder block's name (``model.layers.3``) or a regex that matches a block's whole
  name (``re:model.layers.\\d+$``), as older llm-compressor recipes target blocks; ``__ALL__`` /
  ``__ALL_PRUNABLE__`` match everything.

A sub-layer is pruned when ``targets`` is empty/None or some target matches it, and no ``ignore`` pattern
matches it. A pattern that matches none of the model's prunable sub-layers is an error (typos fail loudly),
except an ``ignore`` entry naming a module outside the pruned blocks such as ``lm_head`` (never pruned).
"""
from __future__ import annotations

import re
from typing import Iterable, Optional, Union

__all__ = ["TargetError", "parse_patterns", "select_layers", "matches"]


class TargetError(ValueError):
    """A targets/ignore pattern is malformed or matches nothing (one line)."""


def parse_patterns(value: Union[str, Iterable[str], None], what: str = "targets") -> Optional[list]:
    """``"a,b"`` or a list → a list of patterns (None/empty → None); bad regexes raise :class:`TargetError`."""
    if value is None:
        return None
    items = [s.strip() for s in (value.split(",") if isinstance(value, str) else value) if str(s).strip()]
    for p in items:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise TargetError(f"--{what}: bad regular expression {p!r} ({e})") from None
    return items or None


ALL = ("__ALL__", "__ALL_PRUNABLE__")  # llm-compressor's spellings of "every layer"


def matches(pattern: str, name: str, cls_name: str) -> bool:
    """``pattern`` names the sub-layer, its class, or a module that contains it (a decoder block such as
    ``model.layers.3`` or ``re:model.layers.\\d+$``, as older llm-compressor recipes target blocks)."""
    if pattern in ALL:
        return True
    parts = name.split(".")
    scopes = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]  # the name, then its ancestors
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return any(rx.match(s) is not None and (s == name or rx.fullmatch(s) is not None) for s in scopes)
    return pattern == cls_name or pattern in scopes


def select_layers(layers: dict, targets=None, ignore=None, *, other_modules: Iterable[str] = ()) -> set:
    """The names in ``layers`` (full name → class name) chosen by ``targets`` minus ``ignore``.

    ``other_modules``: names of modules outside the prunable set that an ignore entry may name harmlessly."""
    targets = parse_patterns(targets, "targets")
    ignore = parse_patterns(ignore, "ignore")
    others = set(other_modules)
    for what, pats in (("targets", targets), ("ignore", ignore)):
        for p in pats or ():
            if not any(matches(p, n, c) for n, c in layers.items()):
                if what == "ignore" and (p in others or (p.startswith("re:") and any(
                        re.match(p[3:], o) for o in others))):
                    continue
                example = next(iter(layers), "")
                raise TargetError(f"--{what} {p!r} matches no prunable layer (names look like {example!r}; "
                                  f"also a class name such as Linear, or re:REGEX)")
    chosen = {n for n, c in layers.items()
              if (not targets or any(matches(p, n, c) for p in targets))
              and not any(matches(p, n, c) for p in ignore or ())}
    if not chosen:
        raise TargetError("--targets/--ignore leave no layer to prune")
    return chosen
