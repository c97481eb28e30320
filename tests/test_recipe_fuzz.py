"""Fuzzing the recipe and profile loaders: every malformed input is a UsageError (exit 2) that names the
file and the key, on one line; never another exception (exit 3 and a traceback)."""

from __future__ import annotations

import datetime as dt
import os
import sys
import typing
from pathlib import Path

import pytest
import tomli_w
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from edgetl.cli import cli
from edgetl.errors import UsageError
from edgetl.profiles import TargetProfile, load_profile
from edgetl.recipe import CLI_KEYS, BuildRecipe, format_key, load_recipe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# CI: the same 200 examples every run. EDGETL_FUZZ=N (benchmarks/fuzz.sh): N fresh random examples.
_RANDOM = int(os.environ.get("EDGETL_FUZZ", "0"))
FUZZ = settings(max_examples=_RANDOM or 200, deadline=None, derandomize=not _RANDOM, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# --- values: right types, wrong types, edge cases --------------------------------------------------------------

PATHS = ["", ".", "imgs", "../imgs", "/abs/dir", "~", "~/x", "~nosuchuser-edgetl/x", "a\x00b", "~\x00", "w.pth",
         "mine.toml", "sub/p.toml", "x\ny"]
STRINGS = st.one_of(st.text(max_size=10), st.sampled_from(PATHS + ["cpu", "gpu", "openvino", "fine-tune", "auto",
                                                                     "cuda:0", "int8", "fp16", "CPU", "nan"]))
SCALARS = st.one_of(
    STRINGS,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 7, 2**31, 2**32, 2**63 - 1, -(2**63), 10**40, 10**300]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-300, 1e300]),
    st.booleans(),
    st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30)),
    st.datetimes(timezones=st.just(dt.timezone.utc), min_value=dt.datetime(1, 1, 2),
                 max_value=dt.datetime(9999, 12, 30)),
    st.dates(),
    st.times(),
)
RECIPE_NAMES = sorted({n for m in (BuildRecipe, *[f.annotation for f in BuildRecipe.model_fields.values()
                                                  if isinstance(f.annotation, type)
                                                  and issubclass(f.annotation, BaseModel)])
                       for n in m.model_fields})
KEYS = st.one_of(st.sampled_from(RECIPE_NAMES + ["quantization", "runtime", "tolerances", "provider_options",
                                                 "config", "quantizers", "name", "backend", "precisions"]),
                 st.text(max_size=6))
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(st.dictionaries(KEYS, inner, max_size=3), min_size=1, max_size=2),  # an array of tables
        st.dictionaries(KEYS, inner, max_size=3),
    ),
    max_leaves=6,
)

# Plausible values for fields the annotation alone says too little about.
PLAUSIBLE = {
    "targets": st.lists(st.sampled_from(["cpu", "gpu", "openvino", "mine.toml", "sub/p.toml", "/abs/p.toml"]),
                        min_size=1, max_size=3),
    "device": st.sampled_from(["auto", "cpu", "cuda", "cuda:1", "CPU", "GPU", "GPU.1", "AUTO:GPU,CPU"]),
    "backbone": st.sampled_from(["mobilenet_v2", "efficientnet_b0", "nope"]),
    "name": st.sampled_from(["cpu", "mine", "x-1", "bad name"]),
    "backend": st.sampled_from(["onnxruntime", "openvino", "tflite"]),
    "quantizers": st.lists(st.sampled_from(["nncf_ptq", "ort_static+head_refit", "qat", "mixed_precision"]),
                           min_size=1, max_size=3, unique=True),
    "providers": st.lists(st.sampled_from(["CPUExecutionProvider", "CUDAExecutionProvider"]), min_size=1,
                          max_size=2),
    "validate_providers": st.lists(st.just("CPUExecutionProvider"), min_size=1, max_size=1),
    "float_op_types": st.lists(st.sampled_from(["Gemm", "Conv"]), max_size=2),
    "provider_options": st.dictionaries(st.sampled_from(["CPUExecutionProvider", "CUDAExecutionProvider"]),
                                        st.dictionaries(st.text(max_size=5), SCALARS, max_size=2), max_size=2),
    "config": st.dictionaries(st.text(max_size=5), VALUES, max_size=2),
}


