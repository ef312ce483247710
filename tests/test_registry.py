"""The method, backend and pattern registries refuse mistakes loudly, options are checked before anything
loads, plug-ins are discovered through entry points (and a broken one is reported), and ``optprune list``
shows what the registries hold."""
import inspect
import sys
import textwrap

import pytest
import torch

from optprune.cli import main
from optprune.formulations import NM, LayerProblem, Unstructured, parse_pattern
from optprune.formulations import patterns as P
from optprune.solvers import registry as R
from optprune.solvers.registry import (RegistrationError, UnknownMethodError, UnknownOptionError, get_method,
                                       list_methods, method_specs, register_method)


@pytest.fixture
def registries():
    """Leave the registries (and sys.modules) as they were."""
    before = set(sys.modules)
    with R.isolated():
        yield
    for name in set(sys.modules) - before:
        if name.startswith("plug"):
            sys.modules.pop(name, None)


def _solver(problem, pattern, *, k: int = 1, refit: bool = False):
    return get_method("magnitude")(problem, pattern)


# ------------------------------------------------------------------------------------------ registration
def test_unknown_pattern_kind_in_a_registration_names_the_kinds(registries):
    with pytest.raises(RegistrationError, match=r"unknown pattern kind '2:4'.*registered kinds: .*nm.*groups"):
        register_method("mine", patterns=("unstructured", "2:4"))(_solver)
    with pytest.raises(RegistrationError, match=r"unknown pattern kind 'unstructred'"):
        register_method("mine", patterns=("unstructred",))(_solver)
    assert "mine" not in R._METHODS


@pytest.mark.parametrize("kw, match", [
    (dict(options={"kk": "typo"}), r"help for unknown option 'kk'; its options: k, refit"),
    (dict(defaults={"refti": True}), r"default for unknown option 'refti'; its options: k, refit"),
    (dict(needs="hessian"), r"needs='hessian'; choose from none, diag, gram"),
    (dict(structured=True, patterns=("unstructured",)), r"must accept the 'groups' pattern kind"),
    (dict(verify_options=({"kk": 2},)), r"verify_options: .*no option 'kk'; its options: k=1, refit=False"),
    (dict(verify_options={"k": 2}), r"verify_options must be a tuple of option dicts"),
    (dict(needs="diag", needs_for=lambda o: "gram"), r"needs='diag' but needs_for gives 'gram'"),
    (dict(needs_for="gram"), r"needs_for must be a function"),
])
def test_misspelt_registrations_raise_with_the_valid_choices(registries, kw, match):
    with pytest.raises(RegistrationError, match=match):
        register_method("mine", **kw)(_solver)
    assert "mine" not in R._METHODS


def test_statistics_can_depend_on_the_options(registries):
    register_method("mine", needs="diag", needs_for=lambda o: "gram" if o["k"] > 1 else "diag",
                    verify_options=({"k": 3},))(_solver)
    spec = get_method("mine")
    assert spec.needs_for() == "diag" and spec.needs_for({"k": 3}) == "gram" and spec.verify_options == ({"k": 3},)
    with pytest.raises(RegistrationError, match="needs_for returned 'hessian'"):
        register_method("mine2", needs="diag", needs_for=lambda o: "hessian")(_solver)
    assert "mine2" not in R._METHODS


def test_option_choices_are_checked_before_the_solver_runs(registries):
    register_method("mine", options={"k": R.Option("k", help="how many", choices=(1, 2))})(_solver)
    spec = get_method("mine")
    assert spec.options["k"].default == 1 and spec.options["k"].type is int  # from the signature
    spec.check_options({"k": 2})
    with pytest.raises(UnknownOptionError, match=r"option k=3; choose one of 1, 2"):
        spec.check_options({"k": 3})
    with pytest.raises(UnknownOptionError, match=r"option mask='Errors '.*choose one of score, error"):
        get_method("eggs").check_options({"mask": "Errors "})
    get_method("eggs").check_options({"mask": " Error", "update": "OBS"})  # case and spaces as the solver reads
    with pytest.raises(UnknownOptionError, match=r"option update='sgd'; choose one of none, refit, obs, admm"):
        get_method("eggs_update").check_options({"update": "sgd"})


def test_misspelt_keyword_and_bad_solver_signatures_raise(registries):
    with pytest.raises(TypeError):  # pattern= for patterns=: no catch-all keyword swallows it any more
        register_method("mine", pattern=("nm",))
    with pytest.raises(RegistrationError, match="needs a default"):
        register_method("mine")(lambda problem, pattern, *, k: None)
    with pytest.raises(RegistrationError, match=r"takes \*\*options; declare them"):
        register_method("mine")(lambda problem, pattern, **opts: None)
    with pytest.raises(RegistrationError, match="method name 'Bad Name'"):
        register_method("Bad Name")(_solver)


