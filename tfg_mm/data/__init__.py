"""Data: the embedded synthetic defect set, the COCO dataset / transforms / collate, VOC and YOLO
import / export, validation with clear errors, and inspection helpers for notebook 00."""

from tfg_mm.data.coco import CocoDetection, collate, dataset_fingerprint, load_coco
from tfg_mm.data.transforms import build_transforms
from tfg_mm.data.validate import DataWarning, ValidationReport, validate_coco

__all__ = [
    "CocoDetection",
    "DataWarning",
    "ValidationReport",
    "build_transforms",
    "collate",
    "dataset_fingerprint",
    "load_coco",
    "validate_coco",
]
