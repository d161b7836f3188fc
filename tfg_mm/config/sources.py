"""Where parameter values come from, merged and checked before any work: params files, mappings, keyword
overrides, a notebook's globals (papermill's ``-p``) and ablation grid files.

Every source is validated against the schema (:class:`~tfg_mm.config.schema.Params`), then the checks across
parameters run (:data:`CHECKS`: the gate, the recipe, and ``image_size`` against the preset's query count from
the size table, :mod:`tfg_mm.config.presets`). Every problem of every source is reported at once as one
:class:`~tfg_mm.errors.ConfigError` that names the source of each bad value (:mod:`tfg_mm.config.messages`).
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType, NoneType
from typing import Any

import yaml
from pydantic import ValidationError

from tfg_mm.config.messages import config_error, plain, yaml_value
from tfg_mm.config.presets import image_size_problem
from tfg_mm.config.schema import MESSAGES, RECIPE_KEYS, Params, default_of
from tfg_mm.errors import ConfigError
from tfg_mm.paths import resolve_path

logger = logging.getLogger(__name__)


def read_yaml(path: str | Path) -> dict:
    """A flat params / grid file as a dict; ``ConfigError`` naming the file (and line) otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: parameter file not found (resolved to {path.resolve()}); check the path, relative paths "
            f"are taken from the working directory {Path.cwd()}"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the parameter file ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            f"{path}{where}: YAML syntax error: {problem}. Params files are flat `key: value` lines "
            "(quote strings that contain ': ' or start with a special character)."
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of `key: value` lines at the top level, found a {type(data).__name__}"
        )
    return data


def _check_gate(params: Params) -> list[tuple[str, str]]:
    """``gate_tanh`` makes α the gate's value after tanh: 1 is out of reach (atanh(1) is infinite)."""
    if params.gate_tanh and params.alpha >= 1:
        return [
            (
                "alpha",
                f"`alpha: {params.alpha}` must be below 1 with `gate_tanh: true` (α is then tanh of the learnt gate). "
                "Fix: choose `alpha` in [0, 1), or set `gate_tanh: false`.",
            )
        ]
    return []


def _check_recipe(params: Params) -> list[tuple[str, str]]:
    """``recipe: official`` sets the schedule keys: one that differs from its default is refused, not mixed in."""
    problems = []
    if params.recipe == "official":
        for key in RECIPE_KEYS:
            value, default = getattr(params, key), default_of(key)
            if value != default:
                problems.append(
                    (
                        key,
                        f"`{key}: {yaml_value(value)}` is set, but `recipe: official` sets `{key}` from the official "
                        f"schedule of preset `{params.preset}`. Fix: remove `{key}` (back to its default "
                        f"{yaml_value(default)}), or use `recipe: custom` to set the schedule yourself.",
                    )
                )
    if params.mosaic_prob > 0 and params.augment != "official":
        problems.append(
            (
                "mosaic_prob",
                f"`mosaic_prob: {params.mosaic_prob}` applies to `augment: official` only (now `augment: "
                f"{params.augment}`). Fix: set `augment: official`, or `mosaic_prob: 0`.",
            )
        )
    if params.no_aug_epochs > params.epochs:
        problems.append(
            (
                "no_aug_epochs",
                f"`no_aug_epochs: {params.no_aug_epochs}` is more than `epochs: {params.epochs}`. Fix: at most "
                f"{params.epochs}.",
            )
        )
    return problems


def _check_image_size(params: Params) -> list[tuple[str, str]]:
    """``image_size`` against the preset's query count (:mod:`tfg_mm.config.presets`): DEIMv2 selects its queries
    from the encoder's tokens, so a too small input fails inside transformers' top-k otherwise."""
    if params.pretrained or params.checkpoint or params.baseline:
        return []  # a loaded model's own config decides; the detector's forward checks it (_check_input_size)
    problem = image_size_problem(params.preset, params.image_size, params.num_queries)
    return [("image_size", problem)] if problem else []


