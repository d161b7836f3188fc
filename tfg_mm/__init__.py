"""tfg_mm: progressive multimodal fine-tuning of DEIMv2 detectors with a text branch.

Importing the package registers the project's corrected DEIMv2 (model type ``tfg_deimv2``)
with transformers' Auto classes, so ``AutoModelForObjectDetection.from_pretrained(folder)``
returns the official architecture for the project's checkpoints.
"""

__version__ = "0.1.0"

from tfg_mm import detector as _detector  # noqa: F401  (registers the Auto classes)
