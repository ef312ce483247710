"""Method and backend registry: a method is one module — its program builder, its production solver and one
``@register_method`` decorator — found by discovery, never by a list to edit.

Production methods share one signature::

    fn(problem: LayerProblem, pattern: Pattern, *, option=default, ...) -> LayerResult

**Discovery.** By package, never by file name: every module of :mod:`optprune.solvers.methods` is imported once on
first use, then every module that an installed package declares under the entry-point group ``optprune.methods``;
backends likewise from :mod:`optprune.solvers.backends` and the group ``optprune.backends``. A module of these
packages that fails to import raises (a missing third-party dependency is reported instead); a plug-in that fails
to import is reported (:func:`load_errors`, a warning, and the "unknown method" error), never silently dropped.

**Loud registration.** :func:`register_method` raises :class:`RegistrationError`, naming the valid choices, for
a pattern kind that is not registered, an unknown ``needs``, an option (help text or default) that the solver
does not take, and a name already taken by another function.

**Options.** A method's options are its solver's keyword parameters (types from the annotations, defaults from
the signature), or those of the function named by ``options_from=`` when the solver is a thin wrapper taking
``**options``. :meth:`MethodSpec.check_options` rejects an option no solver reads; the CLI calls it before any
model loads (``-O bogus=1`` → exit code 2), and every call through the registry checks again.

Adding a reference backend = one file in :mod:`optprune.solvers.backends` with a :class:`~.base.Backend` subclass
decorated with :func:`register_backend` (or a plug-in under the entry-point group ``optprune.backends``).
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import pkgutil
import re
import sys
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from ..formulations.patterns import (PatternRegistrationError, definition_site, discover_patterns, pattern_kinds,
                                     pattern_registries)
from . import backends, methods

__all__ = ["MethodSpec", "Option", "Range", "check_value", "parse_bool", "UnknownMethodError", "UnknownOptionError", "RegistrationError",
           "register_method", "get_method", "list_methods", "method_specs", "load_errors", "discover", "isolated",
           "register_backend", "get_backend", "list_backends", "METHOD_ENTRY_POINTS", "BACKEND_ENTRY_POINTS"]

METHOD_ENTRY_POINTS = "optprune.methods"
BACKEND_ENTRY_POINTS = "optprune.backends"
NEEDS = {"none": "weights only", "diag": "input column norms ‖X_j‖", "gram": "input Gram matrices H, Ĥ, C"}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_+\-]*$")
_CHECKED_TYPES = (bool, int, float, str, dict, list)


class UnknownMethodError(ValueError):
    pass


class UnknownOptionError(ValueError):
    """A method option that the method's solver does not read."""