def test_duplicate_name_raises_but_a_reimport_of_the_same_function_does_not(registries):
    with pytest.raises(RegistrationError, match=r"'magnitude' is already taken by .*baselines\.magnitude"):
        register_method("magnitude", needs="none")(_solver)
    with pytest.raises(RegistrationError, match="already taken"):
        register_method("MAGNITUDE ", needs="none")(_solver)  # names are case- and space-insensitive
    assert get_method("magnitude").fn.__name__ == "magnitude"
    original = get_method("magnitude")
    register_method("magnitude", needs="none")(original.fn)  # the same function again (module imported twice)


def test_options_from_names_the_real_signature(registries):
    def _impl(problem, pattern, *, depth: int = 2):
        return get_method("magnitude")(problem, pattern)

    def wrapper(problem, pattern, **options):
        return _impl(problem, pattern, **options)

    register_method("wrapped", options_from=_impl, options={"depth": "how deep"})(wrapper)
    spec = get_method("wrapped")
    assert list(spec.options) == ["depth"] and spec.options["depth"].help == "how deep"
    with pytest.raises(UnknownOptionError, match="no option 'dpth'; its options: depth=2"):
        spec(LayerProblem.random(4, 8), Unstructured(0.5), dpth=3)


# ------------------------------------------------------------------------------------------ options
def test_every_method_refuses_an_unknown_option_and_no_solver_swallows_keywords():
    p, pat = LayerProblem.random(8, 16, seed=1), NM(2, 4)
    specs = method_specs()
    assert {"magnitude", "wanda", "sparsegpt", "fista", "eggs", "spap"} <= {s.name for s in specs}
    for spec in specs:
        with pytest.raises(UnknownOptionError, match=f"method '{spec.name}' has no option 'bogus'"):
            spec(p, pat, bogus=1)
        if spec.options_from is None:  # the solver itself: an unknown keyword is a TypeError, not ignored
            kinds = [q.kind for q in inspect.signature(spec.fn).parameters.values()]
            assert inspect.Parameter.VAR_KEYWORD not in kinds, spec.name


def test_option_types_are_checked():
    p, pat = LayerProblem.random(8, 16, seed=1), NM(2, 4)
    with pytest.raises(UnknownOptionError, match="option blocksize expects int, got 'x'"):
        get_method("sparsegpt")(p, pat, blocksize="x")
    with pytest.raises(UnknownOptionError, match="option refit expects bool"):
        get_method("magnitude")(p, pat, refit=3)
    a = get_method("ria")(p, pat, a=1).mask  # an int where a float is declared is fine
    assert torch.equal(a, get_method("ria")(p, pat, a=1.0).mask)


def test_registry_defaults_override_the_signature(registries):
    register_method("mag-refit", needs="none", defaults={"refit": True})(get_method("magnitude").fn)
    spec, p, pat = get_method("mag-refit"), LayerProblem.random(8, 16, seed=2), Unstructured(0.5)
    assert spec.options["refit"].default is True
    assert spec(p, pat).info["refit_improved"] is not None  # the refit ran
    assert "refit_improved" not in get_method("magnitude")(p, pat).info


# ------------------------------------------------------------------------------------------ the CLI
def _no_model_load(monkeypatch):
    import optprune.llm_adapters.loading as loading

    def boom(*a, **k):
        raise FileNotFoundError("load_model was called")
    monkeypatch.setattr(loading, "load_model", boom)


