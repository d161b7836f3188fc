"""The flat parameter schema: helpful errors, sources named, the generated reference, the shipped files."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest

from tfg_mm import config
from tfg_mm.config import (
    DEFAULT_TEMPLATES,
    REFERENCE_COMMAND,
    Params,
    default_of,
    diff_from_default,
    load_grid,
    load_params,
    parameter_reference,
    params_from_notebook,
    read_yaml,
)
from tfg_mm.errors import ConfigError
from tfg_mm.paths import portable_text, project_root, resolve_path

ROOT = Path(__file__).resolve().parent.parent


def _problems(excinfo: pytest.ExceptionInfo) -> list[str]:
    return excinfo.value.problems


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------- defaults


def test_defaults_validate_and_have_the_documented_values():
    p = Params()
    assert (p.preset, p.image_size, p.epochs, p.batch_size, p.lr, p.lr_backbone) == ("atto", 160, 12, 16, 5e-4, 5e-4)
    assert p.alpha == 0.0 and p.alpha_learnable and p.text_encoder == "minilm"
    assert p.class_descriptions == {} and len(p.templates) >= 5 and all("{}" in t for t in p.templates)
    assert p.seeds == [0] and p.wise_lambdas == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert diff_from_default(p) == {}


def test_groups_are_ordered_and_cover_every_field():
    groups = [Params.group_of(name) for name in Params.model_fields]
    assert groups[0] == "Data" and groups[-1] == "Ablations"
    # contiguous blocks in the display order
    order = list(dict.fromkeys(groups))
    assert order == ["Data", "Detector", "Training", "Phase 2", "Ablations"]
    assert groups == sorted(groups, key=order.index)
    assert Params.group_of("lr_fusion") == "Phase 2" and Params.group_of("run_dir") == "Training"
    with pytest.raises(ConfigError, match="did you mean `lr_fusion`"):
        Params.group_of("lr_fuson")
    assert all(info.description for info in Params.model_fields.values())


def test_default_of_is_the_schema_default():
    assert default_of("alpha") == Params().alpha == 0.0 and default_of("gate") == "scalar"
    assert default_of("templates") == list(DEFAULT_TEMPLATES)
    default_of("templates").append("a {} mutated")  # a fresh copy each time
    assert default_of("templates") == list(DEFAULT_TEMPLATES)
    with pytest.raises(ConfigError, match="did you mean `alpha`"):
        default_of("alpah")


def test_every_choice_list_is_a_named_alias():
    """Each choice-valued parameter is typed by an alias of tfg_mm.config (its CamelCase name), so other
    modules can derive the choices with ``typing.get_args`` instead of repeating them."""
    aliases = {name: value for name, value in vars(config).items() if get_origin(value) is Literal}
    for name, info in Params.model_fields.items():
        if get_origin(info.annotation) is Literal:
            alias = "TextEncoderKind" if name == "text_encoder" else name.title().replace("_", "")
            assert aliases.get(alias) == info.annotation, (name, alias)
    assert get_args(config.Unfreeze) == ("none", "heads", "decoder", "encoder", "all")


def test_tables_keyed_by_a_choice_cover_every_choice():
    from tfg_mm.training.phase2 import UNFREEZE_PARTS

    assert set(UNFREEZE_PARTS) == set(get_args(config.Unfreeze))


# ---------------------------------------------------------------------------------- unknown keys


def test_unknown_key_suggests_the_closest_one_and_names_the_file(tmp_path):
    path = _write(tmp_path / "phase2.yaml", "lr_fuson: 0.001\nepochs: 3\n")
    with pytest.raises(ConfigError) as excinfo:
        load_params(path)
    message = str(excinfo.value)
    assert str(path) in message
    assert "unknown key `lr_fuson`" in message and "did you mean `lr_fusion`?" in message
    assert "docs/parameters.md" in message


def test_aliases_from_other_tools_and_case():
    with pytest.raises(ConfigError) as excinfo:
        load_params({"learning_rate": 0.1, "imgsz": 320, "LR": 0.1, "zzzz_qqq": 1})
    problems = _problems(excinfo)
    assert any("`learning_rate`: did you mean `lr`?" in p for p in problems)
    assert any("`imgsz`: did you mean `image_size`?" in p for p in problems)
    assert any("`LR`: did you mean `lr`?" in p for p in problems)
    assert any("`zzzz_qqq`" in p and "docs/parameters.md" in p for p in problems)


# ---------------------------------------------------------------------------------- nested mappings


@pytest.mark.parametrize(
    ("nested", "suggestion"),
    [
        ({"optimizer": {"type": "AdamW"}}, "`optimizer: AdamW`"),
        ({"model": {"preset": "n"}}, "`preset: n`"),
        ({"fusion": {"hidden": 512}}, "`fusion_hidden: 512`"),
        ({"ema": {"enabled": False, "decay": 0.99}}, "`ema: false`, `ema_decay: 0.99`"),
        ({"train": {"lr": {"fusion": 0.01}}}, "`lr_fusion: 0.01`"),
        ({"text": {"class_descriptions": {"scratch": "a thin line"}}}, "`class_descriptions: {scratch: a thin line}`"),
    ],
)
def test_nested_mapping_suggests_the_flat_key(tmp_path, nested, suggestion):
    import yaml

    path = _write(tmp_path / "nested.yaml", yaml.safe_dump(nested, sort_keys=False))
    with pytest.raises(ConfigError) as excinfo:
        load_params(path)
    (problem,) = _problems(excinfo)
    outer = next(iter(nested))
    assert problem.startswith(f"{path}: `{outer}` is a nested mapping")
    assert "parameters are flat" in problem and suggestion in problem


def test_nested_mapping_with_no_match_says_so():
    with pytest.raises(ConfigError) as excinfo:
        load_params({"model": {"presett": "n", "colour": "red"}})
    (problem,) = _problems(excinfo)
    assert "model.presett (did you mean `preset`?)" in problem and "model.colour" in problem


def test_the_one_mapping_parameter_is_accepted():
    p = load_params({"class_descriptions": {"scratch": "a long thin bright line", "stain": "a dark blotch"}})
    assert p.class_descriptions["stain"] == "a dark blotch"


# ---------------------------------------------------------------------------------- types and ranges


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("epochs", -1, ["`epochs` = -1", "allowed: int, ≥ 0"]),
        ("image_size", 100, ["`image_size` = 100", "multiple of 32", "≥ 32, ≤ 1280"]),
        ("image_size", 2048, ["`image_size` = 2048", "≤ 1280"]),
        ("confidence", 0.9999, ["`confidence` = 0.9999", "≥ 0.5, ≤ 0.999"]),
        ("lr", "fast", ['`lr` = "fast"', "valid number", "allowed: float, > 0"]),
        ("lr", 0, ["`lr` = 0", "> 0"]),
        ("dropout", 1.0, ["`dropout` = 1.0", "≥ 0, < 1"]),
        ("ema_decay", 1, ["`ema_decay` = 1", "> 0, < 1"]),
        ("preset", "xl", ['`preset` = "xl"', '"atto" | "femto"', '"x"']),
        ("optimizer", "adam", ['`optimizer` = "adam"', '"AdamW" | "SGD"']),
        ("num_classes", 0, ["`num_classes` = 0", "int | null, ≥ 1"]),
        ("seeds", 3, ["`seeds` = 3", "valid list", "list[int]"]),
        ("wise_lambdas", [0.0, 1.5], ["`wise_lambdas[1]` = 1.5", "each item ≥ 0, ≤ 1"]),
        ("templates", ["a photo"], ['`templates[0]` = "a photo"', "exactly one '{}' placeholder"]),
        ("templates", ["a {} on {}"], ['`templates[0]` = "a {} on {}"', "exactly one '{}' placeholder"]),
        ("class_descriptions", {"scratch": 3}, ["`class_descriptions['scratch']` = 3", "valid string"]),
        ("augment", "maybe", ['`augment` = "maybe"', '"official" | "light" | "none" | bool']),
        ("augment", "offical", ['`augment` = "offical"', "did you mean `official`?"]),
        ("recipe", "oficial", ['`recipe` = "oficial"', "did you mean `official`?"]),
        # ranges added for issue 9 (item 8)
        ("alpha", -5, ["`alpha` = -5", "≥ 0, ≤ 1"]),
        ("alpha", 1.5, ["`alpha` = 1.5", "≥ 0, ≤ 1"]),
        ("logit_scale", 1000, ["`logit_scale` = 1000", "> 0, ≤ 100"]),
        ("synthetic_image_size", 32, ["`synthetic_image_size` = 32", "≥ 64"]),
        ("matcher_change_epoch", 0, ["`matcher_change_epoch` = 0", "≥ 1"]),
        ("num_queries", 0, ["`num_queries` = 0", "≥ 1"]),
    ],
)
def test_wrong_type_or_range_names_key_value_and_range(key, value, expected):
    with pytest.raises(ConfigError) as excinfo:
        load_params({key: value}, source_names=["params/x.yaml"])
    (problem,) = _problems(excinfo)
    assert problem.startswith("params/x.yaml: ")
    for text in expected:
        assert text in problem, (text, problem)


def test_every_problem_is_listed_with_its_source(tmp_path):
    path = _write(tmp_path / "bad.yaml", "epochs: -2\nlr_fuson: 0.1\noptimizer: {type: SGD}\n")
    with pytest.raises(ConfigError) as excinfo:
        load_params(path, {"image_size": 99}, source_names=["bad.yaml", "notebook parameter"], batch_size=0)
    problems = _problems(excinfo)
    assert len(problems) == 5, problems
    assert "Invalid parameters (5 problems)" in str(excinfo.value)
    assert any(p.startswith("bad.yaml: `epochs` = -2") for p in problems)
    assert any(p.startswith("bad.yaml: unknown key `lr_fuson`") for p in problems)
    assert any(p.startswith("bad.yaml: `optimizer` is a nested mapping") and "`optimizer: SGD`" in p for p in problems)
    assert any(p.startswith("notebook parameter: `image_size` = 99") for p in problems)
    assert any(p.startswith("keyword argument: `batch_size` = 0") for p in problems)


def test_lax_but_safe_coercion_of_yaml_scalars(tmp_path):
    # PyYAML reads `1e-3` (no dot) as a string: it must still be the number 0.001.
    path = _write(tmp_path / "p.yaml", "lr: 1e-3\nepochs: 3.0\naugment: 'false'\nnum_classes: null\n")
    p = load_params(path)
    assert math.isclose(p.lr, 1e-3) and p.epochs == 3 and p.augment == "none" and p.num_classes is None
    with pytest.raises(ConfigError, match="`epochs` = 3.5"):
        load_params({"epochs": 3.5})


def test_assignment_is_validated():
    p = Params()
    p.epochs = 3
    assert p.epochs == 3
    with pytest.raises(ConfigError, match=r"assignment: `epochs` = -3.*≥ 0"):
        p.epochs = -3
    with pytest.raises(ConfigError, match="assignment: unknown key `lr_fuson`: did you mean `lr_fusion`"):
        p.lr_fuson = 0.1
    assert p.epochs == 3


# ---------------------------------------------------------------------------------- files and merging


def test_merge_order_files_then_dicts_then_overrides(tmp_path):
    first = _write(tmp_path / "a.yaml", "epochs: 5\nlr: 0.01\nrun_dir: runs/a\n")
    second = _write(tmp_path / "b.yaml", "lr: 0.02\n")
    p = load_params(first, second, {"run_dir": "runs/dict"}, seed=7)
    assert (p.epochs, p.lr, p.run_dir, p.seed) == (5, 0.02, "runs/dict", 7)
    assert diff_from_default(p) == {"epochs": 5, "lr": 0.02, "seed": 7, "run_dir": "runs/dict"}
    # a Params is a source too
    assert load_params(p, epochs=1).lr == 0.02


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = _write(tmp_path / "broken.yaml", "epochs: 3\nlr: [0.1\nseed: 1\n")
    with pytest.raises(ConfigError) as excinfo:
        load_params(path, {"epochs": -1})
    message = str(excinfo.value)
    assert f"{path}, line " in message and "YAML syntax error" in message
    assert "`epochs` = -1" in message  # the other problems are still listed


def test_empty_missing_and_non_mapping_files(tmp_path):
    assert load_params(_write(tmp_path / "empty.yaml", "# only a comment\n")) == Params()
    with pytest.raises(ConfigError, match="parameter file not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected a mapping of `key: value` lines"):
        load_params(_write(tmp_path / "list.yaml", "- epochs: 3\n"))


# ---------------------------------------------------------------------------------- notebooks


def test_params_from_notebook_takes_known_keys_and_skips_kernel_objects():
    namespace = {
        "__name__": "__main__",
        "_": 3,
        "In": [""],
        "Out": {},
        "get_ipython": print,
        "os": os,
        "Path": Path,
        "epochs": 2,
        "lr": 0.002,
        "run_dir": "runs/nb",
    }
    p = params_from_notebook(namespace)
    assert (p.epochs, p.lr, p.run_dir) == (2, 0.002, "runs/nb")


def test_params_from_notebook_rejects_a_mistyped_papermill_parameter():
    with pytest.raises(ConfigError) as excinfo:
        params_from_notebook({"epochs": 2, "lr_fuson": 0.1, "preset": "q"})
    problems = _problems(excinfo)
    assert any(p.startswith("notebook parameter: unknown key `lr_fuson`: did you mean `lr_fusion`?") for p in problems)
    assert any(p.startswith('notebook parameter: `preset` = "q"') for p in problems)
    # a plain variable the notebook defines on purpose can be declared
    assert params_from_notebook({"epochs": 2, "FIGSIZE": (4, 3)}, ignore=["FIGSIZE"]).epochs == 2


def test_params_file_is_merged_first_and_named_in_errors(tmp_path, caplog):
    path = _write(tmp_path / "nb.yaml", "epochs: 9\nlr: 0.03\nalpha: 0.1\n")
    with caplog.at_level("INFO", logger="tfg_mm.config"):
        p = params_from_notebook({"params_file": str(path), "epochs": 1, "alpha": 0.1})
    assert (p.epochs, p.lr, p.alpha) == (1, 0.03, 0.1)
    assert "epochs" in caplog.text and "overrides" in caplog.text and "alpha" not in caplog.text
    bad = _write(tmp_path / "bad.yaml", "warmup_epoch: 3\n")
    with pytest.raises(ConfigError, match=rf"{bad}: unknown key `warmup_epoch`: did you mean `warmup_epochs`"):
        params_from_notebook({"params_file": str(bad), "epochs": 1})


# ---------------------------------------------------------------------------------- reference and shipped files


def test_reference_doc_matches_the_schema():
    doc = ROOT / "docs" / "parameters.md"
    expected = parameter_reference()
    assert doc.is_file() and doc.read_text(encoding="utf-8") == expected, (
        f"docs/parameters.md is out of date with tfg_mm/config.py: run `make params-doc` or `{REFERENCE_COMMAND}`"
    )


def test_reference_lists_every_parameter_with_type_default_and_meaning():
    text = parameter_reference()
    for name, info in Params.model_fields.items():
        (row,) = [line for line in text.splitlines() if line.startswith(f"| `{name}` |")]
        assert info.description.split("`")[0].strip().replace("|", "\\|")[:20] in row
    assert "| `image_size` | `int` | `160` | ≥ 32, ≤ 1280, multiple of 32 |" in text
    assert '| `preset` | `"atto" \\| "femto"' in text
    for group in ("## Data", "## Detector", "## Training", "## Phase 2", "## Ablations"):
        assert group in text


@pytest.mark.parametrize("path", sorted((ROOT / "params").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_params_file_validates_to_the_values_it_writes(path):
    """Each key of a shipped params file is taken as written (no silent coercion or default), and every other
    parameter is the schema's default."""
    written = read_yaml(path)
    params = load_params(path)
    for key, value in written.items():
        taken = getattr(params, key)
        assert taken == value or (key == "augment" and taken == {True: "light", False: "none"}.get(value)), key
    for key in set(Params.model_fields) - set(written):
        assert getattr(params, key) == default_of(key), key