class RegistrationError(TypeError):
    """A registration naming an unknown pattern kind / option / statistics level, or a name already taken."""


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def parse_bool(value, what: str = "value") -> bool:
    """A real boolean, 0/1, or one of the words true/false, yes/no, on/off, 1/0 (any case) — parsed, never by
    truthiness (``"false"`` is False; ``"maybe"``, ``2`` or ``[]`` are a ValueError naming ``what``)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
    raise ValueError(f"{what} expects bool (true/false, yes/no, on/off, 1/0), got {value!r}")


class Range:
    """An interval of allowed numbers, written as in mathematics: ``"[1, inf)"``, ``"(0, 1]"``, ``"[0, 1)"``,
    ``"(-inf, inf)"`` — square bracket closed, round bracket open."""

    _RE = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])\s*$")

    def __init__(self, text: str):
        m = self._RE.match(str(text))
        try:
            lo, hi = float(m.group(2)), float(m.group(3))
        except (AttributeError, ValueError):
            raise RegistrationError(f"range {text!r}: write an interval such as '[1, inf)' or '(0, 1]'") from None
        if lo > hi or lo == float("inf") or hi == float("-inf"):
            raise RegistrationError(f"range {text!r} is empty")
        self.text = f"{m.group(1)}{m.group(2)}, {m.group(3)}{m.group(4)}"
        self.lo, self.hi = lo, hi
        self.lo_open, self.hi_open = m.group(1) == "(", m.group(4) == ")"

    def __contains__(self, v) -> bool:
        return ((v > self.lo if self.lo_open else v >= self.lo) and (v < self.hi if self.hi_open else v <= self.hi))

    def __eq__(self, other) -> bool:
        return isinstance(other, Range) and self.text == other.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"Range({self.text!r})"

    def __str__(self) -> str:
        return self.text


def _type_name(t) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
            list: "a list"}.get(t, t.__name__)


def check_value(what: str, value, *, type=None, range=None, choices=None, none_ok: bool = True):
    """The one check of a typed option value — method options (``-O``, ``method_options=``) and run options
    (``--nsamples``, ``refit=``) from the command line, the API, ``--config``, ``--replay`` and recipes alike.

    Returns the value as the code uses it: booleans parsed (:func:`parse_bool`), an integer written as a string
    (``"32"`` from a file) read as that integer, an int accepted where a float is expected. Raises ``ValueError``
    (one line naming ``what``, the value and what is allowed) for the wrong type, a value outside ``range``
    (a :class:`Range` or its text) or not among ``choices``. ``None`` passes when ``none_ok``."""
    if value is None and none_ok:
        return None
    if choices is not None:
        v = value.strip().lower() if isinstance(value, str) else value
        if v not in choices:
            raise ValueError(f"{what}={value!r}; choose one of {', '.join(map(str, choices))}")
    if type is bool:
        return parse_bool(value, what)
    if type in (int, float):
        v = value
        if isinstance(v, str):
            try:
                v = int(v.strip()) if type is int else float(v.strip())
            except ValueError:
                raise ValueError(f"{what} expects {type.__name__}, got {value!r}") from None
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) if type is float else \
            isinstance(v, int) and not isinstance(v, bool)
        if not ok or v != v:
            raise ValueError(f"{what} expects {type.__name__}, got {value!r}")
        value = v
    elif type is not None and not isinstance(value, type):
        raise ValueError(f"{what} expects {type.__name__}, got {value!r}")
    if range is not None:
        r = range if isinstance(range, Range) else Range(range)
        if value not in r:
            raise ValueError(f"{what}={value!r} is out of range; allowed: {_type_name(type) + ' in ' if type else ''}"
                             f"{r}")
    return value


@dataclass(frozen=True)
class Option:
    """One method option: ``-O name=value`` on the CLI, ``method_options={name: value}`` in the API.

    Declared at registration (``options={"blocksize": Option(help="...", range="[1, inf)")}``) next to the
    solver's signature, which gives the name, the default and the type."""
    name: str = ""
    default: Any = None
    type: Optional[type] = None  # checked when one of bool/int/float/str/dict/list; None: not checked
    help: str = ""
    choices: Optional[tuple] = None  # the values it takes (strings compared lower-case, stripped); None: any
    range: Union[str, Range, None] = None  # allowed numbers, e.g. "[1, inf)" (int/float options); None: any

    def __post_init__(self):
        if isinstance(self.range, str):
            object.__setattr__(self, "range", Range(self.range))

    def normalize(self, method: str, value):
        """The value as the solver gets it (booleans parsed); :class:`UnknownOptionError` when it is not
        allowed (:func:`check_value`)."""
        try:
            return check_value(f"method {method!r}: option {self.name}", value, type=self.type, range=self.range,
                               choices=self.choices, none_ok=value is None and self.default is None)
        except ValueError as e:
            raise UnknownOptionError(str(e)) from None

    def check(self, method: str, value) -> None:
        self.normalize(method, value)

    def allowed(self) -> str:
        """What the option takes, for listings: its choices or its range (empty when anything goes)."""
        if self.choices is not None:
            return " | ".join(map(str, self.choices))
        return "" if self.range is None else str(self.range)

    def show(self) -> str:
        return f"{self.name}={_show(self.default)}"


def _show(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, tuple):
        return "(" + ",".join(_show(x) for x in v) + ")"
    return repr(v)


