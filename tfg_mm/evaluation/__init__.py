"""Measuring detections: COCO evaluation (:mod:`.coco`), the error analysis of a run's detections
(:mod:`.analysis`), the bootstrap statistics (:mod:`.stats`) and the per-image matching the galleries draw
(:mod:`.matching`).
"""