def test_the_shipped_phases_agree_on_the_run_they_build_on():
    """make all chains the files: phase 2 starts from the baseline's run_dir, on the same data, size and seed."""
    baseline, phase2 = (load_params(ROOT / "params" / f"{name}.yaml") for name in ("baseline", "phase2"))
    assert phase2.baseline == baseline.run_dir
    for key in ("dataset", "preset", "image_size", "seed", "train_json", "val_json"):
        assert getattr(phase2, key) == getattr(baseline, key), key


def test_the_expected_params_files_are_shipped():
    assert {"default.yaml", "baseline.yaml", "phase2.yaml"} <= {p.name for p in (ROOT / "params").glob("*.yaml")}
    assert (
        load_params(ROOT / "params" / "phase2.yaml").run_dir != load_params(ROOT / "params" / "baseline.yaml").run_dir
    )


def test_the_phase2_params_file_writes_out_the_one_template_list():
    # params/phase2.yaml (make all, and the grids on top of it) lists its templates explicitly: they are
    # the schema's DEFAULT_TEMPLATES, the list a run without `templates` uses too.
    assert load_params(ROOT / "params" / "phase2.yaml").templates == list(DEFAULT_TEMPLATES)


GRIDS = sorted((ROOT / "params" / "ablations").glob("*.yaml"))


