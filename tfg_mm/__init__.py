"""tfg_mm: progressive multimodal fine-tuning of DEIMv2 detectors with a text branch.

Importing the package registers the project's corrected DEIMv2 (model type ``tfg_deimv2``)
with transformers' Auto classes, so ``AutoModelForObjectDetection.from_pretrained(folder)``
returns the official architecture for the project's checkpoints.
"""

__version__ = "0.1.0"

import warnings as _warnings

# tqdm.auto (imported by transformers / huggingface_hub) warns in Jupyter kernels without ipywidgets;
# the reports rendered from papermill runs would carry that warning. Progress bars fall back to text.
_warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")

from tfg_mm import detector as _detector  # noqa: F401  (registers the Auto classes)
from tfg_mm import loss as _loss  # noqa: F401  (registers the official criterion the detector's forward uses)
