"""Import of official DEIMv2 checkpoints (``Intellindust-AI-Lab/DEIMv2`` ``.pth`` files).

The official training loop saves ``{'model': state_dict, 'ema': {'module': state_dict, ...}, ...}``.
This module reads such a file, finds which DEIMv2 size it holds, renames every tensor to the
layout of the project's detector (transformers' ``Deimv2ForObjectDetection`` key names, with the
corrections of ``tfg_mm.detector``), and writes the project's checkpoint format.

Why a mapping of our own rather than ``load_state_dict(strict=False)``: the official code fuses
tensors that transformers keeps apart (attention ``in_proj`` / ViT ``qkv`` → q, k, v; SwiGLU
``w12`` → gate, up), names norms differently (RMSNorm ``scale`` → ``weight``) and stores derived
buffers that transformers recomputes (anchors, RoPE periods). A lenient load would leave those
weights at their random initialisation without a word, which is exactly the "silently drops
shape-mismatched keys" pain of the original fine-tuning stack. Here every key is accounted for:
mapped, dropped for a documented reason, or reported.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import Deimv2Config, Deimv2ForObjectDetection

from tfg_mm.detector import (
    PRESETS,
    TfgDeimv2ForObjectDetection,
    load_state_dict_checked,
    preset_config,
    save,
)
from tfg_mm.detector.convert_rules import (
    CLASS_DEPENDENT,
    DROPPED,
    SPLIT,
    TOKEN,
    UNUSED,
    UNUSED_OURS,
    map_key,
    rules_for,
)
from tfg_mm.detector.factory import architecture_fingerprint, presets_matching
from tfg_mm.errors import CheckpointError, ConfigError

#: The official DEIMv2 sizes (``configs/deimv2/deimv2_*_coco.yml``): the project's presets.
SIZES: tuple[str, ...] = tuple(PRESETS)

# --------------------------------------------------------------------------------------------
# Reading the official file
# --------------------------------------------------------------------------------------------


#: The first bytes of a legacy (pre-zip) ``torch.save`` file: its pickled magic number.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


def _not_a_torch_file(path: Path) -> str:
    """'' when ``path`` starts like a ``torch.save`` file (a zip archive or the legacy pickle); else
    what it looks like instead, for the error message. Only the first bytes are read: nothing is unpickled."""
    with path.open("rb") as fh:
        head = fh.read(512)
    if head.startswith(b"PK\x03\x04") or head.startswith(_LEGACY_TORCH_MAGIC):
        return ""
    size = path.stat().st_size
    if not head:
        return "the file is empty"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return (
            "it is a safetensors file: a transformers / tfg_mm checkpoint folder is loaded with "
            "tfg_mm.detector.from_pretrained(<folder>), not converted"
        )
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"{size} bytes of binary data starting with {head[:8]!r}"
    first = text.strip().splitlines()[0][:80] if text.strip() else ""
    if text.startswith("version https://git-lfs"):
        return f"a Git LFS pointer of {size} bytes, not the file it points to; run `git lfs pull` to fetch it"
    if text.lstrip().lower().startswith(("<!doctype", "<html")):
        return f"an HTML page of {size} bytes (a download link that returned a web page)"
    return f"a text file of {size} bytes starting with {first!r}"


def load_official_state_dict(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """Read an official ``.pth`` and return ``(state_dict, source)``.

    ``source`` is ``"ema.module"`` when the file has EMA weights (the ones the official inference
    script and fine-tuning use), else ``"model"``. A bare state dict (as on the hub) is accepted
    too, with source ``"state_dict"``. The file is read with ``weights_only=True``: a checkpoint is
    data, and unpickling arbitrary objects from a downloaded file would run arbitrary code.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file. Give the path of an official DEIMv2 .pth file.")
    not_torch = _not_a_torch_file(path)
    if not_torch:
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint ({not_torch}). Expected an official DEIMv2 training checkpoint "
            "(.pth, written by torch.save: a zip archive holding {'model': state_dict, 'ema': {'module': "
            "state_dict}}, e.g. deimv2_hgnetv2_atto_coco.pth of the DEIMv2 release) or a bare state dict. "
            "Fix: download the .pth file itself, then pass its path."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower():
            unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
            raise CheckpointError(
                f"{path}: a PyTorch checkpoint that stores Python objects besides tensors"
                + (f" ({unsupported.group(1)})" if unsupported else f" ({first})")
                + "; tfg_mm reads checkpoints as data only, because unpickling objects from a file runs code "
                "from it. Fix: use a checkpoint that holds only tensors and plain containers (the official "
                "release .pth files do); for a file you made yourself, save only its weights: "
                "torch.save({'model': model.state_dict()}, 'weights.pth')."
            ) from None
        raise CheckpointError(
            f"{path}: a PyTorch checkpoint that cannot be read ({type(exc).__name__}: {first}); it is probably "
            "truncated or damaged (an interrupted download or copy). Fix: download or copy the .pth file again."
        ) from None
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(checkpoint).__name__}, not a dict. Expected the official "
            "layout {'model': state_dict, 'ema': {'module': state_dict}}."
        )
    ema = checkpoint.get("ema")
    if isinstance(ema, Mapping) and isinstance(ema.get("module"), Mapping):
        state_dict, source = ema["module"], "ema.module"
    elif isinstance(checkpoint.get("model"), Mapping):
        state_dict, source = checkpoint["model"], "model"
    elif checkpoint and all(isinstance(v, Tensor) for v in checkpoint.values()):
        state_dict, source = checkpoint, "state_dict"
    else:
        raise CheckpointError(
            f"{path}: no 'ema' -> 'module' and no 'model' entry (top-level keys: {sorted(map(str, checkpoint))[:10]}). "
            "Fix: give a checkpoint saved by the official DEIMv2 training loop (or a bare state dict)."
        )
    bad = [k for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if bad or not state_dict:
        raise CheckpointError(
            f"{path}: entry '{source}' is not a state dict of tensors "
            f"({'empty' if not state_dict else f'non-tensor values at {bad[:5]}'})."
        )
    if not any(k.startswith("decoder.") for k in state_dict):
        raise CheckpointError(
            f"{path}: entry '{source}' has no 'decoder.*' tensors; it is not a DEIMv2 "
            f"detector (first keys: {list(state_dict)[:5]})."
        )
    return dict(state_dict), source


# --------------------------------------------------------------------------------------------
# Size inference
# --------------------------------------------------------------------------------------------


def _count_indices(state_dict: Mapping[str, Tensor], prefix: str) -> int:
    pattern = re.compile("^" + re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def checkpoint_fingerprint(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """The architecture facts that tensor shapes reveal, in the same terms as ``config_fingerprint``."""
    try:
        d_model = int(state_dict["decoder.query_pos_head.layers.0.weight"].shape[0])
        ffn = int(state_dict["decoder.decoder.layers.0.swish_ffn.w12.weight"].shape[0])
    except KeyError as exc:
        raise CheckpointError(
            f"checkpoint has no {exc.args[0]!r}: not an official DEIMv2 decoder "
            "(DEIMv2 decoder layers have a SwiGLU 'swish_ffn')."
        ) from exc
    fp: dict[str, Any] = {
        "d_model": d_model,
        "decoder_layers": _count_indices(state_dict, "decoder.decoder.layers."),
        "decoder_ffn_dim": ffn,
        "encoder_type": "lite" if "encoder.bi_fusion.cv.conv.weight" in state_dict else "hybrid",
    }
    if fp["encoder_type"] == "lite":
        fp["encoder_hidden_dim"] = int(state_dict["encoder.input_proj.0.conv.weight"].shape[0])
    else:
        fp["encoder_hidden_dim"] = int(state_dict["encoder.lateral_convs.0.conv.weight"].shape[0])
    cls_token = next(
        (v for k, v in state_dict.items() if re.match(r"^backbone\.dinov3\.(_model\.)?cls_token$", k)), None
    )
    if cls_token is not None:
        fp["backbone"] = "dinov3"
        fp["backbone_width"] = int(cls_token.shape[-1])
        fp["backbone_depth"] = max(
            _count_indices(state_dict, "backbone.dinov3._model.blocks."),
            _count_indices(state_dict, "backbone.dinov3.blocks."),
        )
        fp["adapter"] = any(k.startswith("backbone.sta.") for k in state_dict)
    elif "backbone.stem.stem1.conv.weight" in state_dict:
        fp["backbone"] = "hgnetv2"
        stages = _count_indices(state_dict, "backbone.stages.")
        widths, blocks = [], []
        for i in range(stages):
            n_blocks = _count_indices(state_dict, f"backbone.stages.{i}.blocks.")
            last = state_dict[f"backbone.stages.{i}.blocks.{n_blocks - 1}.aggregation.1.conv.weight"]
            widths.append(int(last.shape[0]))
            blocks.append(n_blocks)
        fp["backbone_width"] = tuple(widths)
        fp["backbone_depth"] = tuple(blocks)
    else:
        raise CheckpointError(
            "checkpoint has neither an HGNetv2 ('backbone.stem.*') nor a DINOv3 "
            "('backbone.dinov3.*') backbone; it is not an official DEIMv2 model."
        )
    return fp


#: The same facts as :func:`checkpoint_fingerprint`, read from a (Tfg)Deimv2Config.
config_fingerprint = architecture_fingerprint


def infer_size(state_dict: Mapping[str, Tensor]) -> str:
    """The official size whose architecture matches the checkpoint's tensor shapes.

    The fingerprint (backbone type and widths, encoder type and width, decoder width, depth and
    FFN width, presence of the spatial tuning adapter) is compared with each of the project's
    presets, so the presets stay the single source of the size table.
    """
    found = checkpoint_fingerprint(state_dict)
    matches = presets_matching(found)
    if len(matches) != 1:
        raise CheckpointError(
            f"checkpoint architecture {found} matches {'no' if not matches else 'several'} DEIMv2 preset(s) "
            f"{matches or list(SIZES)}. Fix: pass --size explicitly (one of {', '.join(SIZES)}) if it is a "
            "customised official config; otherwise the file is not an official DEIMv2 checkpoint."
        )
    return matches[0]


def infer_num_classes(state_dict: Mapping[str, Tensor]) -> int:
    return int(state_dict["decoder.enc_score_head.weight"].shape[0])


def infer_image_size(state_dict: Mapping[str, Tensor], feat_strides: Sequence[int]) -> int | None:
    """The square eval size the official anchors were built for, or None without anchors.

    ``decoder.anchors`` holds one anchor per cell of every feature level at ``eval_spatial_size``:
    ``N = sum((S / stride)^2)``. Anchors (and so boxes) only match at that size.
    """
    anchors = state_dict.get("decoder.anchors")
    if anchors is None:
        return None
    count = int(anchors.shape[1])
    side = round(math.sqrt(count / sum(1.0 / s**2 for s in feat_strides)))
    if sum((side // s) ** 2 for s in feat_strides) != count or any(side % s for s in feat_strides):
        raise CheckpointError(
            f"checkpoint anchors ({count}) do not correspond to a square eval size for strides {list(feat_strides)}. "
            "Fix: the project's presets use square inputs; re-export the official model with a square "
            "eval_spatial_size."
        )
    return side


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def _model_class(config: Any) -> Callable[[Any], torch.nn.Module]:
    """The project's corrected model for its own configs, transformers' for a plain Deimv2Config."""
    if type(config) is Deimv2Config:
        return Deimv2ForObjectDetection
    return TfgDeimv2ForObjectDetection


def expected_state_dict(config: Any) -> dict[str, Tensor]:
    """Our state dict's names, shapes and dtypes, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = _model_class(config)(config)
    return model.state_dict()


def convert_state_dict(official: Mapping[str, Tensor], config: Any) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Map an official state dict onto the model that ``config`` describes.

    Returns ``(mapped, unmapped_official, missing_ours)``: ``mapped`` is ready for
    ``model.load_state_dict``; ``unmapped_official`` lists official keys that have no place in our
    model (documented drops such as anchors are not listed); ``missing_ours`` lists our keys that
    received no tensor. Two kinds of ours are filled without an official tensor because their value is
    fixed by the official architecture: ViT layer-scale factors (1, the official ViT has none) and
    zero-sized tensors (no register tokens). A tensor whose
    shape differs from ours raises ``CheckpointError``: the checkpoint is of another size.
    """
    ours = expected_state_dict(config)
    rules = rules_for(config)
    mapped: dict[str, Tensor] = {}
    unmapped: list[str] = []

    def put(our_key: str, tensor: Tensor, official_key: str) -> None:
        target = ours[our_key]
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(
                f"official '{official_key}' has shape {tuple(tensor.shape)} but the model's '{our_key}' has "
                f"{tuple(target.shape)}. Fix: convert with the size the checkpoint was trained as "
                f"(it looks like '{_guess_size(official)}')."
            )
        mapped[our_key] = tensor.detach().to(dtype=target.dtype).clone()

    for key, tensor in official.items():
        if any(p.match(key) for p, _ in DROPPED):
            continue
        target = map_key(key, rules, config.encoder_type)
        if target is None:
            unmapped.append(key)
            continue
        names, op = target
        present = [n for n in names if n in ours]
        if len(present) != len(names) and not (op == SPLIT and _only_missing_key_bias(names, present, tensor)):
            unmapped.append(key)
            continue
        if op == SPLIT:
            for name, chunk in zip(names, tensor.chunk(len(names), dim=0)):
                if name in ours:
                    put(name, chunk, key)
        elif op == TOKEN:
            put(names[0], tensor.reshape(ours[names[0]].shape), key)
        else:
            for name in names:
                put(name, tensor, key)

    if getattr(config, "share_bbox_head", False):
        _share_box_head(official, mapped, ours)

    for key, value in ours.items():
        if key in mapped:
            continue
        if key.endswith((".layer_scale1.lambda1", ".layer_scale2.lambda1")):
            # The official ViT has no layer scale: transformers' lambda must be exactly 1 (identity).
            mapped[key] = torch.ones(value.shape, dtype=value.dtype)
        elif value.numel() == 0:
            # Zero-sized tensors (no register tokens) carry nothing; the official file has no entry.
            mapped[key] = torch.empty(value.shape, dtype=value.dtype)

    missing = [k for k in ours if k not in mapped]
    return mapped, unmapped, missing


def map_official_shapes(
    official_shapes: Mapping[str, Sequence[int]], config: Any
) -> tuple[dict[str, tuple[int, ...]], list[str], list[str]]:
    """Where each official tensor would land in the model ``config`` describes, by shape only (no weights).

    The same key mapping as :func:`convert_state_dict`, for a table of official state-dict shapes (e.g. the
    official architecture records in ``tests/fixtures``). Returns ``(mapped, dropped, unmapped)``: ``mapped``
    is our key -> the shape the official tensor gives it (a fused tensor's chunk, a reshaped token);
    ``dropped`` the official keys not carried over for a documented reason (:data:`DROPPED_KEYS`);
    ``unmapped`` the official keys no rule knows. Our keys absent from ``mapped`` receive no official tensor.
    """
    rules = rules_for(config)
    mapped: dict[str, tuple[int, ...]] = {}
    dropped: list[str] = []
    unmapped: list[str] = []
    for key, shape in official_shapes.items():
        shape = tuple(int(n) for n in shape)
        if any(p.match(key) for p, _ in DROPPED):
            dropped.append(key)
            continue
        target = map_key(key, rules, config.encoder_type)
        if target is None:
            unmapped.append(key)
            continue
        names, op = target
        if op == SPLIT:
            mapped.update((name, (shape[0] // len(names), *shape[1:])) for name in names)
        elif op == TOKEN:
            mapped[names[0]] = (1, *shape)  # (1, D) -> transformers' (1, 1, D)
        else:
            mapped.update((name, shape) for name in names)
    return mapped, dropped, unmapped


def _only_missing_key_bias(names: Sequence[str], present: Sequence[str], tensor: Tensor) -> bool:
    """A fused q/k/v bias whose k part has no slot (``key_bias=False``) is fine only if it is zero."""
    absent = [n for n in names if n not in present]
    if len(absent) != 1 or not absent[0].endswith("k_proj.bias"):
        return False
    return bool(torch.all(tensor.chunk(3, dim=0)[1] == 0))


def _share_box_head(official: Mapping[str, Tensor], mapped: dict[str, Tensor], ours: Mapping[str, Tensor]) -> None:
    """With a shared box head, ``dec_bbox_head.0`` is the one module; the other indices must equal it."""
    for key, tensor in official.items():
        match = re.match(r"^decoder\.dec_bbox_head\.(\d+)\.(.+)$", key)
        if not match or match.group(1) == "0":
            continue
        first = official[f"decoder.dec_bbox_head.0.{match.group(2)}"]
        if not torch.equal(tensor, first):
            raise CheckpointError(
                f"'{key}' differs from 'decoder.dec_bbox_head.0.{match.group(2)}', but this size shares one box "
                f"head across decoder layers. Fix: the checkpoint is not of this size (it looks like "
                f"'{_guess_size(official)}'); convert it with that --size."
            )
    for key in ours:
        match = re.match(r"^(model\.decoder\.)?bbox_embed\.(\d+)\.(.+)$", key)
        source = f"{match.group(1) or ''}bbox_embed.0.{match.group(3)}" if match else None
        if source in mapped:
            mapped[key] = mapped[source]


def _guess_size(official: Mapping[str, Tensor]) -> str:
    """Best-effort size name for error messages (never raises)."""
    try:
        return infer_size(official)
    except Exception:  # the message this feeds is already an error; do not mask it
        return "unknown"


def _unused_explanations(keys: Sequence[str]) -> dict[str, str]:
    out = {}
    for key in keys:
        for (_, why), compiled in zip(UNUSED_OURS, UNUSED):
            if compiled.match(key):
                out[key] = why
    return out


def convert_checkpoint(
    path: str | Path,
    out_dir: str | Path,
    size: str | None = None,
    num_classes: int | None = None,
    id2label: Mapping[int, str] | None = None,
) -> Path:
    """Convert an official ``.pth`` into the project's checkpoint folder ``out_dir``.

    ``size`` is inferred from the tensor shapes when omitted; a given size that does not fit the
    checkpoint is refused with the size it looks like. ``num_classes`` defaults to the checkpoint's;
    a different value keeps everything but the class-dependent heads (encoder and decoder score
    heads, denoising class embedding), which start fresh — the usual start for fine-tuning
    COCO weights on another label set — and the report says so. The eval size (anchors) is read
    from the checkpoint. Nothing is written unless every used tensor is accounted for.
    """
    path, out_dir = Path(path), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(
            f"{out_dir}: already exists and is not empty; converting would replace it. "
            "Fix: choose a new output folder or delete this one first."
        )
    official, source = load_official_state_dict(path)
    looks_like = infer_size(official) if size is None else _guess_size(official)
    if size is None:
        size = looks_like
    elif size not in SIZES:
        raise ConfigError(
            f"--size {size!r} is not a DEIMv2 size. Fix: use one of {', '.join(SIZES)} "
            f"(this checkpoint looks like '{looks_like}')."
        )
    elif config_fingerprint(preset_config(size, num_classes=1)) != checkpoint_fingerprint(official):
        raise CheckpointError(
            f"{path}: --size {size} does not fit this checkpoint, which looks like '{looks_like}'. "
            f"Fix: convert with --size {looks_like} (or omit --size)."
        )

    checkpoint_classes = infer_num_classes(official)
    classes = checkpoint_classes if num_classes is None else int(num_classes)
    if id2label is not None and len(id2label) != classes:
        raise ConfigError(
            f"id2label has {len(id2label)} entries but the model has {classes} classes. "
            "Fix: give one name per class (or pass num_classes to match)."
        )
    reinitialised_from = []
    if classes != checkpoint_classes:
        reinitialised_from = sorted(k for k in official if CLASS_DEPENDENT.match(k))
        official = {k: v for k, v in official.items() if k not in reinitialised_from}

    base = preset_config(size, num_classes=classes)
    image_size = infer_image_size(official, base.feat_strides)
    config = preset_config(
        size, num_classes=classes, id2label=dict(id2label) if id2label else None, image_size=image_size
    )

    mapped, unmapped, missing = convert_state_dict(official, config)
    unused = _unused_explanations(missing)
    class_heads = [k for k in missing if k not in unused and reinitialised_from and _is_class_head(k)]
    unexplained = [k for k in missing if k not in unused and k not in class_heads]
    report = {
        "source_file": str(path.resolve()),
        "source_entry": source,
        "size": size,
        "num_classes": classes,
        "checkpoint_num_classes": checkpoint_classes,
        "image_size": image_size,
        "num_official_tensors": len(official) + len(reinitialised_from),
        "num_mapped_tensors": len(mapped),
        "dropped_official": sorted(k for k in official if any(p.match(k) for p, _ in DROPPED)),
        "unmapped_official": unmapped,
        "missing_ours": missing,
        "unused_ours": unused,
        "reinitialised_class_heads": class_heads,
    }
    print(format_report(report))
    if unmapped or unexplained:
        raise CheckpointError(
            f"{path}: conversion to size '{size}' left {len(unmapped)} official tensor(s) unmapped "
            f"{unmapped[:8]} and {len(unexplained)} model tensor(s) without weights {unexplained[:8]}; "
            "nothing was written. Fix: check --size; if the checkpoint comes from a modified official "
            "config, its architecture is not one of the presets."
        )

    model = TfgDeimv2ForObjectDetection(config)
    load_state_dict_checked(model, mapped, source=str(path), reinitialised=[*unused, *class_heads])
    _check_anchors(official, model, path)
    save(model.eval(), out_dir, {"conversion": report})
    return out_dir


def _check_anchors(official: Mapping[str, Tensor], model: torch.nn.Module, path: Path) -> None:
    """The dropped official anchors must equal the ones the model recomputes (same eval size and strides)."""
    theirs, their_valid = official.get("decoder.anchors"), official.get("decoder.valid_mask")
    if theirs is None or their_valid is None:
        return
    ours, our_valid = model.model.anchors, model.model.valid_mask.bool()
    same = (
        ours.shape == theirs.shape
        and torch.equal(our_valid, their_valid.bool())
        and torch.allclose(ours[our_valid.expand_as(ours)], theirs[our_valid.expand_as(ours)].to(ours.dtype), atol=1e-5)
    )
    if not same:
        raise CheckpointError(
            f"{path}: the official anchors ({tuple(theirs.shape)}) differ from those the model computes for "
            f"eval size {model.config.anchor_image_size} ({tuple(ours.shape)}); boxes would be wrong. Fix: the "
            "checkpoint was exported for another eval size or feature strides than the preset's."
        )


def _is_class_head(key: str) -> bool:
    return bool(re.search(r"(^|\.)(class_embed\.\d+|enc_score_head|denoising_class_embed)\.", key))


def format_report(report: Mapping[str, Any]) -> str:
    """A readable summary of a conversion (printed, and stored in the checkpoint metadata)."""
    lines = [
        f"official DEIMv2 checkpoint: {report['source_file']} (entry '{report['source_entry']}')",
        f"  size {report['size']}, {report['num_classes']} classes (checkpoint: {report['checkpoint_num_classes']}), "
        f"eval size {report['image_size']}",
        f"  {report['num_mapped_tensors']} model tensors filled from {report['num_official_tensors']} official ones; "
        f"{len(report['dropped_official'])} dropped as recomputed/duplicate",
        f"  unmapped official tensors: {report['unmapped_official'] or 'none'}",
        f"  model tensors without official weights: {report['missing_ours'] or 'none'}",
    ]
    for key, why in report["unused_ours"].items():
        lines.append(f"    {key}: {why}")
    if report["reinitialised_class_heads"]:
        lines.append(
            f"  class heads re-initialised for {report['num_classes']} classes: {report['reinitialised_class_heads']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m tfg_mm convert CHECKPOINT.pth OUT_DIR [--size SIZE] [--num-classes N]``."""
    parser = argparse.ArgumentParser(prog="tfg_mm convert", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="official DEIMv2 .pth (ema.module is preferred over model)")
    parser.add_argument("out_dir", help="new folder for the project's checkpoint")
    parser.add_argument("--size", choices=SIZES, default=None, help="DEIMv2 size (inferred when omitted)")
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="number of classes (default: the checkpoint's; another value re-initialises the class heads)",
    )
    args = parser.parse_args(argv)
    try:
        out = convert_checkpoint(args.checkpoint, args.out_dir, size=args.size, num_classes=args.num_classes)
    except (CheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
