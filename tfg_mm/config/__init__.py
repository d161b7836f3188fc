"""What a run can be configured with: the flat parameter schema and the DEIMv2 size table, both as data.

* :mod:`.schema`: every parameter, flat, typed, ranged and documented (:class:`Params`), and the choices of
  every choice-valued parameter, named once;
* :mod:`.sources`: params files, mappings, notebook globals and grid files, merged and checked before any work
  (:func:`load_params`, :func:`params_from_notebook`, :func:`load_grid`);
* :mod:`.messages`: how a bad value is reported (source, key, value, what is allowed, the fix);
* :mod:`.reference`: ``docs/parameters.md``, generated from the schema;
* :mod:`.presets`: the eight official DEIMv2 sizes (the settings every size shares, and each size's differences).

The names a notebook or another layer needs are re-exported here: ``from tfg_mm.config import load_params``.
"""

from tfg_mm.config.messages import REFERENCE_COMMAND, REFERENCE_DOC
from tfg_mm.config.reference import parameter_reference
from tfg_mm.config.schema import (
    DEFAULT_TEMPLATES,
    DEVICE_PATTERN,
    EXECUTOR_KEYS,
    GROUPS,
    RECIPE_KEYS,
    SINGLE_TEMPLATE,
    AblationParams,
    Amp,
    AttnImplementation,
    Augment,
    Compile,
    DetectorMode,
    Executor,
    Fidelity,
    Fusion,
    Gate,
    MemoryFormat,
    Optimizer,
    OptimizerImpl,
    Params,
    Preset,
    Prompts,
    Recipe,
    Scheduler,
    Select,
    SelectMetric,
    TextEncoderKind,
    Tracking,
    Unfreeze,
    default_of,
    diff_from_default,
)
from tfg_mm.config.sources import GRID_RUNNER_KEYS, load_grid, load_params, params_from_notebook, read_yaml

__all__ = [
    "DEFAULT_TEMPLATES",
    "DEVICE_PATTERN",
    "EXECUTOR_KEYS",
    "GRID_RUNNER_KEYS",
    "GROUPS",
    "RECIPE_KEYS",
    "REFERENCE_COMMAND",
    "REFERENCE_DOC",
    "SINGLE_TEMPLATE",
    "AblationParams",
    "Amp",
    "AttnImplementation",
    "Augment",
    "Compile",
    "DetectorMode",
    "Executor",
    "Fidelity",
    "Fusion",
    "Gate",
    "MemoryFormat",
    "Optimizer",
    "OptimizerImpl",
    "Params",
    "Preset",
    "Prompts",
    "Recipe",
    "Scheduler",
    "Select",
    "SelectMetric",
    "TextEncoderKind",
    "Tracking",
    "Unfreeze",
    "default_of",
    "diff_from_default",
    "load_grid",
    "load_params",
    "params_from_notebook",
    "parameter_reference",
    "read_yaml",
]
