import pytest

from edgetl.errors import UsageError
from edgetl.profiles import load_profile
from edgetl.recipe import BuildRecipe, load_recipe, template


def test_defaults_validate():
    r = load_recipe()
    assert r.model.backbone == "mobilenet_v2" and r.targets == ["cpu"] and r.data.path is None


def test_unknown_key_is_named(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text("[train]\nepochz = 3\n")
    with pytest.raises(UsageError, match=r"r.toml: unknown key 'train.epochz'"):
        load_recipe(f)


def test_bad_value_and_bad_toml(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('[train]\nstrategy = "magic"\n')
    with pytest.raises(UsageError, match="train.strategy"):
        load_recipe(f)
    f.write_text("[train\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_recipe(f)
    with pytest.raises(UsageError, match="not found"):
        load_recipe(tmp_path / "missing.toml")


def test_flags_override_file(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('seed = 3\n[model]\nbackbone = "efficientnet_b0"\n')
    r = load_recipe(f, {"model.backbone": "mobilenet_v2", "targets": ("cpu",), "train.epochs": None})
    assert r.seed == 3 and r.model.backbone == "mobilenet_v2" and r.train.epochs == BuildRecipe().train.epochs


def test_template_is_the_defaults(tmp_path):
    f = tmp_path / "edgetl.toml"
    f.write_text(template())
    r = load_recipe(f)
    assert r.out == tmp_path / "edgetl-out"  # relative to the recipe file
    assert r.model_copy(update={"out": BuildRecipe().out}) == BuildRecipe()


def test_profiles(tmp_path):
    p = load_profile("cpu")
    assert p.backend == "onnxruntime" and p.quantization.per_channel
    with pytest.raises(UsageError, match="unknown target"):
        load_profile("tpu")
    bad = tmp_path / "mine.toml"
    bad.write_text('name = "x"\nbackend = "onnxruntime"\nwhat = 1\n[quantization]\nquantizers = ["ort_static"]\n')
    with pytest.raises(UsageError, match="unknown key 'what'"):
        load_profile(str(bad))


def test_paths_in_a_recipe_are_relative_to_it(tmp_path):
    (tmp_path / "cfg").mkdir()
    f = tmp_path / "cfg" / "r.toml"
    f.write_text('out = "build"\n[data]\npath = "../imgs"\n')
    r = load_recipe(f, {"model.weights": "w.pth"})
    assert r.data.path == tmp_path / "cfg" / ".." / "imgs"
    assert r.out == tmp_path / "cfg" / "build"
    assert str(r.model.weights) == "w.pth"  # a flag stays relative to the working directory
