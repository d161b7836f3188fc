"""The data a run trains and evaluates on: where the dataset is, what it is, and its loaders.

- :func:`resolve_dataset`: the dataset folder of ``params.dataset``; the embedded synthetic set is
  generated on first use when it is the default.
- :func:`dataset_record`: the dataset's paths and content hash, as stored in the run contract and
  folded into the run id. A run computes it once and passes it on.
- :func:`make_data`: the COCO datasets and their loaders (:class:`Data`). The train loader shuffles
  with the generator that :func:`tfg_mm.training.seeding.seed_everything` returns, so the data order is a
  function of the seed. Before it returns, every image of the dataset has been decoded once
  (:func:`tfg_mm.data.validate.decode_images`, skipped when this dataset content already passed).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from tfg_mm.data.coco import CocoDetection, collate, dataset_fingerprint
from tfg_mm.data.shots import select_shots
from tfg_mm.data.synthetic import generate
from tfg_mm.data.validate import DataWarning, decode_images
from tfg_mm.errors import ConfigError, DataError
from tfg_mm.paths import resolve_path
from tfg_mm.runtime.devices import loader_settings, resolve_device

#: The embedded default dataset (relative to the project root), generated on first use.
DEFAULT_DATASET = "data/synthetic"


def resolve_dataset(params, progress: bool = True, root: Path | None = None) -> Path:
    """The dataset folder; the embedded synthetic set is generated when it is the default and absent.

    ``root``: ``params.dataset`` already resolved (:attr:`tfg_mm.paths.RunPaths.dataset`).
    """
    root = resolve_path(params.dataset) if root is None else root
    if params.dataset == DEFAULT_DATASET and params.generate_if_missing:
        # (re)generated when absent or made by other generator settings / version; a no-op otherwise
        root = generate(
            root,
            seed=params.synthetic_seed,
            n_train=params.synthetic_train,
            n_val=params.synthetic_val,
            n_test=params.synthetic_test,
            image_size=params.synthetic_image_size,
            progress=progress,
        )
    if not root.exists():
        raise ConfigError(
            f"Parameter `dataset`: folder {root} does not exist. Fix: point `dataset` at a COCO folder "
            f"with `{params.images_dir}/`, `{params.train_json}` and `{params.val_json}`, or use the "
            f"embedded default `{DEFAULT_DATASET}` (generated on first use)."
        )
    return root


def dataset_record(
    root: str | Path, train_json: str, val_json: str, images_dir: str = "images", test_json: str = ""
) -> dict:
    """Paths and content hash of a COCO dataset: ``{"root", "train_json", "val_json", "hash", "hash_method"}``,
    and ``test_json`` when the run has a test split.

    The hash is :func:`tfg_mm.data.coco.dataset_fingerprint`: the annotation files and the bytes of
    the images they reference, under ``images_dir`` (the test split's too: a run judged on other test images
    is another run).
    """
    root_path = resolve_path(root)
    files = {"train_json": train_json, "val_json": val_json, **({"test_json": test_json} if test_json else {})}
    annotations = {key: root_path / name for key, name in files.items()}
    for key, path in annotations.items():
        if not path.is_file():
            raise DataError(
                f"{path}: annotation file not found (dataset `{root}`, {key} `{path.name}`); check the "
                f"`dataset` and `{key}` parameters, or generate the synthetic set with `python -m tfg_mm generate`"
                + (' (`test_json: ""` runs without a test split)' if key == "test_json" else "")
            )
    return {
        "root": str(root_path),
        **{key: str(path) for key, path in annotations.items()},
        "hash": dataset_fingerprint(root_path, [str(p) for p in annotations.values()], images_dir=images_dir),
        "hash_method": "tfg_mm.data.dataset_fingerprint",
    }


def record_of(params, root: str | Path | None = None) -> dict:
    """:func:`dataset_record` of a run's parameters (``root``: the dataset folder already located)."""
    root = params.dataset if root is None else root
    return dataset_record(root, params.train_json, params.val_json, params.images_dir, params.test_json)


def check_test_split(test: CocoDetection, others: dict[str, CocoDetection]) -> None:
    """The held-out test split: the training set's categories, and none of its images in the other splits
    (same ``file_name``): a ``DataError`` naming the file, the count and the fix, before any training."""
    reference = next(iter(others.values()))
    if (list(test.categories), list(test.cat_ids)) != (list(reference.categories), list(reference.cat_ids)):
        raise DataError(
            f"{test.coco_path}: the test split lists the categories {list(test.categories)}, the training set "
            f"{list(reference.categories)}. Fix: give the test file the same category list (names and ids), e.g. "
            "by cutting all splits from one file with `python -m tfg_mm split`."
        )
    names = {im["file_name"] for im in test.data["images"]}
    for split, dataset in others.items():
        shared = sorted(names & {im["file_name"] for im in dataset.data["images"]})
        if shared:
            raise DataError(
                f"{test.coco_path}: {len(shared)} of its {len(names)} images are also in the {split} split "
                f"{dataset.coco_path} (e.g. {shared[:3]}): a number judged on them would not be held out. Fix: "
                "split the images once into train / val / test (`python -m tfg_mm split all.json --val-fraction "
                "0.2 --test-fraction 0.2`), or remove them from one of the files."
            )