def _simple_type(ann) -> Optional[type]:
    """bool/int/float/str/dict/list from an annotation (``Optional[X]`` → X); anything else → None."""
    if ann in _CHECKED_TYPES:
        return ann
    origin = typing.get_origin(ann)
    if origin is Union:
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        return _simple_type(args[0]) if len(args) == 1 else None
    if origin in (dict, list):
        return origin
    return None


def options_of(fn: Callable) -> tuple[dict, bool]:
    """The keyword options of a solver ``fn(problem, pattern, *, ...)`` and whether it also takes ``**kw``."""
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that cannot be evaluated: leave those options unchecked
        hints = {}
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    out, var_kw = {}, False
    for i, p in enumerate(params):
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind is p.VAR_POSITIONAL:
            raise RegistrationError(f"{fn.__qualname__}: a method solver takes no *args")
        elif p in positional[:2]:
            continue  # problem, pattern
        elif p.default is p.empty:
            raise RegistrationError(f"{fn.__qualname__}: option {p.name!r} needs a default "
                                    f"(solvers are fn(problem, pattern, *, option=default, ...))")
        else:
            out[p.name] = Option(p.name, p.default, _simple_type(hints.get(p.name)))
    return out, var_kw


@dataclass
class MethodSpec:
    name: str
    fn: Callable
    #: statistics the pipeline must collect: 'none' (weights only), 'diag' (‖X_j‖), 'gram' (H, Ĥ, C)
    needs: str = "gram"
    #: pattern kinds it accepts (registered kinds: formulations.patterns.pattern_kinds())
    patterns: frozenset = frozenset({"unstructured", "row", "nm"})
    structured: bool = False
    program: Optional[Callable] = None  # (problem, pattern, **opts) -> Program it solves or approximates
    description: str = ""
    defaults: dict = field(default_factory=dict)
    options_from: Union[Callable, str, None] = None
    option_help: dict = field(default_factory=dict)
    module: str = ""
    #: ``(options) -> 'none' | 'diag' | 'gram'`` when the statistics depend on the options (``needs`` is then
    #: the level of the default options)
    needs_by_options: Optional[Callable] = None
    #: option sets the cross-check (:mod:`.verification`) runs besides the defaults, one program each
    verify_options: tuple = ()
    #: companion: the method's solver of the ℓ1 model, ``(problem, lam) -> W`` (or a result with ``.W``), which
    #: the cross-check holds to the ℓ1 program's proven optimum
    l1_solver: Optional[Callable] = None
    #: companion: the options under which a method that optimises the grid scales keeps them fixed, so that the
    #: cross-check can compare it with the fixed-scale grid program's optimum (None: not comparable there)
    fixed_scale_options: Optional[dict] = None
    _options: Optional[dict] = field(default=None, repr=False)

    @property
    def options(self) -> dict:
        """name -> :class:`Option`: the solver's keyword options (defaults overridden by ``defaults``)."""
        if self._options is None:
            self._options = self._resolve_options()
        return self._options

    def _resolve_options(self) -> dict:
        src = self.options_from or self.fn
        if isinstance(src, str):
            mod = sys.modules.get(self.fn.__module__)
            src = getattr(mod, src, None) if mod is not None else None
            if not callable(src):
                raise RegistrationError(f"method {self.name!r}: options_from={self.options_from!r} is not a "
                                        f"function of {self.fn.__module__}")
        opts, var_kw = options_of(src)
        for k, h in self.option_help.items():
            if isinstance(h, Option) and k in opts:  # the signature's default and type, the declaration's rest
                opts[k] = Option(k, opts[k].default, h.type or opts[k].type, h.help, h.choices, h.range)
            elif isinstance(h, Option):
                opts[k] = h if h.name == k else Option(k, h.default, h.type, h.help, h.choices, h.range)
            elif k in opts:
                opts[k] = Option(k, opts[k].default, opts[k].type, str(h))
            else:
                raise RegistrationError(f"method {self.name!r}: help for unknown option {k!r}; its options: "
                                        f"{', '.join(opts) or 'none'}")
        if var_kw and not opts and self.options_from is None:
            raise RegistrationError(f"method {self.name!r}: the solver takes **options; declare them with "
                                    f"options_from=<function with the real signature> or options={{name: Option}}")
        for k, v in self.defaults.items():
            if k not in opts:
                raise RegistrationError(f"method {self.name!r}: default for unknown option {k!r}; its options: "
                                        f"{', '.join(opts) or 'none'}")
            opts[k] = Option(k, v, opts[k].type, opts[k].help, opts[k].choices, opts[k].range)
        for o in opts.values():
            if o.range is not None and o.type not in (int, float):
                raise RegistrationError(f"method {self.name!r}: option {o.name!r} declares the range {o.range} but "
                                        f"its type is {getattr(o.type, '__name__', 'not annotated')}; annotate it "
                                        f"int or float")
            if o.default is not None:
                try:
                    o.normalize(self.name, o.default)
                except UnknownOptionError as e:
                    raise RegistrationError(f"{e} (the default)") from None
        return opts

    def needs_for(self, options: Optional[dict] = None) -> str:
        """The statistics the pipeline must collect for a run with these options (defaults filled in)."""
        if self.needs_by_options is None:
            return self.needs
        opts = {k: o.default for k, o in self.options.items()}
        opts.update(self.defaults)
        opts.update(options or {})
        level = self.needs_by_options(opts)
        if level not in NEEDS:
            raise RegistrationError(f"method {self.name!r}: needs_for returned {level!r}; choose from "
                                    f"{', '.join(NEEDS)}")
        return level

    def check_options(self, options: Optional[dict]) -> None:
        """Raise :class:`UnknownOptionError` (one line, with the valid options) for an option this method's
        solver does not read, or a value of the wrong type, outside its range or not among its choices."""
        self.normalize_options(options)

    def normalize_options(self, options: Optional[dict]) -> dict:
        """The options as the solver gets them (booleans parsed: ``"false"`` is False), after
        :meth:`check_options`' checks — the one place every caller (CLI, API, config, replay) goes through."""
        if not options:
            return {}
        if not isinstance(options, dict):
            raise UnknownOptionError(f"method options must be a dict of option → value, got "
                                     f"{type(options).__name__}")
        opts = self.options
        unknown = [k for k in options if k not in opts]
        if unknown:
            raise UnknownOptionError(
                f"method {self.name!r} has no option{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))}; its options: {', '.join(o.show() for o in opts.values()) or 'none'}")
        return {k: opts[k].normalize(self.name, v) for k, v in options.items()}

    def __call__(self, problem, pattern, **options):
        opts = dict(self.defaults)
        opts.update(self.normalize_options(options))
        return self.fn(problem, pattern, **opts)