def test_the_expected_grids_are_shipped():
    assert {"small.yaml", "full.yaml"} <= {p.name for p in GRIDS}


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.name)
def test_every_shipped_grid_validates(path):
    grid = load_grid(path)  # the grid runner's own keys (hard_classes, wise) are allowed by default
    assert grid["variants"] and grid["seeds"]


def test_load_grid_validates_every_variant_through_the_schema(tmp_path):
    good = _write(
        tmp_path / "small.yaml",
        "description: alpha init\nseeds: [0, 1]\nbase: {epochs: 2, text_encoder: random}\n"
        "variants:\n  - {name: alpha0, overrides: {alpha: 0.0}}\n  - {name: thesis_original, overrides: "
        "{alpha: 0.1, alpha_learnable: false, prompts: single}}\n  - {name: control}\n",
    )
    grid = load_grid(good)
    assert grid["seeds"] == [0, 1] and grid["base"] == {"epochs": 2, "text_encoder": "random"}
    assert [v["name"] for v in grid["variants"]] == ["alpha0", "thesis_original", "control"]
    assert grid["variants"][2]["overrides"] == {}
    # the grid runner's own keys (hard_classes, wise) are allowed by default, nothing else is
    with pytest.raises(ConfigError, match="unknown grid key `wise`"):
        load_grid(
            _write(tmp_path / "wise.yaml", "wise: {variant: alpha0}\nvariants: [{name: alpha0}]\n"), extra_keys=()
        )
    assert load_grid(tmp_path / "wise.yaml")["wise"] == {"variant": "alpha0"}
    with pytest.raises(ConfigError, match="unknown grid key `wize`: did you mean `wise`"):
        load_grid(_write(tmp_path / "wize.yaml", "wize: {variant: alpha0}\nvariants: [{name: alpha0}]\n"))

    bad = _write(
        tmp_path / "bad.yaml",
        "seed: [0]\nbase: {epochs: -1}\nvariants:\n  - {name: a, overrides: {lr_fuson: 0.1}}\n"
        "  - {name: a, overrides: {fusion: {hidden: 64}}}\n  - {name: 'b/c', alpha: 0.1}\n",
    )
    with pytest.raises(ConfigError) as excinfo:
        load_grid(bad)
    problems = _problems(excinfo)
    assert any("unknown grid key `seed`: did you mean `seeds`?" in p for p in problems)
    assert any(p.startswith(f"{bad}: base: `epochs` = -1") for p in problems)
    assert any(p.startswith(f"{bad}: variant 'a': unknown key `lr_fuson`: did you mean `lr_fusion`?") for p in problems)
    assert any("variant 'a': `fusion` is a nested mapping" in p and "`fusion_hidden: 64`" in p for p in problems)
    assert any("duplicate variant name 'a'" in p for p in problems)
    assert any("'b/c' must be letters" in p for p in problems)
    assert any("parameters go under `overrides`" in p for p in problems)
    assert sum("`epochs` = -1" in p for p in problems) == 1  # the base's problem is listed once


