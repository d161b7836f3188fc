"""How a bad parameter is reported: every problem at once, naming where the value came from, the key, the value,
what is allowed and the fix.

* an unknown key suggests the closest valid key ("did you mean `lr_fusion`?"), or the parameter that another
  tool's name means (``imgsz`` -> ``image_size``);
* a nested mapping suggests the flat key(s) to write instead (``optimizer: {type: AdamW}`` ->
  ``optimizer: AdamW``; ``model: {preset: n}`` -> ``preset: n``);
* a wrong type or an out-of-range value names the key, the value and the allowed range.

:class:`ParamsMessages` speaks about a pydantic model given to it (the schema, :mod:`tfg_mm.config.schema`,
builds one over :class:`~tfg_mm.config.schema.Params`); this module imports nothing of the schema.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel, ValidationError

from tfg_mm.errors import ConfigError

#: Where the generated reference lives, named in every error so the reader knows where to look.
REFERENCE_DOC = "docs/parameters.md"
#: The command that regenerates it (also ``make params-doc``).
REFERENCE_COMMAND = "python -m tfg_mm params-doc --write docs/parameters.md"

#: Parameters whose value is legitimately a mapping (every other mapping is a nesting mistake).
MAPPING_FIELDS = frozenset({"class_descriptions", "slurm_sbatch"})
#: Names other tools use for our parameters (YOLO, Detectron, Hugging Face): an exact hint beats difflib.
ALIASES = {
    "learning_rate": "lr",
    "lr0": "lr",
    "base_lr": "lr",
    "num_epochs": "epochs",
    "max_epochs": "epochs",
    "batch": "batch_size",
    "imgsz": "image_size",
    "img_size": "image_size",
    "input_size": "image_size",
    "size": "preset",
    "model": "preset",
    "weights": "pretrained",
    "data": "dataset",
    "data_dir": "dataset",
    "output_dir": "run_dir",
    "out_dir": "run_dir",
    "workers_per_loader": "num_workers",
}
#: Inner keys that name the value of their outer key: ``optimizer: {type: AdamW}`` means ``optimizer: AdamW``.
VALUE_WORDS = frozenset({"type", "name", "kind", "value", "mode", "enabled", "enable", "use"})
#: How the reference and the errors show a type that a validator narrows (the annotation says only ``int | str``).
SHOWN_TYPES = {
    "num_workers": 'int | "auto"',
    "pin_memory": 'bool | "auto"',
    "class_descriptions": "dict[str, str | list[str]] | str",
    "augment": '"official" | "light" | "none" | bool',
    "slurm_sbatch": "dict[str, str | int | float | bool]",
}


def yaml_value(value: Any) -> str:
    """A value as the user would write it in a YAML params file (``true``, ``AdamW``, ``[0, 1]``)."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, sort_keys=False, width=10_000).strip()
    return text.removesuffix("...").strip()


def plain(value: Any) -> Any:
    """Mappings / sequences as plain dict / list, so that YAML renders them in flow style."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (str, int, float, bool, NoneType)):
        return value
    return repr(value)


def config_error(problems: Sequence[str]) -> ConfigError:
    """One :class:`ConfigError` listing every problem (``.problems`` keeps them for callers that merge lists)."""
    count = len(problems)
    lines = [f"Invalid parameters ({count} problem{'s' if count != 1 else ''}):"]
    lines += [f"  - {p}" for p in problems]
    lines.append(f"Every parameter, its type, default and meaning: {REFERENCE_DOC}.")
    error = ConfigError("\n".join(lines))
    error.problems = list(problems)  # type: ignore[attr-defined]  (for callers that list them separately)
    return error


def type_text(annotation: Any) -> str:
    """A short, user-facing rendering of a field's type (``int | None``, ``"atto" | "n"``, ``list[float]``)."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is Annotated:
        return type_text(args[0])
    if origin is Literal:
        return " | ".join(f'"{a}"' for a in args)
    if origin in (Union, UnionType):
        return " | ".join(type_text(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_text(a) for a in args)}]"
    if annotation is NoneType:
        return "null"  # as written in YAML
    return getattr(annotation, "__name__", str(annotation))


def bounds_text(metadata: Iterable[Any]) -> str:
    parts = []
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            parts.append(f"≥ {item.ge}")
        elif isinstance(item, annotated_types.Gt):
            parts.append(f"> {item.gt}")
        elif isinstance(item, annotated_types.Le):
            parts.append(f"≤ {item.le}")
        elif isinstance(item, annotated_types.Lt):
            parts.append(f"< {item.lt}")
        elif isinstance(item, annotated_types.MultipleOf):
            parts.append(f"multiple of {item.multiple_of}")
        elif isinstance(item, annotated_types.MinLen):
            parts.append(f"at least {item.min_length} item{'s' if item.min_length > 1 else ''}")
    return ", ".join(parts)


def _literal_choices(annotation: Any) -> list[str]:
    """The string values a ``Literal`` (possibly inside ``Annotated`` / a union / a list) allows."""
    if get_origin(annotation) is Literal:
        return [str(a) for a in get_args(annotation)]
    return [c for arg in get_args(annotation) for c in _literal_choices(arg)]


def _loc_text(loc: tuple) -> str:
    text = str(loc[0])
    for part in loc[1:]:
        text += f"[{part}]" if isinstance(part, int) else f"[{part!r}]"
    return text