def _strip_optional(ann):
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    return args[0] if typing.get_origin(ann) in (typing.Union, getattr(__import__("types"), "UnionType", None)) \
        and len(args) == 1 else ann


def _submodel(ann):
    ann = _strip_optional(ann)
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _bounds(metadata) -> tuple[float | None, float | None]:
    lo = [getattr(m, a) for m in metadata for a in ("ge", "gt") if getattr(m, a, None) is not None]
    hi = [getattr(m, a) for m in metadata for a in ("le", "lt") if getattr(m, a, None) is not None]
    return (lo[0] if lo else None), (hi[0] if hi else None)


def _plausible(name: str, ann, metadata=()) -> st.SearchStrategy:
    """Mostly values the field takes, some just outside its bounds."""
    if name in PLAUSIBLE:
        return PLAUSIBLE[name]
    ann = _strip_optional(ann)
    lo, hi = _bounds(metadata)
    if ann is int and (lo is not None or hi is not None):
        lo, hi = int(lo if lo is not None else -10), int(hi if hi is not None else lo + 1000)
        return st.integers(lo - 1, min(hi, lo + 100) + 1)
    if ann is float and (lo is not None or hi is not None):
        lo = lo if lo is not None else -1.0
        return st.floats(lo - 1e-3, (hi if hi is not None else lo + 100) + 1e-3)
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return st.sampled_from(typing.get_args(ann))
    if origin is list:
        return st.lists(_plausible("", typing.get_args(ann)[0]), min_size=1, max_size=3, unique=True)
    if ann is bool:
        return st.booleans()
    if ann is int:
        return st.one_of(st.integers(-2, 70), st.integers(0, 5000))
    if ann is float:
        return st.one_of(st.floats(0, 1), st.floats(-1, 1000, allow_nan=False))
    if ann is Path:
        return st.sampled_from(PATHS)
    return STRINGS


def table(model: type[BaseModel], required: tuple[str, ...] = (), wrong: int = 4) -> st.SearchStrategy[dict]:
    """A TOML table close to `model`: its own keys, each with a wrong value one time in `wrong` (else a plausible
    one), and sometimes random extra keys. Near-valid tables (`wrong` large) have the model's required keys."""
    if wrong > 10:
        required = (*required, *(n for n, info in model.model_fields.items() if info.is_required()))
    fields = {}
    for name, info in model.model_fields.items():
        if info.exclude:
            continue
        sub = _submodel(info.annotation)
        right = table(sub, wrong=wrong) if sub is not None else _plausible(name, info.annotation, info.metadata)
        fields[name] = st.integers(1, wrong).flatmap(lambda i, right=right: VALUES if i == 1 else right)
    base = st.fixed_dictionaries({k: v for k, v in fields.items() if k in required},
                                 optional={k: v for k, v in fields.items() if k not in required})
    extras = st.integers(1, wrong).flatmap(lambda i: st.dictionaries(KEYS, VALUES, max_size=2) if i == 1
                                           else st.just({}))
    return st.tuples(base, extras).map(lambda t: {**t[1], **t[0]})


RECIPES = st.one_of(table(BuildRecipe), table(BuildRecipe, wrong=25), st.dictionaries(KEYS, VALUES, max_size=4))
PROFILES = st.one_of(table(TargetProfile, required=("name", "backend")),
                     table(TargetProfile, required=("name", "backend", "quantization"), wrong=25),
                     table(TargetProfile),
                     st.dictionaries(KEYS, VALUES, max_size=4))
OVERRIDE_KEYS = st.one_of(st.sampled_from(sorted(set(CLI_KEYS.values()))),
                          st.sampled_from(["data", "train", "compute", "data.path.x", "seed.x", "targets.x", "nosuch",
                                           "nosuch.key", "model.weights.deep.er", "", "a..b", "data."]),
                          st.lists(KEYS, min_size=1, max_size=3).map(".".join))
