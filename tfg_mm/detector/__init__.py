"""The project's DEIMv2 detector: corrected architecture, official presets, lossless checkpoints.

* the architecture: :mod:`.official` (transformers' DEIMv2 corrected to the official one), :mod:`.factory` (a preset
  of the size table :mod:`tfg_mm.config.presets` as a config and a model), :mod:`.speed` (faster pieces of the step
  with the same numbers);
* its weights: :mod:`.checkpoint` (save / load / diagnostics), :mod:`.convert` (official ``.pth``),
  :mod:`.pretrained` (initial weights from any source, adapted to a dataset's classes);
* its training: :mod:`.loss` (the official criterion), :mod:`.recipe` (the official schedules), :mod:`.shim` (the
  eval-mode aux-output shim).
"""

from tfg_mm.config.presets import PRESETS, check_image_size, min_image_size
from tfg_mm.detector.checkpoint import (
    from_pretrained,
    load,
    load_state_dict_checked,
    read_metadata,
    save,
)
from tfg_mm.detector.factory import (
    apply_config_overrides,
    build,
    preset_config,
    preset_image_size,
    run_config_overrides,
    set_attn_implementation,
)
from tfg_mm.detector.official import (
    CORRECTION_DOCS,
    CORRECTIONS,
    FREEZE_PARTS,
    TfgDeimv2Config,
    TfgDeimv2ForObjectDetection,
    freeze,
    parameter_part,
    trainable_parameter_summary,
    unfreeze,
)

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