def test_cli_unknown_option_exits_2_with_one_line_before_anything_loads(tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    missing = tmp_path / "no-such-model"
    rc = main(["prune", "--model", str(missing), "--method", "wanda", "-O", "bogus=1", "--output",
               str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("optprune prune: error: ")
    assert "no option 'bogus'" in err and "refit=False" in err
    assert "load_model was called" not in err and str(missing) not in err
    assert not (tmp_path / "out").exists()
    # with a valid option the same command gets past the option check and reaches the model instead
    rc = main(["prune", "--model", str(missing), "--method", "wanda", "-O", "refit=true"])
    err = capsys.readouterr().err
    assert rc == 2 and "no option" not in err
    assert "load_model was called" in err or f"no model at {missing}" in err  # the model check, not the options


@pytest.mark.parametrize("opt, match", [("refit", "is not key=value"), ("=1", "is not key=value"),
                                        ("refit=2", "expects bool")])
def test_cli_malformed_options_exit_2(opt, match, capsys, tmp_path):
    assert main(["prune", "--model", str(tmp_path / "m"), "--method", "magnitude", "-O", opt]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err


def test_cli_option_given_twice_and_dashes(capsys, tmp_path):
    argv = ["prune", "--model", str(tmp_path / "m"), "--method", "fista", "-O", "lam-step=2", "-O", "lam_step=3"]
    assert main(argv) == 2 and "'lam_step' is given twice" in capsys.readouterr().err


def test_api_checks_options_before_the_model(tmp_path, monkeypatch):
    _no_model_load(monkeypatch)
    from optprune.llm_adapters.run import prune
    with pytest.raises(UnknownOptionError, match="no option 'bogus'"):
        prune(str(tmp_path / "m"), "sparsegpt", method_options={"bogus": 1}, evaluate=False)


# ------------------------------------------------------------------------------------------ discovery
def _plugin(root, dist, group, modules: dict, entries: dict):
    for name, code in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(code))
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))


def test_entry_point_plugins_are_discovered_and_a_broken_one_is_reported(registries, tmp_path, monkeypatch):
    _plugin(tmp_path, "plugdist", R.METHOD_ENTRY_POINTS, {
        "plug_good": """
            from optprune.solvers.registry import register_method
            from optprune.solvers.methods.baselines import magnitude

            @register_method("plug-magnitude", needs="none", description="magnitude, from a plug-in")
            def plug(problem, pattern, *, refit: bool = False):
                return magnitude(problem, pattern, refit=refit)
            """,
        "plug_broken": "import a_package_that_is_not_installed\n"},
        {"good": "plug_good", "broken": "plug_broken"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(UserWarning, match="plug_broken.*failed to import"):
        R.discover(force=True)
    assert "plug-magnitude" in list_methods()
    p, pat = LayerProblem.random(8, 16, seed=4), NM(2, 4)
    assert torch.equal(get_method("plug-magnitude")(p, pat).mask, get_method("magnitude")(p, pat).mask)
    errors = R.load_errors()
    assert any("plug_broken" in k and "a_package_that_is_not_installed" in v for k, v in errors.items())
    with pytest.raises(UnknownMethodError, match="plug_broken.*failed to import"):
        get_method("plug-missing")
    assert main(["list", "methods"]) == 0


def test_a_plugin_registration_error_is_not_swallowed(registries, tmp_path, monkeypatch):
    _plugin(tmp_path, "plugclash", R.METHOD_ENTRY_POINTS, {"plug_clash": """
            from optprune.solvers.registry import register_method

            @register_method("wanda", needs="diag")
            def wanda(problem, pattern):
                return None
            """}, {"clash": "plug_clash"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RegistrationError, match="'wanda' is already taken"):
        R.discover(force=True)


# ------------------------------------------------------------------------------------------ patterns
def test_pattern_registry_is_loud(registries):
    with pytest.raises(P.PatternRegistrationError, match="'nm' is already registered by .*NM"):
        P.register_pattern(type("Other", (NM,), {"kinds": ("nm",), "parse": classmethod(lambda c, *a, **k: None)}))
    with pytest.raises(P.PatternRegistrationError, match="does not define project, is_feasible, constraints"):
        P.register_pattern(type("Half", (P.Pattern,), {"kinds": ("half",),
                                                      "parse": classmethod(lambda c, *a, **k: None)}))
    with pytest.raises(P.PatternRegistrationError, match="must declare kinds"):
        P.register_pattern(type("NoKind", (NM,), {}))
    assert "half" not in P.pattern_kinds()


def test_parse_pattern_dispatch_and_unused_parameters():
    assert parse_pattern("2:4").kind == "nm" and parse_pattern("2:4", min_degree=1).kind == "expander"
    assert parse_pattern("row", 0.3).kind == "row" and parse_pattern(None).kind == "unstructured"
    assert parse_pattern("groups", 0.5, group_size=4).kind == "groups"
    with pytest.raises(P.PatternError, match=r"min_degree does not apply to the unstructured pattern \(it applies "
                                             r"to: expander\)"):
        parse_pattern("unstructured", 0.5, min_degree=2)
    with pytest.raises(P.PatternError, match=r"unknown pattern 'diagonal'; use .*N:M.*groups"):
        parse_pattern("diagonal")


# ------------------------------------------------------------------------------------------ optprune list
def test_list_methods_shows_every_method_with_its_options_and_defaults(capsys):
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out.splitlines()
    for spec in method_specs():
        line = [l for l in out if l.split()[0] == spec.name]
        assert len(line) == 1, spec.name
        assert spec.description[:20] in line[0]
        for name in spec.options:
            assert f"{name}=" in line[0], (spec.name, name)
    fista = next(l for l in out if l.startswith("fista "))
    assert "iters=20" in fista and "warm_start=sparsegpt" in fista


def test_list_patterns_backends_architectures(capsys):
    from optprune.llm_adapters.architectures import ARCHITECTURES
    assert main(["list", "patterns"]) == 0
    out = capsys.readouterr().out
    for kind in P.pattern_kinds():
        assert kind in out
    assert "N:M, e.g. 2:4" in out and "min_degree" in out
    assert main(["list", "backends"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in R.list_backends():
        line = next(l for l in lines if l.split()[0] == name)
        available = get_backend_cls(name).available()
        assert ("not installed" not in line) == available and "kinds:" in line
    assert main(["list", "architectures"]) == 0
    out = capsys.readouterr().out.splitlines()
    for name, arch in ARCHITECTURES.items():
        line = next(l for l in out if l.split()[0] == name)
        assert all(t in line for t in arch.model_types)
    assert out[-1].startswith("inferred: any model with q/k/v/o+gate/up/down, fc1/fc2 or Conv1D")
    assert main(["list"]) == 0
    allout = capsys.readouterr().out
    assert all(f"{s}:" in allout for s in ("methods", "patterns", "backends", "architectures"))


def get_backend_cls(name):
    return R._BACKENDS[name]


# ------------------------------------------------------------------------------------------------ ranges, booleans
def test_ranges_parse_as_intervals_and_bound_both_ends():
    from optprune.solvers.registry import Range
    r = Range("(0, 1]")
    assert 1 in r and 0.5 in r and 0 not in r and 1.0001 not in r and str(r) == "(0, 1]"
    r = Range("[1, inf)")
    assert 1 in r and 10 ** 12 in r and 0 not in r and float("inf") not in r
    for bad in ("1..5", "[1, 0]", "[a, 2)", "[inf, inf)"):
        with pytest.raises(RegistrationError):
            Range(bad)


@pytest.mark.parametrize("value, want", [(True, True), (False, False), (1, True), (0, False), ("true", True),
                                         ("No", False), (" on ", True), ("OFF", False), ("1", True), ("0", False)])
def test_booleans_are_parsed_never_truthy(value, want):
    from optprune.solvers.registry import check_value
    assert check_value("x", value, type=bool) is want


@pytest.mark.parametrize("value", ["maybe", "", 2, -1, 0.5, [], "false!"])
def test_unparseable_booleans_are_refused(value):
    from optprune.solvers.registry import check_value
    with pytest.raises(ValueError, match="x expects bool"):
        check_value("x", value, type=bool)


def test_check_value_reads_integers_from_strings_and_names_the_range():
    from optprune.solvers.registry import check_value
    assert check_value("--nsamples", "32", type=int, range="[1, inf)") == 32
    assert check_value("--damp", 1, type=float, range="[0, inf)") == 1
    with pytest.raises(ValueError, match=r"--nsamples=0 is out of range; allowed: an integer in \[1, inf\)"):
        check_value("--nsamples", 0, type=int, range="[1, inf)")
    with pytest.raises(ValueError, match="expects int, got 'many'"):
        check_value("--nsamples", "many", type=int)
    with pytest.raises(ValueError, match="expects int, got True"):
        check_value("--nsamples", True, type=int)
    assert check_value("--seed", None, type=int) is None


def test_declared_ranges_are_checked_and_listed():
    p, pat = LayerProblem.random(8, 16, seed=1), NM(2, 4)
    spec = get_method("sparsegpt")
    assert str(spec.options["blocksize"].range) == "[1, inf)" and spec.options["blocksize"].default == 128
    for bad in ({"blocksize": 0}, {"blocksize": -1}, {"damp": -0.1}):
        with pytest.raises(UnknownOptionError, match="method 'sparsegpt': option .* is out of range"):
            spec(p, pat, **bad)
    assert spec.normalize_options({"refit": "off", "blocksize": 4}) == {"refit": False, "blocksize": 4}
    from optprune.catalog import lines
    assert any(ln.startswith("sparsegpt ") and "blocksize=128 [1, inf)" in ln for ln in lines("methods"))


def test_a_range_must_fit_the_option():
    from optprune.solvers.registry import Option, isolated

    def solver(problem, pattern, *, k: int = 2, name: str = "a"):
        return get_method("magnitude")(problem, pattern)
    with isolated():
        with pytest.raises(RegistrationError, match="option 'name' declares the range"):
            register_method("ranged-str", needs="none", options={"name": Option(range="[0, 1]")})(solver)
        with pytest.raises(RegistrationError, match=r"option k=2 is out of range.*\(the default\)"):
            register_method("ranged-default", needs="none", options={"k": Option(range="[3, inf)")})(solver)
        register_method("ranged-ok", needs="none", options={"k": Option(help="k", range="[1, 4]")})(solver)
        assert str(get_method("ranged-ok").options["k"].range) == "[1, 4]"