OVERRIDE_VALUES = st.one_of(
    st.none(), st.just(()), st.builds(Path, st.sampled_from(PATHS[1:])), st.integers(-(2**40), 2**40),
    st.booleans(), STRINGS, st.lists(STRINGS, max_size=2).map(tuple), st.lists(st.integers(), max_size=2),
    st.floats(), st.dictionaries(KEYS, SCALARS, max_size=2),
)
OVERRIDES = st.one_of(st.just({}), st.dictionaries(OVERRIDE_KEYS, OVERRIDE_VALUES, max_size=3))


# --- the property ---------------------------------------------------------------------------------------------

def _key_paths(obj, prefix=()):
    if prefix:
        yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _key_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _key_paths(v, (*prefix, i))


def _check_error(msg: str, source: str, keys: set[tuple]) -> None:
    assert "\n" not in msg and "\r" not in msg, f"not one line: {msg!r}"
    assert source in msg, f"source {source!r} not named: {msg!r}"
    named = [k for k in keys if f"'{format_key(k)}'" in msg]
    assert named, f"no key of the input named: {msg!r}"


@FUZZ
@given(doc=RECIPES, overrides=OVERRIDES)
def test_fuzz_recipe(tmp_path, doc, overrides):
    f = tmp_path / "recipe.toml"
    text = tomli_w.dumps(doc)
    f.write_text(text, encoding="utf-8")
    parsed = tomllib.loads(text)
    try:
        r = load_recipe(f, overrides)
    except UsageError as e:
        keys = set(_key_paths(parsed))
        for dotted, value in overrides.items():
            if value is not None and value != ():
                parts = tuple(dotted.split("."))
                keys |= {parts[:i] for i in range(1, len(parts) + 1)}
                keys |= {(*parts, *k) for k in _key_paths(list(value) if isinstance(value, tuple) else value)}
        _check_error(str(e), str(f), keys)
    else:
        assert isinstance(r, BuildRecipe)
        for p in (r.out, r.data.path, r.model.weights, r.compute.cache_dir):
            assert p is None or "\x00" not in str(p)


@FUZZ
@given(doc=PROFILES)
def test_fuzz_profile(tmp_path, doc):
    f = tmp_path / "profile.toml"
    text = tomli_w.dumps(doc)
    f.write_text(text, encoding="utf-8")
    try:
        p = load_profile(str(f))
    except UsageError as e:
        # Besides the input's own keys: required ones it lacks, and [quantization] that int8 asks for.
        keys = set(_key_paths(tomllib.loads(text))) | {("name",), ("backend",), ("quantization",),
                                                        ("quantization", "quantizers")}
        _check_error(str(e), str(f), keys)
    else:
        assert isinstance(p, TargetProfile) and p.source == str(f)


# --- regressions ----------------------------------------------------------------------------------------------

def test_array_of_tables_section_is_exit_2_via_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("recipe.toml").write_text('[[data]]\npath = "x"\n', encoding="utf-8")
    for extra in ([], ["--data", "somedir"]):
        res = CliRunner().invoke(cli, ["build", "recipe.toml", *extra])
        assert res.exit_code == 2, res.output
        assert "Traceback" not in res.output and "internal error" not in res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and "recipe.toml" in lines[0] and "'data'" in lines[0], res.output
    with pytest.raises(UsageError, match=r"recipe.toml.*'data'.*\[\[data\]\]"):
        load_recipe(Path("recipe.toml"), {"data.path": Path("d")})


@pytest.mark.parametrize("text, named", [
    ('name = "bad"\nbackend = "onnxruntime"\n[[quantization]]\nquantizers = ["x"]\n', "'quantization'"),
    ('name = "bad"\nbackend = "onnxruntime"\nprecisions = ["fp32"]\n[runtime]\nconfig = { when = 1979-05-27 }\n',
     "'runtime.config'"),
    ("opset = " + "1" * 5000 + "\n", "4300 digits"),  # the parser's ValueError (was exit 3)
])
def test_bad_profile_is_exit_2_via_the_cli(tmp_path, monkeypatch, text, named):
    """prepare() loads every profile first: a bad one stops the build before weights, data or training."""
    monkeypatch.chdir(tmp_path)
    Path("bad.toml").write_text(text, encoding="utf-8")
    res = CliRunner().invoke(cli, ["build", "--target", "bad.toml", "--device", "cpu", "--data", "nowhere", "-q"])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "internal error" not in res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "bad.toml" in lines[0] and named in lines[0], res.output


