"""A torch ``Dataset`` over any COCO detection folder, its collate function and its fingerprint.

The dataset validates its annotation file and images up front (``tfg_mm.data.validate``), so bad
input is a ``DataError`` naming the file, the entry and the fix, not a stack trace from inside a
``DataLoader`` worker. Category ids may be arbitrary (1..6, or 10, 20, ...): they are mapped to
contiguous labels 0..C-1 in increasing id order, and the names are kept for prompts and reports.

Targets follow what transformers' DEIMv2 loss reads: ``class_labels`` (LongTensor[n]) and
``boxes`` (FloatTensor[n, 4], cx, cy, w, h normalised to [0, 1]).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from tfg_mm.data.transforms import augment_mode, build_transforms, mosaic
from tfg_mm.data.validate import ValidationReport, open_rgb, read_json, resolve_images_dir, validate_coco
from tfg_mm.errors import DataError


def load_coco(
    path: str | Path, images_dir: str | Path | None = None, check_images: bool = True, strict: bool = True
) -> dict:
    """Load and validate a COCO detection file; return the repaired dict.

    Repairs (clipped boxes, converted images, filled keys) are issued as one counted
    ``DataWarning`` per kind; unusable input raises ``DataError``. Use ``validate_coco`` for the
    report object itself.
    """
    report = validate_coco(path, images_dir=images_dir, check_images=check_images, strict=strict)
    report.emit()
    return report.data


def _under(root: Path, path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else root / path


class CocoDetection(Dataset):
    """Images resized to ``image_size`` x ``image_size`` with DEIMv2-style targets.

    ``train=True`` with ``augment`` ``light`` (``True``) or ``official`` applies that training augmentation
    (:func:`tfg_mm.data.transforms.build_transforms`); anything else gives the plain resize. ``no_aug``
    (settable) switches a training set to its no-augmentation tail (the official ``stop_epoch`` policy). Images without annotations (defect-free) are kept: they are the negatives.
    Crowd annotations (``iscrowd=1``) are left out of the training targets (pycocotools ignores
    them in evaluation too).
    """

    def __init__(
        self,
        root: str | Path,
        ann_file: str | Path = "instances_train.json",
        images_dir: str | Path = "images",
        image_size: int = 160,
        train: bool = False,
        augment: bool | str = True,
        strict: bool = True,
        mosaic_prob: float = 0.0,
        crop: int | None = None,
    ) -> None:
        self.root = Path(root)
        #: ``train_crop``: training items are random ``crop`` px squares of the image at ``image_size``
        self.crop = crop
        self.coco_path: Path = _under(self.root, ann_file)
        self.images_dir: Path = _under(self.root, images_dir)
        self.image_size = image_size
        self.train = train
        self._no_aug = False
        #: ``augment: official`` only: the chance that an item is a mosaic of four (outside the no-augmentation tail)
        self.mosaic_prob = float(mosaic_prob)
        self.augment = augment  # builds self.transforms
        self.report: ValidationReport = validate_coco(
            self.coco_path, images_dir=self.images_dir, check_images=True, strict=strict
        )
        self.report.emit()
        self.data: dict = self.report.data

        categories = sorted(self.data["categories"], key=lambda c: c["id"])
        self.cat_ids: list[int] = [c["id"] for c in categories]
        self.categories: list[str] = [c["name"] for c in categories]
        label_of = {cid: label for label, cid in enumerate(self.cat_ids)}

        self._images = sorted(self.data["images"], key=lambda im: im["id"])
        self.image_ids: list[int] = [im["id"] for im in self._images]
        boxes: dict[int, list[list[float]]] = {i: [] for i in self.image_ids}
        labels: dict[int, list[int]] = {i: [] for i in self.image_ids}
        for a in sorted(self.data["annotations"], key=lambda a: a["id"]):
            if a.get("iscrowd", 0):
                continue
            x, y, w, h = a["bbox"]
            boxes[a["image_id"]].append([x, y, x + w, y + h])
            labels[a["image_id"]].append(label_of[a["category_id"]])
        self._boxes = {i: torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for i, b in boxes.items()}
        self._labels = {i: torch.tensor(v, dtype=torch.int64) for i, v in labels.items()}

    def keep_only(self, image_ids) -> None:
        """Restrict the dataset to ``image_ids`` (the low-data subset of :mod:`tfg_mm.data.shots`): items,
        annotations and instance counts all follow; the file on disk is untouched."""
        keep = set(image_ids)
        self.data = {
            **self.data,
            "images": [im for im in self.data["images"] if im["id"] in keep],
            "annotations": [a for a in self.data["annotations"] if a["image_id"] in keep],
        }
        self._images = [im for im in self._images if im["id"] in keep]
        self.image_ids = [im["id"] for im in self._images]
        self.__dict__.pop("coco", None)  # rebuilt from the subset when asked for

    @property
    def augment(self) -> str:
        """The training augmentation, ``official`` / ``light`` / ``none``; settable (``True`` = ``light``,
        ``False`` = ``none``: phase 2 turns it off for the cached warm-up)."""
        return self._augment

    @augment.setter
    def augment(self, value: bool | str) -> None:
        self._augment = augment_mode(value)
        self._build_transforms()

    @property
    def no_aug(self) -> bool:
        """The no-augmentation tail of training (``no_aug_epochs``); settable between epochs."""
        return self._no_aug

    @no_aug.setter
    def no_aug(self, value: bool) -> None:
        if bool(value) != self._no_aug:
            self._no_aug = bool(value)
            self._build_transforms()

    def _build_transforms(self) -> None:
        self.transforms = build_transforms(
            self.image_size, train=self.train, augment=self._augment, no_aug=self._no_aug, crop=self.crop
        )
        self.mosaic_transforms = build_transforms(
            self.image_size, train=self.train, augment="official", mosaic=True, crop=self.crop
        )

    def _mosaic_now(self) -> bool:
        """Whether this item is a mosaic (a random draw only when mosaics are on: other runs' random streams stay)."""
        if not (self.train and self._augment == "official" and not self._no_aug and self.mosaic_prob > 0):
            return False
        return torch.rand(1).item() < self.mosaic_prob

    def _raw(self, index: int) -> tuple[tv_tensors.Image, dict]:
        """Item ``index`` as decoded: uint8 image and its XYXY boxes / labels, before any transform."""
        im = self._images[index]
        pil = open_rgb(self.images_dir / im["file_name"])
        image = tv_tensors.Image(F.pil_to_tensor(pil))
        boxes = tv_tensors.BoundingBoxes(
            self._boxes[im["id"]].clone(), format="XYXY", canvas_size=(pil.height, pil.width)
        )
        return image, {"boxes": boxes, "labels": self._labels[im["id"]].clone()}

    @property
    def augmenting(self) -> bool:
        """Whether items are randomly augmented (a training set with augmentation on)."""
        return self.train and self._augment != "none"

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def id2label(self) -> dict[int, str]:
        """Contiguous label -> name, as transformers model configs expect."""
        return dict(enumerate(self.categories))

    def instance_counts(self) -> dict[str, int]:
        """Non-crowd boxes per class (the ones COCO evaluation counts), every class of the file listed."""
        name_of = dict(zip(self.cat_ids, self.categories))
        counts = {name: 0 for name in self.categories}
        for a in self.data["annotations"]:
            if not a.get("iscrowd", 0) and a["category_id"] in name_of:
                counts[name_of[a["category_id"]]] += 1
        return counts

    @cached_property
    def coco(self) -> Any:
        """A pycocotools ``COCO`` over the validated (repaired) annotations, for evaluation.

        Prefer it to ``COCO(coco_path)``: it holds the same boxes the model was trained on
        (clipped boxes clipped, filled ``area`` / ``iscrowd`` present).
        """
        coco = COCO()
        coco.dataset = self.data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
            coco.createIndex()
        return coco

    def __len__(self) -> int:
        return len(self._images)

    #: ``False`` returns the targets with an empty image (phase 2's cached warm-up needs no pixels)
    load_images: bool = True

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        im = self._images[index]
        image_id = im["id"]
        if not self.load_images:
            if self.augmenting:
                raise RuntimeError("labels-only items (load_images=False) need augmentation off")
            height, width = int(im["height"]), int(im["width"])
            boxes = tv_tensors.BoundingBoxes(self._boxes[image_id].clone(), format="XYXY", canvas_size=(height, width))
            # the same transforms on the boxes alone: the same numbers as with the image (labels stay
            # out: v2 would take a plain tensor for the image; without augmentation none is dropped)
            target = {**self.transforms({"boxes": boxes}), "labels": self._labels[image_id].clone()}
            image = torch.empty(3, 0, 0)
            out_h, out_w = target["boxes"].canvas_size
        else:
            image, target = self._raw(index)
            height, width = image.shape[-2:]
            if self._mosaic_now():
                others = torch.randint(len(self), (3,)).tolist()
                image, target = mosaic([(image, target), *(self._raw(i) for i in others)], self.image_size)
                image, target = self.mosaic_transforms(image, target)
            else:
                image, target = self.transforms(image, target)
            out_h, out_w = image.shape[-2:]
        cxcywh = F.convert_bounding_box_format(target["boxes"], new_format=tv_tensors.BoundingBoxFormat.CXCYWH)
        scale = torch.tensor([out_w, out_h, out_w, out_h], dtype=torch.float32)
        return image.as_subclass(torch.Tensor), {
            "class_labels": target["labels"].to(torch.int64),
            "boxes": cxcywh.as_subclass(torch.Tensor).to(torch.float32) / scale,
            "image_id": image_id,
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
        }


def collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> dict[str, Any]:
    """Stack images into ``pixel_values`` and keep targets as the list DEIMv2's loss takes as ``labels``."""
    return {"pixel_values": torch.stack([image for image, _ in batch]), "labels": [target for _, target in batch]}


def dataset_fingerprint(
    root: str | Path, ann_files: Sequence[str | Path] | None = None, images_dir: str | Path = "images"
) -> str:
    """sha256 over the annotation files and the bytes of every image they reference (sorted).

    This is what a run records to prove which data it saw: any changed box, image or split changes
    it, while file timestamps and unrelated files in the folder do not. ``ann_files`` default to
    every ``instances_*.json`` in ``root``.
    """
    root = Path(root)
    files = [_under(root, f) for f in ann_files] if ann_files is not None else sorted(root.glob("instances_*.json"))
    if not files:
        raise DataError(f"{root}: no annotation files (instances_*.json) to fingerprint. Fix: pass ann_files=.")
    digest = hashlib.sha256()
    names: set[str] = set()
    for file in sorted(files, key=lambda p: p.name):
        raw = file.read_bytes() if file.is_file() else None
        if raw is None:
            raise DataError(f"{file}: annotation file not found. Fix: check ann_files= / the dataset folder.")
        digest.update(f"ann:{file.name}:{len(raw)}\n".encode())
        digest.update(raw)
        data = read_json(file)
        names.update(im["file_name"] for im in data.get("images", []) if isinstance(im, dict) and "file_name" in im)
    folder = resolve_images_dir(files[0], _under(root, images_dir) if (root / images_dir).is_dir() else None)
    for name in sorted(names):
        path = folder / name
        if not path.is_file():
            raise DataError(
                f"{path}: image referenced by the annotations is missing, so the dataset cannot be "
                "fingerprinted. Fix: restore the image or regenerate the dataset."
            )
        raw = path.read_bytes()
        digest.update(f"img:{name}:{len(raw)}\n".encode())
        digest.update(raw)
    return digest.hexdigest()
