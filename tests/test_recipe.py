from pathlib import Path

import pytest

from squat_cli.errors import RecipeError
from squat_cli.recipe import QUANTIZE_DEFAULTS, Recipe, load_recipe, parse_override

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def test_recipes_exist():
    names = {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES}
    assert {"finetune.yaml", "quantize/w2a8.yaml", "quantize/w3a8.yaml", "quantize/w4a8.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_every_recipe_loads(path):
    from squat_cli.sweep import is_grid_recipe, load_grid, plan

    if is_grid_recipe(path):
        assert plan(load_grid(path))  # validates every recipe the grid would run
    else:
        r = load_recipe(path, base=QUANTIZE_DEFAULTS if "quantize" in path.parts else None)
        assert isinstance(r, Recipe)
        assert r.sam.rho is not None and r.sam.rho >= 0


def test_finetune_recipe_is_paper_setup():
    r = load_recipe(REPO / "recipes" / "finetune.yaml")
    assert r.model.name_or_path == "bert-base-uncased"
    assert r.train.epochs == 5
    assert r.quant is None


@pytest.mark.parametrize("bits,rho", [(2, 0.1), (3, 0.1), (4, 0.15)])
def test_quantize_recipes_are_paper_setup(bits, rho):
    r = load_recipe(REPO / "recipes" / "quantize" / f"w{bits}a8.yaml", base=QUANTIZE_DEFAULTS)
    assert (r.quant.wbits, r.quant.abits) == (bits, 8)
    assert r.sam.rho == rho
    assert (r.train.optimizer, r.train.lr, r.train.scheduler, r.train.epochs) == ("adam", 1e-5, "cosine", 32)


def test_default_rho_follows_bits():
    assert load_recipe(overrides={"quant.wbits": 2}).sam.rho == 0.1
    assert load_recipe(overrides={"quant.wbits": 4}).sam.rho == 0.15


def test_unknown_key_names_key_and_allowed(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert msg.startswith("train.learning_rate: unknown key")
    assert "lr" in msg and "\n" not in msg


def test_unknown_section(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("optim:\n  lr: 0.1\n")
    with pytest.raises(RecipeError, match=r"^optim: unknown key; allowed: model, data, train, quant, sam"):
        load_recipe(p)


@pytest.mark.parametrize(
    "sets,match",
    [
        (["train.scheduler=step"], r"train.scheduler: 'step' is not valid; expected one of linear, cosine, constant"),
        (["train.batch_size=abc"], r"train.batch_size: 'abc' is not valid; expected an integer"),
        (["train.batch_size=0"], r"train.batch_size: 0 must be > 0"),
        (["quant.wbits=9"], r"quant.wbits: 9 is outside 2..8"),
        (["quant.abits=1"], r"quant.abits: 1 is outside 2..32"),
        (["sam.rho=-0.1"], r"sam.rho: -0.1 must be >= 0"),
        (["quant.method=foo"], r"quant.method: 'foo' is not valid; expected one of ptq, q8bert, gobo"),
        (["train.lr"], r"--set 'train.lr': expected key=value"),
        (["train.aux_precision=fp16"], r"train.aux_precision: 'fp16' is not valid; expected one of same, bf16"),
        (["model.trust_remote_code=maybe"], r"model.trust_remote_code: 'maybe' is not valid; expected true or false"),
    ],
)
def test_bad_values(sets, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(sets=sets)


def test_set_overrides_and_types():
    r = load_recipe(sets=["train.lr=1e-5", "train.epochs=3", "data.train_subset=100", "data.eval_subset=null"])
    assert r.train.lr == 1e-5 and isinstance(r.train.lr, float)
    assert r.train.epochs == 3.0 and isinstance(r.train.epochs, float)
    assert r.data.train_subset == 100 and r.data.eval_subset is None


def test_precedence(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  lr: 0.5\n  epochs: 2\n")
    r = load_recipe(p, overrides={"train.epochs": 7.0, "train.seed": None}, sets=["train.lr=0.25"],
                    base={"train.lr": 9.0, "train.batch_size": 4})
    assert (r.train.lr, r.train.epochs, r.train.batch_size, r.train.seed) == (0.25, 7.0, 4, 42)


def test_parse_override_yaml_scalars():
    assert parse_override("a.b=true") == (["a", "b"], True)
    assert parse_override("a.b=[x, y]") == (["a", "b"], ["x", "y"])
    assert parse_override("a.b=2e-3") == (["a", "b"], 2e-3)


def test_dump_roundtrip():
    import yaml

    from squat_cli.recipe import recipe_from_dict

    r = load_recipe(overrides={"quant.wbits": 3})
    again = recipe_from_dict(yaml.safe_load(r.dump()))
    assert again == r


@pytest.mark.parametrize("sets,message", [
    (["train.lr=.nan"], "train.lr: nan is not a finite number"),
    (["train.epochs=inf"], "train.epochs: inf is not a finite number"),
    (["sam.rho=nan"], "sam.rho: nan is not a finite number"),
    (["train.seed=1099511627776"], "train.seed: 1099511627776 is too large (at most 4294967295)"),
    (["train.max_steps=1e300"], "train.max_steps: 1e+300 is not valid; expected an integer"),
])
def test_non_finite_and_out_of_range_numbers_are_refused(sets, message):
    with pytest.raises(RecipeError) as exc:
        load_recipe(sets=sets)
    assert str(exc.value) == message


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    import time

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, "
              f"*a{i-1}]" for i in range(1, 9)]
    p = tmp_path / "bomb.yaml"
    p.write_text("train:\n  lr: 1.0e-5\n" + "\n".join(lines) + "\n")  # 10^9 nodes once expanded
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match="too large once its YAML aliases are expanded"):
        load_recipe(p)
    assert time.perf_counter() - t0 < 5
    nested = tmp_path / "deep.yaml"  # a value nested inside a valid key: the same bound
    nested.write_text("train:\n  lr: &x [" + ", ".join(["1"] * 1000) + "]\n  eval_steps: [*x, *x, *x, *x, *x, *x, *x, "
                      "*x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, "
                      "*x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, "
                      "*x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, "
                      "*x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, *x, "
                      "*x, *x]\n")
    with pytest.raises(RecipeError, match="too large"):
        load_recipe(nested)


def test_errors_stay_short_and_non_utf8_recipes_are_refused(tmp_path):
    p = tmp_path / "long.yaml"
    p.write_text("train:\n  lr: [" + ", ".join(["1"] * 20000) + "]\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(p)
    assert len(str(exc.value)) < 200 and "train.lr:" in str(exc.value)
    u16 = tmp_path / "u16.yaml"
    u16.write_bytes("train:\n  lr: 1.0e-5\n".encode("utf-16"))
    with pytest.raises(RecipeError, match="not UTF-8 text"):
        load_recipe(u16)
