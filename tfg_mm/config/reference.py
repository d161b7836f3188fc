"""The parameter reference ``docs/parameters.md``, generated from the schema (``make params-doc``); a test keeps
the file and the schema identical."""

from __future__ import annotations

from tfg_mm.config.messages import REFERENCE_COMMAND, yaml_value
from tfg_mm.config.schema import GROUPS, MESSAGES


def _cell(text: str) -> str:
    """Markdown table cell: pipes escaped, newlines folded."""
    return text.replace("|", "\\|").replace("\n", " ")


def parameter_reference() -> str:
    """The parameter reference in Markdown: one table per group (name, type, default, allowed, meaning)."""
    lines = [
        "# Parameter reference",
        "",
        f"<!-- Generated from `tfg_mm/config/schema.py` by `{REFERENCE_COMMAND}` (or `make params-doc`). Do not edit. -->",
        "",
        "Every notebook parameter and every key of a `params/*.yaml` file is one flat `key: value`; there are "
        "no nested sections. Unknown keys, nested mappings, wrong types and out-of-range values are rejected "
        "before any work starts, all problems listed at once. Set parameters in a params file "
        "(`papermill -f params/phase2.yaml`), on the command line (`papermill -p lr 0.001`), or in a "
        "notebook's `params_file` parameter. Relative paths resolve against the project root.",
        "",
    ]
    for group, model in GROUPS:
        lines += [f"## {group}", "", _cell(model.__doc__ or ""), ""]
        lines += ["| name | type | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
        for name, info in model.model_fields.items():
            default = info.get_default(call_default_factory=True)
            bounds = MESSAGES.allowed_text(name).removeprefix(MESSAGES.field_type_text(name)).lstrip(", ").lstrip("; ")
            lines.append(
                f"| `{name}` | `{_cell(MESSAGES.field_type_text(name))}` | `{_cell(yaml_value(default))}` "
                f"| {_cell(bounds)} | {_cell(info.description or '')} |"
            )
        lines.append("")
    return "\n".join(lines)
