"""The project's DEIMv2 detector: corrected architecture, official presets, lossless checkpoints.

Importing this package registers the model type ``tfg_deimv2`` with transformers' Auto classes.
"""

from tfg_mm.detector import speed as _speed  # noqa: F401  (registers `attn_implementation: blocks`)
from tfg_mm.detector.checkpoint import (
    from_pretrained,
    load,
    load_state_dict_checked,
    read_metadata,
    save,
)
from tfg_mm.detector.official import (
    CORRECTION_DOCS,
    CORRECTIONS,
    FREEZE_PARTS,
    TfgDeimv2Config,
    TfgDeimv2ForObjectDetection,
    freeze,
    parameter_part,
    register_auto_classes,
    trainable_parameter_summary,
    unfreeze,
)
from tfg_mm.detector.presets import (
    PRESETS,
    apply_config_overrides,
    build,
    check_image_size,
    min_image_size,
    preset_config,
    preset_image_size,
    run_config_overrides,
    set_attn_implementation,
)

register_auto_classes()

__all__ = [
    "CORRECTIONS",
    "CORRECTION_DOCS",
    "FREEZE_PARTS",
    "PRESETS",
    "apply_config_overrides",
    "build",
    "check_image_size",
    "min_image_size",
    "run_config_overrides",
    "TfgDeimv2Config",
    "TfgDeimv2ForObjectDetection",
    "freeze",
    "from_pretrained",
    "load",
    "load_state_dict_checked",
    "parameter_part",
    "preset_config",
    "preset_image_size",
    "read_metadata",
    "save",
    "set_attn_implementation",
    "trainable_parameter_summary",
    "unfreeze",
]