_METHODS: dict[str, MethodSpec] = {}
_BACKENDS: dict[str, type] = {}
_state = {"methods": False, "backends": False, "loading": set()}
_ERRORS: dict[str, str] = {}  # module or entry point -> one-line import error


def _key(name: str) -> str:
    return (name or "").strip().lower()


def register_method(name: str, *, needs: str = "gram", patterns=("unstructured", "row", "nm"),
                    structured: bool = False, program: Optional[Callable] = None, description: str = "",
                    options: Optional[dict] = None, options_from: Union[Callable, str, None] = None,
                    defaults: Optional[dict] = None, needs_for: Optional[Callable] = None,
                    verify_options: tuple = (), l1_solver: Optional[Callable] = None,
                    fixed_scale_options: Optional[dict] = None):
    """Decorator registering a production solver as method ``name``.

    ``needs``: 'none' | 'diag' | 'gram' (statistics the pipeline collects); ``patterns``: the pattern kinds
    the solver handles (registered kinds only); ``structured``: it removes whole column groups (``patterns``
    must then include 'groups'); ``program``: ``(problem, pattern, **opts) -> Program``, the declarative model
    it solves or approximates; ``description``: one line for ``optprune list methods``; ``options``: help
    text per option (``{name: "help"}``) or explicit :class:`Option` declarations; ``options_from``: the
    function (or its name in the same module) whose signature lists the options, for a wrapper taking
    ``**options``; ``defaults``: option defaults overriding the signature's; ``needs_for``: ``(options) ->
    needs level`` for a method whose statistics depend on its options (it must give ``needs`` for the
    defaults); ``verify_options``: option sets (dicts) the cross-check runs besides the defaults (each may
    declare another program).
    """
    key = _key(name)
    if not _NAME_RE.match(key):
        raise RegistrationError(f"method name {name!r}: use lower-case letters, digits, '_', '+' or '-'")
    if needs not in NEEDS:
        raise RegistrationError(f"method {key!r}: needs={needs!r}; choose from {', '.join(NEEDS)}")
    if isinstance(patterns, str):
        patterns = (patterns,)
    kinds = pattern_kinds()
    bad = [p for p in patterns if p not in kinds]
    if bad or not patterns:
        raise RegistrationError(f"method {key!r}: unknown pattern kind{'s' if len(bad) > 1 else ''} "
                                f"{', '.join(map(repr, bad)) or '(none given)'}; registered kinds: {', '.join(kinds)}")
    if structured and "groups" not in patterns:
        raise RegistrationError(f"structured method {key!r} must accept the 'groups' pattern kind")
    if program is not None and not callable(program):
        raise RegistrationError(f"method {key!r}: program must be a function (problem, pattern, **opts) -> Program")
    if needs_for is not None and not callable(needs_for):
        raise RegistrationError(f"method {key!r}: needs_for must be a function (options) -> needs level")
    if isinstance(verify_options, dict) or not all(isinstance(o, dict) for o in verify_options):
        raise RegistrationError(f"method {key!r}: verify_options must be a tuple of option dicts")
    if l1_solver is not None and not callable(l1_solver):
        raise RegistrationError(f"method {key!r}: l1_solver must be a function (problem, lam) -> W")
    if fixed_scale_options is not None and not isinstance(fixed_scale_options, dict):
        raise RegistrationError(f"method {key!r}: fixed_scale_options must be an option dict")

    def deco(fn):
        if not callable(fn):
            raise RegistrationError(f"method {key!r}: register_method decorates a function, got {fn!r}")
        old = _METHODS.get(key)
        if old is not None and definition_site(old.fn) != definition_site(fn):
            raise RegistrationError(f"method name {key!r} is already taken by {old.fn.__module__}."
                                    f"{old.fn.__qualname__}; registered methods: {', '.join(sorted(_METHODS))}")
        spec = MethodSpec(key, fn, needs, frozenset(patterns), structured, program, description,
                          dict(defaults or {}), options_from, dict(options or {}), fn.__module__, needs_for,
                          tuple(dict(o) for o in verify_options), l1_solver,
                          None if fixed_scale_options is None else dict(fixed_scale_options))
        if not isinstance(options_from, str):
            _check_declared(spec)  # resolve now: an unknown option name raises at registration
        _METHODS[key] = spec
        return fn
    return deco