def test_relative_paths_resolve_against_the_project_root():
    assert project_root() == ROOT
    assert resolve_path("data/synthetic") == ROOT / "data" / "synthetic"
    assert resolve_path("/abs/x") == Path("/abs/x")


def test_alpha_with_the_tanh_gate_must_stay_below_one():
    assert load_params({"alpha": 1.0}).alpha == 1.0
    with pytest.raises(ConfigError) as excinfo:
        load_params({"alpha": 1.0, "gate_tanh": True}, source_names=["params/x.yaml"])
    (problem,) = _problems(excinfo)
    assert problem.startswith("params/x.yaml: `alpha: 1.0` must be below 1 with `gate_tanh: true`")
    assert "Fix:" in problem


@pytest.mark.parametrize(
    ("image_size", "tokens"),
    [(64, "(64/16)^2 + (64/32)^2 = 20 tokens"), (128, "(128/16)^2 + (128/32)^2 = 80 tokens")],
)
def test_image_size_too_small_for_the_presets_queries_is_refused_before_any_work(image_size, tokens):
    with pytest.raises(ConfigError) as excinfo:
        load_params({"image_size": image_size}, source_names=["params/x.yaml"])
    (problem,) = _problems(excinfo)
    assert problem.startswith(f"params/x.yaml: `image_size: {image_size}` is too small for preset `atto`")
    assert tokens in problem and "selects 100 queries" in problem
    assert "Fix: `image_size: 160` or more" in problem
    n_tokens = int(tokens.split("= ")[1].split()[0])
    assert f"`num_queries: {n_tokens}` or fewer" in problem