#: The checks across parameters :func:`load_params` runs after the schema: each takes the validated Params and
#: returns ``(key, problem)`` pairs.
CHECKS: tuple[Callable[[Params], list[tuple[str, str]]], ...] = (_check_gate, _check_recipe, _check_image_size)


def load_params(
    *sources: str | Path | Mapping[str, Any] | Params,
    source_names: Sequence[str] | None = None,
    **overrides: Any,
) -> Params:
    """Merge parameter sources in the order given (later wins), then keyword overrides, and validate.

    ``sources`` are YAML files, mappings or ``Params``; ``source_names`` (one per source) replace the
    default names used in errors (the file path, or ``parameters #i``). Every problem of every
    source is collected and raised together as one ``ConfigError``; a key's problem is attributed to
    the source whose value won the merge.
    """
    if source_names is not None and len(source_names) != len(sources):
        raise ValueError(f"source_names has {len(source_names)} entries for {len(sources)} sources")
    problems: list[str] = []
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    layers: list[tuple[str, Mapping[str, Any]]] = []
    for index, source in enumerate(sources):
        if isinstance(source, Params):
            name, values = "parameters", source.model_dump()
        elif isinstance(source, Mapping):
            name, values = f"parameters #{index + 1}", source
        else:
            name = str(source)
            try:
                values = read_yaml(source)
            except ConfigError as exc:
                problems.append(str(exc))
                continue
        layers.append((source_names[index] if source_names is not None else name, values))
    if overrides:
        layers.append(("keyword argument", overrides))
    for name, values in layers:
        for key, value in values.items():
            merged[str(key)] = value
            origins[str(key)] = name
    try:
        params = Params.model_validate(merged)
    except ValidationError as exc:
        problems += MESSAGES.validation_problems(exc, merged, origins)
    else:
        for check in CHECKS:
            for key, problem in check(params):
                problems.append(f"{origins.get(key, 'default')}: {problem}")
    if problems:
        raise config_error(problems)
    return params


#: Globals every IPython kernel defines that are not parameters.
_KERNEL_NAMES = frozenset({"In", "Out", "exit", "quit", "get_ipython", "open"})
_PLAIN_TYPES = (str, int, float, bool, list, tuple, dict, NoneType)


def params_from_notebook(namespace: Mapping[str, Any], ignore: Iterable[str] = ()) -> Params:
    """The validated parameters of a notebook, from its ``globals()`` right after the parameters cell.

    Papermill injects parameters as notebook globals. Known keys are taken; a plain-data global
    (string, number, bool, list, dict, None) that is not a parameter is reported as an unknown key
    with a did-you-mean, because a mistyped ``-p lr_fuson 1e-3`` must not be silently ignored.
    Names starting with ``_``, modules, functions, classes and other objects are skipped, as are
    names in ``ignore`` (plain variables the notebook defines on purpose before calling this).
    An optional ``params_file`` global (a YAML path) is merged first: the notebook's own values
    override it, and each value it overrides is logged as a warning.
    """
    skipped = set(ignore) | _KERNEL_NAMES | {"params_file"}
    values: dict[str, Any] = {}
    for name, value in namespace.items():
        if name in Params.model_fields:
            values[name] = value
        elif name.startswith("_") or name in skipped or isinstance(value, ModuleType):
            continue
        elif isinstance(value, _PLAIN_TYPES):
            values[name] = value
    params_file = namespace.get("params_file") or ""
    if not params_file:
        return load_params(values, source_names=["notebook parameter"])
    # Looked up in the working directory first, then in the project root.
    path = Path(params_file) if Path(params_file).exists() else resolve_path(params_file)
    from_file = read_yaml(path)
    for key in sorted(set(from_file) & set(values)):
        if from_file[key] != values[key]:
            logger.info(  # the documented precedence; a warning would land in every report
                "notebook parameter %s = %r overrides %s = %r from params_file %s",
                key,
                values[key],
                key,
                from_file[key],
                params_file,
            )
    return load_params(path, values, source_names=[str(params_file), "notebook parameter"])