def _check_declared(spec: MethodSpec) -> None:
    """Resolve the options; the verify option sets, the fixed-scale options and ``needs_for`` must agree with
    them."""
    spec.options  # noqa: B018
    named = [("verify_options", o) for o in spec.verify_options]
    if spec.fixed_scale_options is not None:
        named.append(("fixed_scale_options", spec.fixed_scale_options))
    for what, o in named:
        try:
            spec.check_options(o)
        except UnknownOptionError as e:
            raise RegistrationError(f"{what}: {e}") from None
    if spec.needs_by_options is not None and spec.needs_for() != spec.needs:
        raise RegistrationError(f"method {spec.name!r}: needs={spec.needs!r} but needs_for gives "
                                f"{spec.needs_for()!r} for the default options")


def _import_package_modules(package) -> None:
    """Import every module of ``package`` (a subpackage of this one), in name order."""
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        full = f"{package.__name__}.{info.name}"
        try:
            importlib.import_module(full)
        except ModuleNotFoundError as e:
            root = (e.name or "").split(".")[0]
            if root and root not in ("optprune", "solvers", "formulations", "llm_adapters"):
                _report(full, e)  # an optional third-party dependency is missing: report, keep the rest
                continue
            raise


def _report(where: str, e: BaseException) -> None:
    msg = f"{type(e).__name__}: {e}"
    if _ERRORS.get(where) != msg:
        warnings.warn(f"optprune: {where} failed to import ({msg}); its methods/backends are unavailable",
                      stacklevel=3)
    _ERRORS[where] = msg


