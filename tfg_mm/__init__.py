"""tfg_mm: progressive multimodal fine-tuning of DEIMv2 detectors with a text branch.

The one thing importing the package does (below, explicitly): it registers the project's corrected DEIMv2
(model type ``tfg_deimv2``) with transformers' Auto classes, so ``AutoModelForObjectDetection.from_pretrained(folder)``
returns the official architecture for the project's checkpoints. How the package is laid out:
``docs/architecture.md``.
"""

__version__ = "0.1.0"

import warnings as _warnings

# tqdm.auto (imported by transformers / huggingface_hub) warns in Jupyter kernels without ipywidgets;
# the reports rendered from papermill runs would carry that warning. Progress bars fall back to text.
_warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")

from tfg_mm.detector.official import register_auto_classes

register_auto_classes()