#: Top-level grid keys that belong to the grid runner, not to the schema: :func:`load_grid` passes
#: them through as written and ``tfg_mm.ablations.load_ablation_grid`` checks them (the hard classes'


GRID_RUNNER_KEYS = ("hard_classes", "wise", "baseline_seeds", "shots")


def load_grid(path: str | Path, extra_keys: Iterable[str] = GRID_RUNNER_KEYS) -> dict:
    """An ablation grid file, validated through the schema.

    The file holds ``base`` (flat overrides shared by every variant), ``seeds`` (list of ints) and
    ``variants`` (a list of ``{name, overrides}``), plus an optional ``description``. ``base`` merged
    with each variant's overrides must be valid :class:`Params`; every problem of every variant is
    reported at once. Returns ``{"path", "description", "base", "seeds", "variants": [{"name",
    "overrides"}]}`` with the base and overrides as written (flat dicts). Top-level ``extra_keys``
    (the grid runner's own settings) are allowed and returned as written, for the caller to check.
    """
    path = Path(path)
    data = read_yaml(path)
    extra_keys = tuple(extra_keys)
    allowed = ("description", "base", "seeds", "variants", *extra_keys)
    problems: list[str] = []
    for key in data:
        if key not in allowed:
            near = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean `{near[0]}`?" if near else f"a grid file has only {', '.join(allowed)}"
            problems.append(f"{path}: unknown grid key `{key}`: {hint}")
    base = data.get("base") or {}
    if not isinstance(base, dict):
        problems.append(f"{path}: `base` must be a mapping of flat parameters, found {yaml_value(plain(base))}")
        base = {}
    seeds = data.get("seeds", [0])
    variants = data.get("variants")
    if not isinstance(variants, list) or not variants:
        problems.append(
            f"{path}: `variants` must be a non-empty list of `{{name: ..., overrides: {{key: value}}}}` entries"
        )
        variants = []
    try:
        load_params(base, {"seeds": seeds}, source_names=[f"{path}: base", f"{path}: seeds"])
    except ConfigError as exc:
        problems += exc.problems  # type: ignore[attr-defined]
    checked: list[dict] = []
    names: set[str] = set()
    for index, variant in enumerate(variants):
        where = f"{path}: variants[{index}]"
        if not isinstance(variant, dict) or "name" not in variant:
            problems.append(f"{where}: each variant is a mapping `{{name: ..., overrides: {{key: value}}}}`")
            continue
        extra = set(variant) - {"name", "overrides"}
        if extra:
            problems.append(
                f"{where}: unexpected key(s) {', '.join(sorted(map(str, extra)))}: parameters go under `overrides`"
            )
        name = str(variant["name"])
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            problems.append(
                f"{where}: variant name {name!r} must be letters, digits, '.', '_' or '-' (it names a folder)"
            )
        if name in names:
            problems.append(f"{where}: duplicate variant name {name!r}")
        names.add(name)
        overrides = variant.get("overrides") or {}
        if not isinstance(overrides, dict):
            problems.append(f"{where} ({name}): `overrides` must be a mapping of flat parameters")
            continue
        try:
            load_params(base, overrides, source_names=[f"{path}: base", f"{path}: variant {name!r}"])
        except ConfigError as exc:
            problems += [p for p in exc.problems if not p.startswith(f"{path}: base:")]  # type: ignore[attr-defined]
        checked.append({"name": name, "overrides": overrides})
    if problems:
        raise config_error(problems)
    return {
        "path": str(path),
        "description": str(data.get("description", "")),
        "base": base,
        "seeds": [int(s) for s in seeds],
        "variants": checked,
        **{key: data[key] for key in extra_keys if key in data},
    }