class ParamsMessages:
    """The messages about one flat schema (``model``: a pydantic model whose fields are the parameters)."""

    def __init__(self, model: type[BaseModel]):
        self.model = model
        self.fields: tuple[str, ...] = tuple(model.model_fields)

    # -- unknown and nested keys -----------------------------------------------------------------------------
    def closest_key(self, key: str) -> str | None:
        lowered = key.lower()
        if lowered in ALIASES:
            return ALIASES[lowered]
        if lowered in self.fields:
            return lowered
        matches = difflib.get_close_matches(lowered, self.fields, n=1, cutoff=0.6)
        return matches[0] if matches else None

    def flat_key_for(self, path: tuple[str, ...]) -> str | None:
        """The flat parameter a nested path most likely means.

        Longest joined suffix first (``fusion: {hidden: 256}`` -> ``fusion_hidden``; ``model: {preset: n}``
        -> ``preset``), then, for inner keys such as ``type`` / ``name`` / ``enabled``, the parent itself
        (``optimizer: {type: AdamW}`` -> ``optimizer``).
        """
        parts = [str(p) for p in path]
        for start in range(len(parts)):
            candidate = "_".join(parts[start:])
            if candidate in self.fields:
                return candidate
        if parts[-1].lower() in VALUE_WORDS:
            for start in range(len(parts) - 1):
                candidate = "_".join(parts[start:-1])
                if candidate in self.fields:
                    return candidate
        return None

    def _nested_leaves(self, mapping: Mapping, path: tuple[str, ...]) -> Iterable[tuple[tuple[str, ...], Any]]:
        """(path, value) of each leaf; a mapping that a mapping-valued parameter would take is a leaf."""
        for inner, value in mapping.items():
            inner_path = (*path, str(inner))
            if isinstance(value, Mapping) and value and self.flat_key_for(inner_path) not in MAPPING_FIELDS:
                yield from self._nested_leaves(value, inner_path)
            else:
                yield inner_path, value

    def nested(self, key: str, mapping: Mapping) -> str:
        written = f"`{key}: {yaml_value(plain(mapping))}`"
        suggestions: list[str] = []
        unmatched: list[str] = []
        for path, value in self._nested_leaves(mapping, (key,)):
            flat = self.flat_key_for(path)
            if flat is None:
                near = self.closest_key("_".join(path[1:])) or self.closest_key(path[-1])
                unmatched.append(".".join(path) + (f" (did you mean `{near}`?)" if near else ""))
            else:
                suggestions.append(f"`{flat}: {yaml_value(plain(value))}`")
        message = f"`{key}` is a nested mapping ({written}), but parameters are flat, one `key: value` per line"
        if suggestions:
            message += f": write {', '.join(suggestions)} instead"
        if unmatched:
            message += f"; no parameter matches {', '.join(unmatched)} (see {REFERENCE_DOC})"
        return message

    def unknown_key(self, key: str, value: Any) -> str:
        if isinstance(value, Mapping):
            return self.nested(key, value)
        near = self.closest_key(key)
        hint = f"did you mean `{near}`?" if near else f"see {REFERENCE_DOC} for every parameter"
        return f"unknown key `{key}`: {hint}"

    # -- what a parameter accepts ----------------------------------------------------------------------------
    def field_type_text(self, name: str) -> str:
        return SHOWN_TYPES.get(name) or type_text(self.model.model_fields[name].annotation)

    def allowed_text(self, name: str) -> str:
        """What a parameter accepts, e.g. ``int ≥ 32, ≤ 1280, multiple of 32`` or ``list[float], each ≥ 0, ≤ 1``."""
        info = self.model.model_fields[name]
        text = self.field_type_text(name)
        bounds = bounds_text(info.metadata)
        if bounds:
            text += f", {bounds}"
        if get_origin(info.annotation) is list:
            (item,) = get_args(info.annotation)
            if get_origin(item) is Annotated:
                item_bounds = bounds_text(
                    m for extra in get_args(item)[1:] for m in getattr(extra, "metadata", [extra])
                )
                if item_bounds:
                    text += f"; each item {item_bounds}"
        return text

    # -- pydantic's errors, one line per bad key -------------------------------------------------------------
    def validation_problems(self, exc: ValidationError, data: Mapping, origins: Mapping[str, str]) -> list[str]:
        """One line per bad key (the first pydantic error of each location), naming source, key, value, range."""
        problems: list[str] = []
        seen: set[tuple] = set()
        for error in exc.errors():
            loc = error["loc"]
            key = str(loc[0]) if loc else "?"
            source = origins.get(key, "parameters")
            if key not in self.model.model_fields:
                line = self.unknown_key(key, data.get(key))
                seen.add((key,))
            elif isinstance(data.get(key), Mapping) and key not in MAPPING_FIELDS:
                if (key,) in seen:
                    continue
                seen.add((key,))
                line = self.nested(key, data[key])
            else:
                if loc in seen or (key,) in seen:
                    continue
                seen.add(loc)
                message = error["msg"].removeprefix("Value error, ")
                value = error["input"]
                # Strings are quoted so that `"1e-3"` (a YAML string) reads differently from `0.001`.
                shown = f'"{value}"' if isinstance(value, str) else yaml_value(plain(value))
                line = f"`{_loc_text(loc)}` = {shown}: {message}; allowed: {self.allowed_text(key)}"
                if error["type"] == "literal_error" and isinstance(value, str):
                    choices = _literal_choices(self.model.model_fields[key].annotation)
                    near = difflib.get_close_matches(value, choices, n=1)
                    line += f' (did you mean "{near[0]}"?)' if near else ""
            problems.append(f"{source}: {line}")
        return problems