def _import_entry_points(group: str) -> None:
    from importlib.metadata import entry_points
    for ep in entry_points(group=group):
        try:
            ep.load()
        except (RegistrationError, PatternRegistrationError):  # the plug-in's own mistake: its author must see it
            raise
        except Exception as e:  # a broken plug-in must not take optprune down, but it is reported
            _report(f"plug-in {ep.value} ({group})", e)


def discover(force: bool = False, *, backends: bool = False) -> None:
    """Import the method modules of :mod:`optprune.solvers.methods` and the ``optprune.methods`` entry points
    (once; ``force`` imports modules added since, and re-reads the entry points, pattern plug-ins included);
    ``backends``: the backend modules and plug-ins as well."""
    if force:
        discover_patterns(force=True)
    _load("methods", force)
    if backends:
        _load("backends", force)


def _load(kind: str, force: bool = False) -> None:
    if (_state[kind] and not force) or kind in _state["loading"]:
        return
    _state["loading"].add(kind)
    try:
        if kind == "methods":
            _import_package_modules(methods)
            _import_entry_points(METHOD_ENTRY_POINTS)
            for spec in list(_METHODS.values()):
                _check_declared(spec)  # options_from names resolve now that every module is imported
        else:
            _import_package_modules(backends)
            _import_entry_points(BACKEND_ENTRY_POINTS)
        _state[kind] = True
    finally:
        _state["loading"].discard(kind)


@contextlib.contextmanager
def isolated():
    """Context manager restoring the method, backend and pattern registries on exit — for tests that register
    throw-away methods or patterns (plug-in authors' tests included)."""
    discover()
    _load("backends")  # loaded before the snapshot, or a backend loaded inside would vanish on exit
    saved = [(d, dict(d)) for d in (_METHODS, _BACKENDS, _ERRORS, *pattern_registries())]
    try:
        yield
    finally:
        for d, old in saved:
            d.clear()
            d.update(old)


def load_errors() -> dict:
    """Modules and plug-ins that failed to import: where -> one-line error."""
    return dict(_ERRORS)


def list_methods() -> list[str]:
    _load("methods")
    return sorted(_METHODS)


def method_specs() -> list[MethodSpec]:
    _load("methods")
    return [_METHODS[k] for k in sorted(_METHODS)]


def get_method(name: str) -> MethodSpec:
    _load("methods")
    key = _key(name)
    if key not in _METHODS:
        failed = "".join(f"; {w} failed to import ({m})" for w, m in _ERRORS.items())
        raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))}{failed}")
    return _METHODS[key]


def register_backend(cls):
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name == "backend":
        raise RegistrationError(f"backend class {cls.__qualname__} must set a name")
    old = _BACKENDS.get(name)
    if old is not None and definition_site(old) != definition_site(cls):
        raise RegistrationError(f"backend name {name!r} is already taken by {old.__module__}.{old.__qualname__}; "
                                f"registered backends: {', '.join(sorted(_BACKENDS))}")
    _BACKENDS[name] = cls
    return cls


def list_backends(available_only: bool = False) -> list[str]:
    _load("backends")
    return sorted(n for n, c in _BACKENDS.items() if not available_only or c.available())


def backend_classes() -> list[type]:
    _load("backends")
    return [_BACKENDS[k] for k in sorted(_BACKENDS)]


def get_backend(name: str):
    _load("backends")
    if name not in _BACKENDS:
        raise UnknownMethodError(f"unknown solver backend {name!r}; available: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name]()