@pytest.mark.parametrize("text, key", [
    ('[[data]]\npath = "x"\n', "data"),
    ('data = "imgs"\n', "data"),
    ("train = 3\n", "train"),
    ("[compute]\ncache_dir = 1979-05-27\n", "compute.cache_dir"),
    ('targets = "cpu"\n', "targets"),
    ("targets = [1, 2]\n", "targets.0"),
    ('targets = ["cpu\\u0000"]\n', "targets"),
    ("out = 5\n", "out"),
    ('out = "~nosuchuser-edgetl/x"\n', "out"),
    ('[data]\npath = "~\\u0000"\n', "data.path"),
    ('[model]\nweights = "a\\u0000b"\n', "model.weights"),
    ("seed = 99999999999999999999999999999999999999\n", "seed"),
    ("[train]\nlr = nan\n", "train.lr"),
    ("[compute]\ntimeout_s = inf\n", "compute.timeout_s"),
    ('[train]\n"ep\\nochs" = 3\n', 'train."ep\\nochs"'),
])
def test_malformed_recipes(tmp_path, text, key):
    _refused_naming(tmp_path / "r.toml", text, key, load_recipe)


def _refused_naming(f, text: str, key: str, load) -> None:
    """`load(f)` of a file holding `text` is one UsageError line naming the file and `key`."""
    f.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError) as e:
        load(f)
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg and f"'{key}'" in msg, msg


@pytest.mark.parametrize("text, overrides, key", [
    ('data = "imgs"\n', {"data.path": Path("d")}, "data"),
    ("[train]\nepochs = [[1]]\n", {"train.epochs.x": 3}, "train.epochs"),
    ("", {"seed.x": 1}, "seed"),
    ("", {"targets": "cpu"}, "targets"),
    ("", {"data.path": Path("a\x00b")}, "data.path"),
])
def test_malformed_overrides(tmp_path, text, overrides, key):
    _refused_naming(tmp_path / "r.toml", text, key, lambda f: load_recipe(f, overrides))


@pytest.mark.parametrize("text", ["seed = " + "9" * 5000 + "\n", "a = " + "[" * 20000 + "]" * 20000 + "\n"])
def test_toml_the_parser_cannot_take(tmp_path, text):
    f = tmp_path / "r.toml"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError, match="r.toml"):
        load_recipe(f)
    with pytest.raises(UsageError, match="r.toml"):
        load_profile(str(f))


@pytest.mark.parametrize("text, key", [
    ('backend = "onnxruntime"\nprecisions = ["fp16"]\n', "name"),
    ('name = "x"\nbackend = "onnxruntime"\n', "quantization"),
    ('name = "x"\nbackend = "onnxruntime"\n[[quantization]]\nquantizers = ["nncf_ptq"]\n', "quantization"),
    ('name = "x"\nbackend = "onnxruntime"\nruntime = "CPU"\nprecisions = ["fp16"]\n', "runtime"),
    ('name = "x"\nbackend = "onnxruntime"\nprecisions = ["fp16", "fp16"]\n', "precisions"),
    ('name = "x"\nbackend = "b"\n[quantization]\nquantizers = ["q", "q"]\n', "quantization.quantizers"),
    ('name = "x"\nbackend = "b"\nprecisions = ["fp32"]\n[runtime.provider_options]\nA = 1\n',
     "runtime.provider_options.A"),
    ('name = "x"\nbackend = "b"\nprecisions = ["fp32"]\n[runtime.config]\nwhen = 1979-05-27\n', "runtime.config"),
    ('name = "x"\nbackend = "b"\nprecisions = ["fp32"]\n[tolerances]\nexport_atol = inf\n', "tolerances.export_atol"),
])
def test_malformed_profiles(tmp_path, text, key):
    _refused_naming(tmp_path / "p.toml", text, key, lambda f: load_profile(str(f)))


def test_builtin_profiles_still_load():
    from edgetl.profiles import builtin_names

    for name in builtin_names():
        assert load_profile(name).name == name
