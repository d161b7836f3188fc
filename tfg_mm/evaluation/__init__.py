"""Measuring detections: COCO evaluation (:mod:`.coco`), the error analysis of a run's detections
(:mod:`.analysis`), the bootstrap statistics (:mod:`.stats`) and the per-image matching the galleries draw
(:mod:`.matching`).
"""

#: The error types of the TIDE breakdown (``final.errors[class]``: ΔAP50 when all errors of the type are fixed),
#: named here so that the run contract and the reports share them with :mod:`.analysis` without importing it.
ERROR_TYPES = ("classification", "localisation", "both", "duplicate", "background", "missed")
#: ``final.operating_points[class]`` keys (the score threshold that maximises F1, with its precision and recall).
OPERATING_POINT_KEYS = ("threshold", "precision", "recall", "f1")
