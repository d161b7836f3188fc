"""Initial detector weights from every source a user has, adapted to the dataset's classes.

``pretrained:`` (and ``checkpoint:``) may name

- a run_dir of notebook 01 (its ``checkpoints/best``),
- a project checkpoint folder (``config.json`` with model type ``tfg_deimv2``),
- a transformers DEIMv2 folder (``save_pretrained`` of ``Deimv2ForObjectDetection``, model type ``deimv2``),
- an official DEIMv2 ``.pth`` (converted on the fly by :func:`tfg_mm.detector.convert.convert_checkpoint`),
- a Hugging Face hub id (downloaded; without network an ``OfflineError`` says how to use a folder).

:func:`load_pretrained` returns the corrected DEIMv2 with the dataset's classes and a table (dict) of
what was loaded, re-initialised and dropped. When the class count differs, the class heads (every
decoder layer's score head, the encoder's score head, the denoising class embedding) start fresh as a
random-init build starts them (score heads: xavier weights and the official prior-probability bias
``-log((1 - 0.01) / 0.01)``); every other tensor is the source's.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers.utils import logging as hf_logging

from tfg_mm import detector
from tfg_mm.detector.checkpoint import CLASS_HEAD_MARKERS, download, read_config_dict
from tfg_mm.detector.convert import convert_checkpoint
from tfg_mm.detector.official import OFFICIAL_PRIOR_PROB, official_head_init
from tfg_mm.errors import CheckpointError, OfflineError
from tfg_mm.paths import RunPaths, resolve_path

logger = logging.getLogger(__name__)

OFFICIAL_SUFFIXES = (".pth", ".pt")

#: source kinds, as recorded in the table
KINDS = ("run_dir", "tfg_deimv2", "deimv2", "official_pth", "hub")


def source_kind(source: str) -> tuple[str, Path | str]:
    """What ``source`` (a parameter's value) is: ``(kind, path)``; a hub id keeps its string."""
    path = resolve_path(source)
    if path.is_dir():
        run = RunPaths.at(path)
        if run.metrics.exists() and run.best.is_dir():
            return "run_dir", run.best
        config = path / "config.json"
        if not config.is_file():
            raise CheckpointError(
                f"`{source}` ({path}): a folder without config.json. Fix: give a run_dir of notebook 01, a checkpoint "
                "folder (tfg_mm or transformers save_pretrained), an official DEIMv2 .pth or a Hugging Face id."
            )
        model_type = read_config_dict(path).get("model_type")
        if model_type in ("tfg_deimv2", "deimv2"):
            return model_type, path
        raise CheckpointError(
            f"{config}: model_type {model_type!r}; a DEIMv2 checkpoint has 'deimv2' (transformers) or 'tfg_deimv2' "
            "(tfg_mm). Fix: point at a DEIMv2 checkpoint."
        )
    if path.is_file():
        if path.suffix in OFFICIAL_SUFFIXES:
            return "official_pth", path
        raise CheckpointError(
            f"`{source}` ({path}): a file that is not an official DEIMv2 checkpoint (*.pth / *.pt). Fix: give the "
            ".pth, or the folder that holds config.json."
        )
    if Path(source).suffix in OFFICIAL_SUFFIXES or Path(source).is_absolute() or source.startswith((".", "~")):
        raise CheckpointError(
            f"`{source}`: {path} does not exist. Fix: check the path (relative ones start at the project root)."
        )
    return "hub", source


def load_pretrained(
    source: str,
    num_classes: int,
    id2label: dict[int, str] | None = None,
    adapt_classes: bool = True,
    seed: int | None = None,
    what: str = "pretrained",
) -> tuple[detector.TfgDeimv2ForObjectDetection, dict[str, Any]]:
    """The detector of ``source`` with ``num_classes`` classes, and the table of what was loaded.

    ``adapt_classes=False`` refuses a class-count mismatch (``CheckpointError``, naming the parameter
    ``what``). ``seed`` seeds the fresh class heads. The table (also logged at INFO) is
    ``{source, kind, path, preset, source_classes, classes, loaded, reinitialised, dropped}`` (``path``: the
    local folder or file read, a run_dir's ``checkpoints/best``; None for a hub id): ``loaded`` a count,
    the other two the tensor names.
    """
    kind, where = source_kind(source)
    with _quiet():
        model, kind, dropped = _read_source(source, kind, where, what)
    source_classes = model.config.num_labels
    labels = {int(k): str(v) for k, v in (id2label or {i: f"class_{i}" for i in range(num_classes)}).items()}
    if source_classes != num_classes and not adapt_classes:
        raise CheckpointError(
            f"`{what}: {source}` has {source_classes} classes, the dataset has {num_classes}. Fix: for fine-tuning "
            "use `pretrained:` with `reinit_class_heads: true` (the class heads start fresh); to evaluate, give a "
            "checkpoint trained on this dataset's classes."
        )
    source_names = [str(model.config.id2label.get(i, "")) for i in range(source_classes)]
    if source_classes == num_classes:
        _set_labels(model.config, labels)
        reinitialised: list[str] = []
        loaded = len(_own_names(model))
    else:
        model, loaded, reinitialised = adapt_class_heads(model, labels, seed)
    table = {
        "source": source,
        "kind": kind,
        "path": None if kind.startswith("hub") else str(where),
        "preset": model.config.preset,
        "source_classes": source_classes,
        "classes": num_classes,
        "loaded": loaded,
        "reinitialised": reinitialised,
        "dropped": dropped,
        # same class count, other names: the heads are kept, class i of the source becomes class i here
        "class_names_replaced": source_classes == num_classes
        and source_names != [labels[i] for i in range(num_classes)],
    }
    logger.info("%s", format_table(table))
    return model.eval(), table


def _read_source(source: str, kind: str, where, what: str):
    """The source's own model (its class count), its kind and the source tensors it does not use."""
    dropped: list[str] = []
    if kind == "official_pth":
        with tempfile.TemporaryDirectory(prefix="tfg_mm_pth_") as tmp:
            folder = convert_checkpoint(where, Path(tmp) / "converted")
            report = detector.read_metadata(folder)["conversion"]
            dropped = sorted(report["dropped_official"] + report["unmapped_official"])
            model = detector.load(folder)
            # the weights must not depend on the temporary files once the folder is gone
            model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    else:
        try:
            folder = download(where) if kind == "hub" else where
        except (CheckpointError, OfflineError) as error:
            raise type(error)(
                f"`{what}: {source}`: no file or folder {resolve_path(source)} exists, so it was taken as a Hugging "
                f"Face id. {error}"
            ) from error
        if kind == "hub":
            kind = read_config_dict(folder).get("model_type", "hub")
            kind = f"hub ({kind})"
        model = detector.from_pretrained(str(folder))
        dropped = sorted(name for name in _saved_names(folder) if name.startswith("model.enc_output."))
    return model, kind, dropped


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """One table says what a load did: transformers' load report and progress bars, the converter's printed
    report and the enc_output warning of ``detector.from_pretrained`` (the same facts) are held back."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    checkpoint_logger = logging.getLogger("tfg_mm.detector.checkpoint")
    level = checkpoint_logger.level
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    checkpoint_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        checkpoint_logger.setLevel(level)


def adapt_class_heads(
    source: detector.TfgDeimv2ForObjectDetection, id2label: dict[int, str], seed: int | None = None
) -> tuple[detector.TfgDeimv2ForObjectDetection, int, list[str]]:
    """A model with ``len(id2label)`` classes: class heads fresh, every other tensor copied from ``source``.

    Returns ``(model, tensors loaded, names re-initialised)``. Any other tensor whose shape differs is a
    ``CheckpointError`` (the architecture is not the source's).
    """
    config = copy.deepcopy(source.config)
    _set_labels(config, id2label)
    if config.initializer_bias_prior_prob is None:
        config.initializer_bias_prior_prob = OFFICIAL_PRIOR_PROB
    if seed is not None:
        torch.manual_seed(seed)
    model = detector.TfgDeimv2ForObjectDetection(config)
    official_head_init(model)
    own = _own_names(model)
    target = model.state_dict()
    heads = sorted(name for name in own if name.startswith(CLASS_HEAD_MARKERS))
    state = source.state_dict()
    copied = {name: state[name] for name in own if name not in heads and name in state}
    wrong = [
        f"{name}: {tuple(target[name].shape)} vs {tuple(t.shape)}"
        for name, t in copied.items()
        if t.shape != target[name].shape
    ]
    missing = sorted(set(own) - set(heads) - set(copied))
    if wrong or missing:
        raise CheckpointError(
            f"adapting the class heads: {len(wrong)} tensor(s) of another shape ({wrong[:5]}) and {len(missing)} "
            f"missing ({missing[:5]}) outside the class heads; the source is not this architecture."
        )
    model.load_state_dict(copied, strict=False)
    model.tie_weights()
    return model, len(copied), heads


def _own_names(model: detector.TfgDeimv2ForObjectDetection) -> list[str]:
    """State-dict names minus the tied aliases (the top-level ``class_embed`` / ``bbox_embed`` copies)."""
    aliases = model.all_tied_weights_keys
    return [name for name in model.state_dict() if name not in aliases]


def _set_labels(config, id2label: dict[int, str]) -> None:
    config.num_labels = len(id2label)
    config.id2label = dict(id2label)
    config.label2id = {v: k for k, v in id2label.items()}


def _saved_names(folder: Path) -> list[str]:
    names: list[str] = []
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names += list(f.keys())
    return names


def format_table(table: dict[str, Any]) -> str:
    """The one log table of a pretrained load: what was loaded, re-initialised and dropped."""
    reinit, dropped = table["reinitialised"], table["dropped"]
    lines = [
        f"pretrained weights: {table['source']} ({table['kind']}, preset {table['preset']}, "
        f"{table['source_classes']} classes -> {table['classes']})",
        f"  loaded          {table['loaded']:>5} tensors",
        f"  re-initialised  {len(reinit):>5} tensors{': ' + ', '.join(reinit) if reinit else ''}",
        f"  dropped         {len(dropped):>5} tensors{': ' + ', '.join(dropped) if dropped else ''}",
    ]
    if table.get("class_names_replaced"):
        lines.append("  class heads kept with the source's order: its class i is the dataset's class i (other names)")
    return "\n".join(lines)
