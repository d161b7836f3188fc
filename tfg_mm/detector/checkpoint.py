"""Lossless checkpoints of the project's DEIMv2, and loading of transformers' DEIMv2 checkpoints.

A checkpoint is a folder in the ``save_pretrained`` layout (``config.json`` with model type
``tfg_deimv2`` and the label map, ``model.safetensors``) plus ``tfg_mm.json`` (the run metadata), written
atomically: an interrupted save leaves the previous checkpoint untouched.

Loading without :mod:`tfg_mm` never builds transformers' uncorrected class silently: transformers does
not know the model type ``tfg_deimv2``, and ``config.json`` maps the Auto classes to a small module saved
beside it that imports ``tfg_mm`` (or fails with an error naming the package).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from tfg_mm.config.presets import PRESETS
from tfg_mm.detector.factory import architecture_fingerprint, criterion_fields, presets_matching
from tfg_mm.detector.official import (
    CORRECTIONS,
    MODEL_TYPE,
    TfgDeimv2Config,
    TfgDeimv2ForObjectDetection,
    prior_bias,
)
from tfg_mm.errors import CheckpointError, OfflineError
from tfg_mm.io import atomic_dir, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

METADATA_FILE = "tfg_mm.json"
WEIGHTS_FILE = "model.safetensors"
REMOTE_CODE_MODULE = "tfg_mm_deimv2"

# Written beside config.json and named in its "auto_map": a transformers process that has not imported
# tfg_mm refuses the unknown model type, and with trust_remote_code=True this file either returns the
# corrected classes or fails naming the package.
_REMOTE_CODE = '''"""This checkpoint is tfg_mm's corrected DEIMv2 (model type tfg_deimv2).