@dataclass
class Data:
    root: Path
    train: Any
    val: Any
    train_loader: DataLoader
    val_loader: DataLoader
    class_names: list[str]
    cat_ids: list[int]
    record: dict
    #: the held-out test split (``test_json``; None without one) and its loader
    test: Any = None
    test_loader: DataLoader | None = None
    #: ``train_shots``: the low-data subset kept (:func:`tfg_mm.data.shots.select_shots`, without the ids)
    shots: dict | None = None


def make_data(
    params,
    loader_gen: torch.Generator,
    progress: bool = True,
    need_train: bool = True,
    record: dict | None = None,
    processes: int = 1,
) -> Data:
    """The run's datasets and loaders (the train ones only when ``need_train``).

    ``record`` is the run's :func:`dataset_record` when the caller has already located and
    fingerprinted the dataset (a run does it once, before its reuse check); without it the dataset
    is located here and fingerprinted after loading. ``processes`` (data parallelism): the train loader
    cuts global batches of ``batch_size`` x processes images, which the training loop shares out.
    """
    root = Path(record["root"]) if record is not None else resolve_dataset(params, progress=progress)
    # workers / pinned memory for the run's device (`auto`: none on CPU, as always; tfg_mm.runtime.devices)
    settings = loader_settings(params.num_workers, params.pin_memory, resolve_device(params.device)).as_kwargs()
    val = CocoDetection(
        root, params.val_json, params.images_dir, image_size=params.image_size, train=False, augment=False
    )
    train = None
    train_loader = None
    shots: dict | None = None
    if need_train:
        if params.train_crop is not None and params.augment == "none":
            raise ConfigError(
                f"train_crop = {params.train_crop} with augment: none: the crop is a random cut of each training "
                "image, part of the augmentation. Fix: augment: light (or official), or leave train_crop empty."
            )
        train = CocoDetection(
            root,
            params.train_json,
            params.images_dir,
            image_size=params.image_size,
            train=True,
            augment=params.augment,
            mosaic_prob=params.mosaic_prob,
            crop=params.train_crop,
        )
        if params.train_shots is not None:
            shots = select_shots(
                train.data, params.train_shots, params.shots_classes, params.shots_seed, source=str(train.coco_path)
            )
            train.keep_only(shots.pop("image_ids"))
        if list(train.categories) != list(val.categories):
            raise ConfigError(
                f"The train and val annotation files of {root} list different categories "
                f"({train.categories} vs {val.categories}). Fix: use one category list in both."
            )
        global_batch = params.batch_size * processes
        train_loader = DataLoader(
            train,
            batch_size=global_batch,
            shuffle=True,
            generator=loader_gen,
            collate_fn=collate,
            **settings,
            drop_last=len(train) > global_batch,
        )
    val_loader = DataLoader(val, batch_size=params.batch_size, shuffle=False, collate_fn=collate, **settings)
    test, test_loader = None, None
    if params.test_json:
        test = CocoDetection(
            root, params.test_json, params.images_dir, image_size=params.image_size, train=False, augment=False
        )
        check_test_split(test, {"validation": val, **({"training": train} if train is not None else {})})
        test_loader = DataLoader(test, batch_size=params.batch_size, shuffle=False, collate_fn=collate, **settings)
    for split, dataset in (("validation", val), ("test", test)):
        missing = [name for name, n in (dataset.instance_counts() if dataset is not None else {}).items() if n == 0]
        if missing:
            warnings.warn(
                DataWarning(
                    f"{dataset.coco_path}: no {split} instances of {', '.join(missing)}: "
                    f"{'their AP cannot be measured here' if len(missing) > 1 else 'its AP cannot be measured here'}"
                    f" (the reports say 'no {split} instances'). Fix: move images of "
                    f"{'these classes' if len(missing) > 1 else 'this class'} into the {split} split "
                    "(`python -m tfg_mm split` keeps every class in every split it can)."
                ),
                stacklevel=2,
            )
    if record is None:
        record = record_of(params, root)
    # every referenced image decoded once per dataset content (cached by its hash), before any training
    annotation_files = [record[key] for key in ("train_json", "val_json", "test_json") if record.get(key)]
    decode_images(annotation_files, root / params.images_dir, key=record["hash"], progress=progress)
    return Data(
        root,
        train,
        val,
        train_loader,
        val_loader,
        list(val.categories),
        list(val.cat_ids),
        record,
        test,
        test_loader,
        shots,
    )