def test_image_size_check_uses_num_queries_and_the_preset():
    assert load_params({"image_size": 128, "num_queries": 80}).num_queries == 80
    with pytest.raises(ConfigError, match=r"`image_size: 128`.*selects 81 queries \(`num_queries`"):
        load_params({"image_size": 128, "num_queries": 81})
    assert load_params({"preset": "s", "image_size": 128}).image_size == 128  # three levels: 336 tokens >= 300
    with pytest.raises(ConfigError, match=r"preset `n`.*Fix: `image_size: 256` or more"):
        load_params({"preset": "n"})  # the default 160 px is too small for n's 300 queries
    # a loaded detector's own config decides (checked by its forward)
    assert load_params({"image_size": 64, "checkpoint": "runs/x/checkpoints/best"}).image_size == 64


def test_portable_text_hides_this_machines_folders_and_keeps_others():
    root = project_root()
    text = f"data {root}/data/synthetic, model {sys.prefix}/lib/x, home {Path.home()}/d, root {root}, other /srv/set"
    shown = portable_text(text)
    assert str(root) not in shown.replace("/srv/set", "")
    assert "data data/synthetic," in shown and "root ." in shown and "/srv/set" in shown
    assert sys.prefix not in shown and ("{python env}/lib/x" in shown or ".venv/lib/x" in shown or "~/" in shown)
    assert portable_text(f"{root}x/y") == f"{root}x/y"  # a sibling folder sharing the prefix is not the root