transformers' own Deimv2ForObjectDetection is NOT numerically the official DEIMv2: load this checkpoint
with the tfg_mm package (`import tfg_mm` first, or tfg_mm.detector.load(folder)).
"""
try:
    from tfg_mm.detector.official import TfgDeimv2Config, TfgDeimv2ForObjectDetection
except ImportError as error:
    raise ImportError(
        "This checkpoint needs the tfg_mm package (the corrected DEIMv2, model type tfg_deimv2): install "
        "tfg_mm (pip install -e . in the project) and `import tfg_mm` before loading it."
    ) from error

__all__ = ["TfgDeimv2Config", "TfgDeimv2ForObjectDetection"]
'''

# Class-specific tensors (their first dimension is the number of classes, or classes + 1).
CLASS_HEAD_MARKERS = ("model.decoder.class_embed.", "model.enc_score_head.", "model.denoising_class_embed.")


# -- saving ----------------------------------------------------------------------------------------------
def save(model: TfgDeimv2ForObjectDetection, folder: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Save ``model`` to ``folder`` atomically; returns the folder.

    Writes ``config.json`` (with ``id2label``), ``model.safetensors`` and ``tfg_mm.json`` (``metadata``
    plus the preset, the corrections applied and the library versions). Before the folder is put in place
    the saved tensors are checked to cover every tensor of the model (tied aliases by their source), so a
    checkpoint that would lose weights is never written.
    """
    if not isinstance(model, TfgDeimv2ForObjectDetection):
        raise CheckpointError(
            f"save(): expected a TfgDeimv2ForObjectDetection, got {type(model).__name__}; the project saves "
            "only its corrected DEIMv2 (build it with tfg_mm.detector.build or load)."
        )
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        _check_saved_tensors(model, tmp)
        config_path = tmp / "config.json"
        config_dict = json.loads(config_path.read_text(encoding="utf-8"))
        config_dict["auto_map"] = {
            "AutoConfig": f"{REMOTE_CODE_MODULE}.TfgDeimv2Config",
            "AutoModelForObjectDetection": f"{REMOTE_CODE_MODULE}.TfgDeimv2ForObjectDetection",
        }
        atomic_write_json(config_path, config_dict)
        atomic_write_text(tmp / f"{REMOTE_CODE_MODULE}.py", _REMOTE_CODE)
        record = {
            "metadata": dict(metadata or {}),
            "preset": model.config.preset,
            "num_classes": model.config.num_labels,
            "corrections": [c for c in CORRECTIONS if model.config.correction_enabled(c)],
            "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        }
        atomic_write_json(tmp / METADATA_FILE, record)
    return folder


def _check_saved_tensors(model: TfgDeimv2ForObjectDetection, folder: Path) -> None:
    """Reload ``folder`` with transformers' own loader and require every tensor to come back bit-exact.

    The file's key names are not compared directly: transformers renames some keys on save (DINOv3's
    ``backbone.model.layer`` is stored as ``backbone.layer``) and maps them back on load.
    """
    reloaded = TfgDeimv2ForObjectDetection.from_pretrained(folder, config=model.config)
    saved_state = reloaded.state_dict()
    lost = [
        name
        for name, tensor in model.state_dict().items()
        if name not in saved_state or not torch.equal(tensor.cpu(), saved_state[name])
    ]
    if lost:
        raise CheckpointError(
            f"save(): {len(lost)} tensor(s) would not come back from {folder} (e.g. {lost[:5]}); the checkpoint was "
            "not written. transformers' tied-weight handling may have changed: re-check the correction "
            "'lossless_shared_box_head' (tests/test_version_guard.py)."
        )


def read_metadata(folder: str | os.PathLike) -> dict:
    """The metadata dict given to :func:`save` (``tfg_mm.json``'s ``metadata``)."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no {METADATA_FILE}; {folder} is not a checkpoint written by tfg_mm.detector.save."
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))["metadata"]
    except (json.JSONDecodeError, KeyError) as error:
        raise CheckpointError(f"{path}: unreadable run metadata ({error}); re-save the checkpoint.") from error


# -- loading ---------------------------------------------------------------------------------------------
def _read_config_dict(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{folder}: no config.json; give the folder written by tfg_mm.detector.save (or save_pretrained)."
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error}); the checkpoint is damaged.") from error


def _damaged_weights(folder: Path, error: BaseException) -> CheckpointError:
    """The error for weights that cannot be read: which ``*.safetensors`` file is damaged (its header
    does not cover the file: truncated or overwritten), its size, and the fix."""
    damaged = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            damaged.append(f"{path} ({path.stat().st_size} bytes: {exc})")
    what = "; ".join(damaged) if damaged else f"{folder} ({type(error).__name__}: {error})"
    return CheckpointError(
        f"{what}: the checkpoint's weights cannot be read; the file is truncated or damaged (tfg_mm writes "
        "checkpoints atomically, so this usually comes from an interrupted copy or download, or a full disk). "
        f"Fix: copy the checkpoint folder {folder} again from its source, or re-create it by re-running the run "
        "that wrote it (with a new `run_dir` or `overwrite: true`); point `checkpoint` / `pretrained` / "
        "`baseline` at an intact checkpoint meanwhile."
    )


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights; the checkpoint is incomplete, re-save it.")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            state.update(load_file(str(path)))
        except SafetensorError as error:
            raise _damaged_weights(folder, error) from None
    return state


def load(
    folder: str | os.PathLike,
    num_classes: int | None = None,
    reinit_class_heads: bool = False,
    id2label: dict[int, str] | None = None,
    preset: str | None = None,
) -> TfgDeimv2ForObjectDetection:
    """Load a checkpoint written by :func:`save`, every tensor as saved (returned in eval mode).

    ``num_classes`` different from the checkpoint's is refused unless ``reinit_class_heads=True``, which
    re-initialises only the class heads (score heads, encoder score head, denoising class embedding) and
    logs their names. ``id2label`` replaces the label map. ``preset`` (e.g. the one the run's params name)
    is checked against the checkpoint's architecture. Mismatches raise ``CheckpointError`` listing the
    tensors (expected vs found), the probable cause and the fix.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder}: checkpoint folder not found; give the folder written by tfg_mm.detector.save."
        )
    config_dict = _read_config_dict(folder)
    model_type = config_dict.get("model_type")
    if model_type != MODEL_TYPE:
        raise CheckpointError(
            f"{folder / 'config.json'}: model_type {model_type!r}, not {MODEL_TYPE!r}; for a transformers DEIMv2 "
            "checkpoint use tfg_mm.detector.from_pretrained(folder), for an official .pth use tfg_mm.detector.convert."
        )
    config = TfgDeimv2Config.from_pretrained(folder)
    if preset is not None and preset != config.preset:
        raise CheckpointError(
            f"{folder}: checkpoint decoder width {config.d_model} = preset {config.preset!r}, params say "
            f"{preset!r} ({PRESETS.get(preset, {}).get('d_model', 'unknown preset')}); set the preset to "
            f"{config.preset!r} or point to a checkpoint of size {preset!r}."
        )
    saved_num_classes = config.num_labels
    changing_classes = num_classes is not None and num_classes != saved_num_classes
    if changing_classes and not reinit_class_heads:
        raise CheckpointError(
            f"{folder}: checkpoint has {saved_num_classes} classes, the dataset has {num_classes}. Pass "
            f"num_classes={num_classes}, reinit_class_heads=True to keep every other weight and re-initialise "
            "the class heads, or use a checkpoint trained on this dataset's classes."
        )
    if changing_classes:
        config.num_labels = num_classes
        config.id2label = {i: f"class_{i}" for i in range(num_classes)}
        config.label2id = {v: k for k, v in config.id2label.items()}
    if id2label is not None:
        labels = {int(k): str(v) for k, v in id2label.items()}
        if sorted(labels) != list(range(config.num_labels)):
            raise CheckpointError(
                f"load(id2label=...): ids {sorted(labels)} do not match the {config.num_labels} classes of the model."
            )
        config.id2label = labels
        config.label2id = {v: k for k, v in labels.items()}
    allowed = CLASS_HEAD_MARKERS + ("class_embed.",) if changing_classes else ()
    model = _load_checked(folder, config, allowed_mismatch=allowed)
    if changing_classes:
        reinit = reinitialise_class_heads(model)
        logger.warning(
            "%s: %d classes -> %d classes; re-initialised class-head tensors: %s",
            folder,
            saved_num_classes,
            num_classes,
            reinit,
        )
    return model.eval()


def reinitialise_class_heads(model: TfgDeimv2ForObjectDetection) -> list[str]:
    """Fresh init of the class-specific tensors (as transformers initialises them); returns their names."""
    bias = prior_bias(model.config)
    inner = model.model
    with torch.no_grad():
        for layer in [*inner.decoder.class_embed, inner.enc_score_head]:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.constant_(layer.bias, bias)
        if model.config.num_denoising > 0:
            nn.init.xavier_uniform_(inner.denoising_class_embed.weight)
    return sorted(name for name in model.state_dict() if name.startswith(CLASS_HEAD_MARKERS))


def _load_checked(
    folder: Path,
    config: TfgDeimv2Config,
    allowed_mismatch: tuple[str, ...] = (),
    allowed_unexpected: tuple[str, ...] = (),
) -> TfgDeimv2ForObjectDetection:
    """transformers' loader (it knows its own key renames and tied weights) plus strict diagnostics."""
    try:
        model, info = TfgDeimv2ForObjectDetection.from_pretrained(
            folder, config=config, ignore_mismatched_sizes=True, output_loading_info=True
        )
    except SafetensorError as error:
        raise _damaged_weights(folder, error) from None
    except (OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(
            f"{folder}: transformers could not read the checkpoint ({type(error).__name__}: {error}). Fix: give "
            "the folder written by tfg_mm.detector.save (config.json + model.safetensors); copy it again if "
            "it may be incomplete."
        ) from error
    mismatched = [
        (name, tuple(expected), tuple(found))
        for name, found, expected in sorted(info["mismatched_keys"])
        if not name.startswith(allowed_mismatch)
    ]
    missing = sorted(info["missing_keys"])
    unexpected = sorted(name for name in info["unexpected_keys"] if not name.startswith(allowed_unexpected))
    if mismatched or missing or unexpected:
        found_shapes = {name: found for name, _, found in mismatched}
        raise CheckpointError(_diagnose(config, found_shapes, str(folder), mismatched, missing, unexpected))
    return model


def load_state_dict_checked(
    model: TfgDeimv2ForObjectDetection,
    state: dict[str, torch.Tensor],
    source: str,
    reinitialised: list[str] | tuple[str, ...] = (),
) -> None:
    """Load a state dict in the model's key names into ``model``, failing with diagnostics on any gap.

    For converters and callers holding tensors in memory. A tied alias (e.g. ``class_embed.0.weight``
    for ``model.decoder.class_embed.0.weight``) may stand in for its source; ``reinitialised`` names
    tensors deliberately left at their fresh initialisation.
    """
    aliases = model.all_tied_weights_keys  # target -> source
    expected = model.state_dict()
    state = dict(state)
    for target, src in aliases.items():
        if src not in state and target in state:
            state[src] = state[target]
    state = {k: v for k, v in state.items() if k not in aliases}
    mismatched = [
        (name, tuple(expected[name].shape), tuple(tensor.shape))
        for name, tensor in state.items()
        if name in expected and tuple(expected[name].shape) != tuple(tensor.shape)
    ]
    required = {name for name in expected if name not in aliases and name not in reinitialised}
    missing = sorted(required - set(state))
    unexpected = sorted(set(state) - set(expected))
    if mismatched or missing or unexpected:
        found_shapes = {name: tuple(tensor.shape) for name, tensor in state.items()}
        raise CheckpointError(_diagnose(model.config, found_shapes, source, mismatched, missing, unexpected))
    model.load_state_dict(state, strict=False)
    model.tie_weights()


def _diagnose(config, found_shapes, source, mismatched, missing, unexpected) -> str:
    """Error text: what does not fit, the probable cause in words, and the fix."""
    lines = [f"{source}: the checkpoint does not fit a DEIMv2 {config.preset or ''} with {config.num_labels} classes."]
    causes = []
    head = found_shapes.get("model.enc_score_head.weight")
    if head is not None and head[0] != config.num_labels:
        causes.append(
            f"checkpoint has {head[0]} classes, the dataset has {config.num_labels}: load it with "
            f"num_classes={config.num_labels}, reinit_class_heads=True to re-initialise only the class heads"
        )
    width = found_shapes.get("model.enc_score_head.weight") or found_shapes.get(
        "model.decoder.pre_bbox_head.layers.0.weight"
    )
    if width is not None and width[-1] != config.d_model:
        found = int(width[-1])
        names = [name for name, preset in PRESETS.items() if preset["d_model"] == found]
        causes.append(
            f"checkpoint decoder width {found} = preset {'/'.join(names) or 'unknown'}, params say "
            f"{config.preset or 'unknown'} ({config.d_model}): set the preset to the checkpoint's size"
        )
    if any(name.startswith("model.enc_output.") for name in unexpected):
        causes.append("it has transformers' enc_output layer: load it with tfg_mm.detector.from_pretrained")
    lines.append("Probable cause: " + ("; ".join(causes) if causes else "a checkpoint of another architecture") + ".")
    if mismatched:
        lines.append(f"{len(mismatched)} tensor(s) of another shape (name: expected vs found):")
        lines += [f"  {name}: {exp} vs {found}" for name, exp, found in mismatched[:20]]
        if len(mismatched) > 20:
            lines.append(f"  ... and {len(mismatched) - 20} more")
    if missing:
        lines.append(f"{len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[:5]}")
    if unexpected:
        lines.append(f"{len(unexpected)} tensor(s) the model does not have, e.g. {unexpected[:5]}")
    return "\n".join(lines)


# -- transformers / hub checkpoints ----------------------------------------------------------------------
def from_pretrained(model_id_or_folder: str, **kwargs: Any) -> TfgDeimv2ForObjectDetection:
    """Load a Hugging Face hub id or a ``save_pretrained`` folder as the corrected DEIMv2.

    A ``tfg_deimv2`` folder is loaded with :func:`load` (``kwargs`` are its arguments). A ``deimv2``
    checkpoint (transformers' model type) is converted: its config becomes a ``TfgDeimv2Config``
    (``eval_size`` moved to ``anchor_image_size``; the official criterion of the size whose architecture it
    has, a ``CheckpointError`` when it is none of the official sizes) and its tensors are loaded, minus
    ``model.enc_output.*`` (a layer the official DEIMv2 does not have). A hub id is downloaded with
    ``huggingface_hub.snapshot_download``; without network this raises ``OfflineError``.
    """
    folder = Path(model_id_or_folder)
    if not folder.is_dir():
        folder = _download(model_id_or_folder)
    config_dict = _read_config_dict(folder)
    if config_dict.get("model_type") == MODEL_TYPE:
        return load(folder, **kwargs)
    if config_dict.get("model_type") != "deimv2":
        raise CheckpointError(
            f"{folder / 'config.json'}: model_type {config_dict.get('model_type')!r}; expected 'deimv2' or "
            f"{MODEL_TYPE!r} (an official .pth is converted with tfg_mm.detector.convert)."
        )
    config = _config_from_transformers(config_dict)
    # Tensors of transformers' DEIMv2 that the official architecture does not have.
    not_official = ("model.enc_output.", "model.conv_encoder.backbone.norm.", "model.conv_encoder.backbone.model.layer")
    model = _load_checked(folder, config, allowed_unexpected=not_official)
    dropped = [name for name in _read_weights(folder) if name.startswith(("model.enc_output.",))]
    if dropped:
        logger.warning("%s: dropped transformers' enc_output, absent from the official DEIMv2: %s", folder, dropped)
    return model.eval()


def _config_from_transformers(config_dict: dict) -> TfgDeimv2Config:
    """``TfgDeimv2Config`` of a transformers DEIMv2 config: ``eval_size`` moved to ``anchor_image_size`` and the
    official criterion of the size its architecture is (``tfg_mm.detector.factory``)."""
    values = dict(config_dict)
    for key in ("model_type", "transformers_version", "architectures", "auto_map", "head_dim"):
        values.pop(key, None)
    eval_size = values.pop("eval_size", None)
    if values.get("anchor_image_size") is None and eval_size is not None:
        values["anchor_image_size"] = list(eval_size)
    fingerprint = architecture_fingerprint(TfgDeimv2Config(**values))
    sizes = presets_matching(fingerprint)
    if len(sizes) != 1:
        raise CheckpointError(
            f"transformers DEIMv2 checkpoint with architecture {fingerprint}: it matches "
            f"{'no' if not sizes else 'several'} official DEIMv2 size(s) {sizes or list(PRESETS)}, so its official "
            "criterion (losses, union set, matcher switch epoch) is unknown. Only the official sizes are supported."
        )
    values.update(criterion_fields(sizes[0]), preset=sizes[0])
    return TfgDeimv2Config(**values)


def download(model_id: str) -> Path:
    """The local folder of hub id ``model_id`` (downloaded, or from the cache); ``OfflineError`` without network
    and nothing cached, ``CheckpointError`` for an id that does not exist."""
    return _download(model_id)


def read_config_dict(folder: str | os.PathLike) -> dict:
    """``config.json`` of a checkpoint folder as a dict (``CheckpointError`` naming it when absent or damaged)."""
    return _read_config_dict(Path(folder))


def _download(model_id: str) -> Path:
    try:
        return Path(snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.py"]))
    except (RepositoryNotFoundError, HFValidationError) as error:
        raise CheckpointError(
            f"{model_id!r} is neither an existing folder nor a Hugging Face model id ({error}); check the path."
        ) from error
    except (LocalEntryNotFoundError, OSError) as error:
        raise OfflineError(
            f"Could not download {model_id!r} from the Hugging Face hub ({type(error).__name__}: {error}). "
            f"Fix: on a machine with network run `hf download {model_id} --local-dir <folder>` (the `hf` command "
            "of huggingface_hub), copy the folder here and pass that folder path instead."
        ) from error
