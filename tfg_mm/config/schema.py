"""The one flat parameter schema of every notebook, params file and ablation grid.

The thesis lost days to nested-vs-flat configuration errors that surfaced as ``AttributeError`` /
``TypeError`` deep inside a training engine. Here every parameter is a flat top-level name (the
nanoGPT idea), declared once in :class:`Params` with its type, range, default and meaning, in five
groups (data, detector, training, phase 2, ablations). Loading and checking values from files,
notebooks and grids is :mod:`tfg_mm.config.sources`; the messages that name a bad value are
:mod:`tfg_mm.config.messages`; ``docs/parameters.md`` is generated from this schema by
:mod:`tfg_mm.config.reference`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from tfg_mm.config.messages import ParamsMessages, config_error, yaml_value

#: The prompt templates of ``prompts: ensemble`` (the default of ``templates``), adapted to industrial
#: surface inspection. Each holds one ``{}`` that receives the class name.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {} defect",
    "{} on a metal surface",
    "an industrial image of {}",
    "a close-up photo of a {} on steel",
    "a {} defect on a rolled metal sheet",
    "a surface inspection image showing {}",
)
#: The prompt of a class in ``prompts: single`` mode when ``class_descriptions`` has no entry for it.
SINGLE_TEMPLATE = "a photo of a {}."

# The choices of every choice-valued parameter, named once. The schema's fields use these aliases;
# other modules derive their choice lists from them with ``typing.get_args`` (e.g.
# ``get_args(Gate) == ("scalar", "per_class")``) instead of repeating the values. Each alias is the
# parameter's name in CamelCase, except ``TextEncoderKind`` (``tfg_mm.multimodal.text.TextEncoder`` is the
# encoder interface).
Preset = Literal["atto", "femto", "pico", "n", "s", "m", "l", "x"]
Fidelity = Literal["official", "transformers"]
Optimizer = Literal["AdamW", "SGD"]
OptimizerImpl = Literal["auto", "for-loop", "foreach", "fused"]
Compile = Literal["none", "backbone"]
MemoryFormat = Literal["auto", "channels_last", "contiguous"]
AttnImplementation = Literal["auto", "blocks", "sdpa", "eager"]
Scheduler = Literal["flatcosine", "cosine", "constant"]
Amp = Literal["no", "fp16", "bf16"]
SelectMetric = Literal["map", "map50"]
Select = Literal["best_val", "last", "best_val_or_baseline"]
#: ``device`` is a string, not a choice: ``cuda:N`` names any visible GPU (``tfg_mm.runtime.devices`` resolves it)
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
Gate = Literal["scalar", "per_class"]
Fusion = Literal["linear", "mlp"]
Prompts = Literal["single", "ensemble"]
TextEncoderKind = Literal["minilm", "sentence", "open_clip", "random", "none"]
Unfreeze = Literal["none", "heads", "decoder", "encoder", "all"]
DetectorMode = Literal["eval_shim", "train_frozen"]
Tracking = Literal["all", "mlflow", "tensorboard", "none"]
Augment = Literal["official", "light", "none"]
Recipe = Literal["custom", "official"]

#: The parameters ``recipe: official`` sets from the preset's official schedule (``tfg_mm.detector.recipe.
#: resolve_recipe``). With ``recipe: official`` each must stay at its schema default: a value that differs is
#: refused (one recipe decides the schedule; no silent mix of the two).
RECIPE_KEYS: tuple[str, ...] = (
    "optimizer",
    "lr",
    "lr_backbone",
    "weight_decay",
    "scheduler",
    "lr_warmup_steps",
    "flat_fraction",
    "min_lr_ratio",
    "ema_decay",
    "ema_warmup",
    "no_aug_epochs",
)
#: How YAML / papermill spell a bool in a string (pydantic's lax bool values)
_TRUE_WORDS = frozenset({"true", "yes", "y", "on", "t", "1"})
_FALSE_WORDS = frozenset({"false", "no", "n", "off", "f", "0"})
Executor = Literal["local", "slurm", "submitit-local"]


def _is_device(device: str) -> str:
    if not DEVICE_PATTERN.fullmatch(device):
        raise ValueError(f"{device!r} is not a device: write `auto`, `cpu`, `cuda` or `cuda:N` (N = 0, 1, ...)")
    return device


def _workers(value: int | str) -> int | str:
    if value != "auto" and (isinstance(value, str) or value < 0):
        raise ValueError("write a number of worker processes ≥ 0, or `auto`")
    return value


def _sbatch_options(value: dict[str, Any]) -> dict[str, Any]:
    bad = {k: v for k, v in value.items() if not isinstance(v, (str, int, float, bool))}
    if bad:
        raise ValueError(
            f"each sbatch option takes one value (a string, number or true), e.g. `{{account: mylab, "
            f"qos: normal}}`; not {', '.join(f'`{k}`' for k in bad)}"
        )
    return value


def _pin(value: bool | str) -> bool | str:
    if isinstance(value, str) and value != "auto":
        raise ValueError("write `true`, `false` or `auto`")
    return value


def _choice_with_hint(value: Any, choices: tuple[str, ...]) -> Any:
    """A string outside ``choices`` fails with the closest choice ("did you mean `official`?")."""
    if isinstance(value, str) and value not in choices:
        near = difflib.get_close_matches(value.lower(), choices, n=1, cutoff=0.5)
        hint = f"did you mean `{near[0]}`?" if near else f"choose one of {', '.join(choices)}"
        raise ValueError(f"{value!r} is not one of {', '.join(choices)}: {hint}")
    return value


def _augment_value(value: Any) -> Any:
    """``augment``: ``official`` / ``light`` / ``none``; ``true`` / ``false`` (its older bool spelling) mean
    ``light`` / ``none``."""
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return "light" if value else "none"
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
        return "light" if value.strip().lower() in _TRUE_WORDS else "none"
    return _choice_with_hint(value, get_args(Augment))


def _recipe_value(value: Any) -> Any:
    return _choice_with_hint(value, get_args(Recipe))


def _template_has_one_placeholder(template: str) -> str:
    """A prompt template takes the class name once: without ``{}`` every class would get the same prompt
    (and the same embedding); with two, formatting it with the class name fails."""
    if template.count("{}") != 1:
        raise ValueError(f"template {template!r} must hold exactly one '{{}}' placeholder for the class name")
    return template


def _class_descriptions_value(value: Any) -> dict | str:
    """A mapping class name → description (str) or descriptions (non-empty list of str), or a file path (str).

    One pydantic union would report each wrong value three times (once per member); this names it once.
    The file itself is read (and its keys checked against the classes) by ``tfg_mm.multimodal.text.class_prompts``.
    """
    if isinstance(value, str | Path):
        if not str(value).strip():
            raise ValueError("an empty path: give a YAML / JSON file, or write the mapping itself")
        return str(value)
    if not isinstance(value, Mapping):
        raise ValueError(f"{yaml_value(value)} is neither a mapping class name → description(s) nor a file path")
    clean: dict[str, str | list[str]] = {}
    for name, text in value.items():
        ok = isinstance(text, str) or (isinstance(text, list) and text and all(isinstance(t, str) for t in text))
        if not ok:
            raise ValueError(
                f"`class_descriptions[{str(name)!r}]` = {yaml_value(text)} is not a valid string or non-empty list "
                "of strings (write one description, or a list of them)"
            )
        clean[str(name)] = text
    return clean


# --------------------------------------------------------------------------------------------
# The schema, one group per pydantic model. ``Params`` inherits them all; pydantic collects the
# fields of multiple bases in reverse MRO order, so ``Params`` lists its bases last-group-first
# to keep the fields (and the generated reference) in the order below.
# --------------------------------------------------------------------------------------------


class DataParams(BaseModel):
    """Which COCO dataset to train and evaluate on, and the embedded synthetic default."""

    dataset: str = Field(
        "data/synthetic",
        description="COCO dataset folder (annotation jsons + images folder). Relative paths resolve against "
        "the project root (the folder holding `pyproject.toml`), else the working directory.",
    )
    train_json: str = Field("instances_train.json", description="Training annotation file, relative to `dataset`.")
    val_json: str = Field(
        "instances_val.json",
        description="Validation annotation file, relative to `dataset`: the selection set (it chooses the epoch, "
        "the operating thresholds); never the images a reported number is judged on.",
    )
    test_json: str = Field(
        "",
        description="Held-out test annotation file, relative to `dataset` (empty = none): every finished run is "
        "judged once on it (`final.test`: the selected and the last checkpoint), and nothing selects on it. "
        "Its categories must be the training set's and its images in neither train nor val.",
    )
    images_dir: str = Field("images", description="Images folder, relative to `dataset`.")
    train_shots: int | None = Field(
        None,
        ge=1,
        description="The low-data regime: keep at most this many training images of each class of `shots_classes` "
        "(an image is kept or dropped whole; images without those classes all stay; validation and test "
        "untouched); null = every training image. The subset depends on `shots_seed` only, so a baseline and "
        "its phase-2 runs of any seed share it.",
    )
    shots_classes: list[str] = Field(
        default_factory=list,
        description="The classes `train_shots` starves (empty = every class), e.g. [perforation, break].",
    )
    shots_seed: int = Field(0, ge=0, description="Seed of the `train_shots` subset (the same seed, the same images).")
    generate_if_missing: bool = Field(
        True,
        description="Build the embedded synthetic defect set when `dataset` is the default and does not exist yet.",
    )
    synthetic_seed: int = Field(0, ge=0, description="Seed of the synthetic generator (same seed, same bytes).")
    synthetic_train: int = Field(400, ge=1, description="Number of synthetic training images.")
    synthetic_val: int = Field(100, ge=1, description="Number of synthetic validation images.")
    synthetic_test: int = Field(
        200,
        ge=0,
        description="Number of synthetic test images (`instances_test.json`; 0 = none). 200 give the hard classes "
        "more than 40 boxes each.",
    )
    synthetic_image_size: int = Field(
        160,
        ge=64,
        le=4096,
        description="Side of the square synthetic images, in pixels (the generator's minimum is 64).",
    )


class DetectorParams(BaseModel):
    """The DEIMv2 detector: size preset, input size, initial weights, class heads, fidelity."""

    preset: Preset = Field(
        "atto",
        description="Official DEIMv2 size: atto/femto/pico/n use an HGNetv2 backbone, s/m/l/x a DINOv3 ViT.",
    )
    image_size: int = Field(
        160, ge=32, le=1280, multiple_of=32, description="Square network input size in pixels (a multiple of 32)."
    )
    pretrained: str = Field(
        "",
        description="Initial detector weights to fine-tune: a Hugging Face model id, a transformers DEIMv2 folder "
        "(save_pretrained), a tfg_mm checkpoint folder or run_dir (its checkpoints/best), or an official DEIMv2 "
        ".pth (converted on the fly); empty = random init. Another class count re-initialises the class heads "
        "(`reinit_class_heads`); the run contract's `model.pretrained` lists what was loaded, re-initialised and "
        "dropped.",
    )
    checkpoint: str = Field(
        "",
        description="An existing checkpoint to evaluate instead of training (any source `pretrained` takes, with "
        "the dataset's classes); empty = train.",
    )
    num_classes: int | None = Field(
        None, ge=1, description="Number of object classes; null = taken from the dataset's categories."
    )
    reinit_class_heads: bool = Field(
        True,
        description="`pretrained` weights with another number of classes: re-initialise the class heads (every "
        "decoder layer's and the encoder's score head with the official prior bias, the denoising class "
        "embedding) and load everything else; false = fail on a class mismatch.",
    )
    fidelity: Fidelity = Field(
        "official",
        description="`official` = the DEIMv2 architecture and criterion of the official repository; "
        "`transformers` = the uncorrected upstream model and loss, for comparison only.",
    )
    num_queries: int | None = Field(
        None,
        ge=1,
        le=3000,
        description="Object queries the decoder selects from the encoder tokens (at most that many detections an "
        "image); null = the preset's (atto 100, femto 150, pico 200, n-x 300) or the checkpoint's. Lower it to "
        "train a preset at an `image_size` below its minimum (tokens = sum over strides of (image_size/stride)^2 "
        "must be >= queries).",
    )
    matcher_change_epoch: int | None = Field(
        None,
        ge=1,
        description="From this training epoch on (1-based, as the run history counts) the matcher pairs "
        "predictions and objects by -score*IoU^4 instead of the focal + L1 + GIoU cost; null = the preset's "
        "official value (atto/femto/pico 450, n 136, s 100, m 80, l 50, x 45: the official schedules' "
        "epochs, never reached by short runs) or the checkpoint's.",
    )


class TrainingParams(BaseModel):
    """The one training loop shared by every phase: optimiser, schedule, EMA, evaluation, run folder, tracking."""

    epochs: int = Field(12, ge=0, description="Training epochs (0 = evaluate only).")
    batch_size: int = Field(
        16,
        ge=1,
        description="Images per optimiser step and process; several processes (`torchrun`, `accelerate launch`) "
        "train on `batch_size` x processes images a step.",
    )
    lr: float = Field(5e-4, gt=0, description="Learning rate of the detector's encoder, decoder and heads.")
    lr_backbone: float = Field(
        5e-4,
        ge=0,
        description="Learning rate of the backbone (0 = frozen). Same as `lr` by default because the backbone "
        "learns from scratch on synthetic data; lower it for a pretrained backbone.",
    )
    weight_decay: float = Field(1e-4, ge=0, description="AdamW / SGD weight decay (never applied to norms and biases).")
    optimizer: Optimizer = Field("AdamW", description="Optimiser.")
    attn_implementation: AttnImplementation = Field(
        "auto",
        description="The detector's self-attention: `blocks` (the training decoder's attention computed only over "
        "the query blocks the denoising mask leaves visible; otherwise `sdpa`), `sdpa` (torch's fused "
        "scaled-dot-product attention over every pair, masked) or `eager` (matmul + softmax); equal to float "
        "rounding. `auto` = `blocks` (scripts/bench_step.py).",
    )
    memory_format: MemoryFormat = Field(
        "auto",
        description="Memory format of the training images (the activations follow them): `channels_last` or "
        "`contiguous`; equal to float rounding, evaluation is always `contiguous`. `auto` = `channels_last` on "
        "the CPU (the step 1.10x faster on 2 cores, scripts/bench_step.py), `contiguous` on a GPU (not measured).",
    )
    compile: Compile = Field(
        "none",
        description="`backbone`: `torch.compile` the detector's backbone and hybrid encoder (fixed input shapes) "
        "before training; the decoder and the loss, whose shapes change with every batch's boxes, stay eager. "
        "About 1.1x a CPU step after a one-off compile (about 2 min on 2 cores, seconds once torch's cache "
        "holds it; needs a C++ compiler); equal to float rounding (scripts/bench_step.py --compile).",
    )
    optimizer_impl: OptimizerImpl = Field(
        "auto",
        description="How torch runs the optimiser update: `for-loop` (one tensor at a time), `foreach` (all "
        "tensors per operation: identical numbers, fewer calls) or `fused` (one kernel; equal to rounding). "
        "`auto` = `fused` (scripts/bench_step.py).",
    )
    scheduler: Scheduler = Field(
        "flatcosine",
        description="Learning-rate schedule after warm-up: `flatcosine` = flat for `flat_fraction` of training, "
        "then cosine down to `min_lr_ratio`.",
    )
    lr_warmup_steps: int = Field(50, ge=0, description="Linear learning-rate warm-up, in optimiser steps.")
    flat_fraction: float = Field(
        0.5, ge=0, le=1, description="Share of training at the flat learning rate (flatcosine)."
    )
    min_lr_ratio: float = Field(0.05, ge=0, le=1, description="Final learning rate as a fraction of the initial one.")
    grad_clip: float = Field(0.1, ge=0, description="Maximum global gradient norm; 0 = no clipping.")
    ema: bool = Field(True, description="Keep an exponential moving average of the weights and evaluate it.")
    ema_decay: float = Field(0.999, gt=0, lt=1, description="EMA decay per optimiser step.")
    ema_warmup: int = Field(100, ge=0, description="Steps over which the EMA decay ramps up to `ema_decay`.")
    amp: Amp = Field(
        "no",
        description="Mixed precision through accelerate: `bf16` (CPU and GPUs of compute capability 8.0+) or `fp16` "
        "(CUDA only, with gradient scaling: a step whose gradients overflow is skipped and the scale lowered).",
    )
    augment: Annotated[Augment, BeforeValidator(_augment_value)] = Field(
        "light",
        description="Training augmentation (torchvision.transforms.v2): `light` = flips, mild colour jitter and "
        "crop (the default); `official` = the official DEIMv2 pipeline (photometric distortion, zoom-out, IoU "
        "crop, flip, sanitised boxes; mosaic with `mosaic_prob`); `none`. `true` / `false` mean `light` / `none`.",
    )
    recipe: Annotated[Recipe, BeforeValidator(_recipe_value)] = Field(
        "custom",
        description="`custom` = the schedule parameters as given; `official` = the preset size's official DEIMv2 "
        "schedule scaled to `epochs` (lr, backbone lr, weight decay, quadratic warm-up, flat-cosine to "
        "lr_gamma, no-augmentation tail, EMA), recorded as `recipe` in metrics.json; then "
        + ", ".join(f"`{k}`" for k in RECIPE_KEYS)
        + " must stay at their defaults.",
    )
    train_crop: int | None = Field(
        None,
        ge=32,
        multiple_of=32,
        description="Train on random square crops of this many pixels cut from each image at `image_size`, while "
        "validation, test and deployment see the whole image at `image_size`: small defects on large sources "
        "(DeepPCB: 640 px, ~31 px defects) keep their size while a step costs what `train_crop` px costs. Part of "
        "the augmentation (`augment` light or official); null = whole images.",
    )
    mosaic_prob: float = Field(
        0.0,
        ge=0,
        le=1,
        description="`augment: official` only: the chance that a training image is a 2 x 2 mosaic of it and three "
        "random others under a random affine (the official DEIMv2 Mosaic settings; it then skips zoom-out and IoU "
        "crop); 0 = off. Never in the no-augmentation tail.",
    )
    no_aug_epochs: int = Field(
        0,
        ge=0,
        description="The last this many epochs train without random augmentation (the official `stop_epoch` "
        "policy: `official` keeps only the flip, `light` none); `recipe: official` sets it.",
    )
    num_workers: Annotated[int | str, AfterValidator(_workers)] = Field(
        "auto",
        description="DataLoader worker processes (≥ 0); `auto` = none on CPU (the project's CPU results), "
        "min(8, CPUs) on CUDA.",
    )
    pin_memory: Annotated[bool | str, AfterValidator(_pin)] = Field(
        "auto", description="Pinned (page-locked) batches for faster copies to the GPU; `auto` = on CUDA only."
    )
    seed: int = Field(0, ge=0, description="Seed of model initialisation, data order and augmentation.")
    deterministic: bool = Field(True, description="Use deterministic algorithms (identical histories on CPU).")
    eval_every: int = Field(1, ge=1, description="Evaluate on the validation split every this many epochs.")
    top_k: int = Field(100, ge=1, description="Detections kept per image (top-k over queries x classes).")
    select_metric: SelectMetric = Field(
        "map", description="Validation metric that selects the best checkpoint (`final` in metrics.json)."
    )
    select: Select = Field(
        "best_val",
        description="Which evaluated epoch becomes the run's checkpoint (`final`): `best_val` the best "
        "`select_metric` on the validation images among the trained epochs (epoch 0, the starting point, is the "
        "reference, not a candidate: in phase 2 it is the baseline itself), `last` the last epoch, "
        "`best_val_or_baseline` (phase 2, for deployment) the best among epoch 0 too: it falls back to the "
        "baseline when no trained epoch beats it, and every report says so.",
    )
    device: Annotated[str, AfterValidator(_is_device)] = Field(
        "auto",
        description="`auto` (the current CUDA device when one is visible, else CPU), `cpu`, `cuda` or `cuda:N` "
        "(the N-th visible GPU).",
    )
    run_dir: str = Field(
        "runs/baseline",
        description="Folder of this run: checkpoints, history and the run contract `metrics.json`.",
    )
    overwrite: bool = Field(
        False, description="Replace a finished run already in `run_dir` (otherwise that is an error)."
    )
    resume: bool = Field(
        True,
        description=(
            "Resume an interrupted run found in `run_dir` from its last checkpoint, only when it is the same run "
            "(same params, dataset and code); another run there is refused with what differs."
        ),
    )
    save_every: int = Field(1, ge=1, description="Write the resumable `last` checkpoint every this many epochs.")
    max_steps_per_epoch: int | None = Field(
        None, ge=1, description="Cap on optimiser steps per epoch (for tests and smoke runs); null = whole epoch."
    )
    tracking: Tracking = Field(
        "all",
        description="Where every run also logs its params, per-epoch metrics and artefacts: `mlflow`, "
        "`tensorboard` (`{run_dir}/tensorboard`), `all` (both) or `none`. Never changes a result or the run id; "
        "a tracking failure is logged once and the run goes on (see README, Experiment tracking).",
    )
    tracking_uri: str = Field(
        "",
        description="MLflow store: empty = the local SQLite store `runs/mlruns/mlflow.db` (artefacts in "
        "`runs/mlruns/artifacts`); a folder (relative to the project root) holds such a store; or any MLflow "
        "tracking URI (`http://host:5000`, `sqlite:///file.db`).",
    )
    experiment_name: str = Field(
        "", description="MLflow experiment of the run; empty = `tfg_mm-<phase>` (`tfg_mm-baseline`, `tfg_mm-phase2`)."
    )
    deploy_benchmark_runs: int = Field(
        50,
        ge=0,
        description="Notebooks 01 / 02's Deployment section: timed runs per latency figure of `python -m tfg_mm "
        "benchmark` on the selected checkpoint (measured once per checkpoint, kept in `{run_dir}/deploy.json`); "
        "0 = no measurement (the section shows an earlier deploy.json, or the command). Never changes a result.",
    )


class Phase2Params(BaseModel):
    """Phase 2: the residual text fusion on top of the trained baseline detector."""

    baseline: str = Field(
        "",
        description="The phase-1 result to start from: a checkpoint folder or the `run_dir` of notebook 01.",
    )
    alpha: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Initial gate α of `fused = base + α·(logit_scale·cos + bias)`, in [0, 1]: 0 reproduces the "
        "baseline exactly, 1 adds the whole text term (with `gate_tanh: true`, below 1).",
    )
    alpha_learnable: bool = Field(True, description="Learn α (otherwise it stays at its initial value).")
    gate: Gate = Field("scalar", description="One α for all classes, or one per class.")
    gate_tanh: bool = Field(
        False,
        description="Bound the effective gate to (-1, 1) through tanh (Flamingo-style gating); `alpha` is then its "
        "initial value after tanh, in (-1, 1).",
    )
    fusion: Fusion = Field(
        "linear",
        description="Projection of the decoder hidden state into the text space: `linear` (the thesis's "
        "Linear(256, 512)) or `mlp` (Linear → ReLU → Dropout → Linear).",
    )
    fusion_hidden: int = Field(256, ge=1, description="Hidden width of the `mlp` projection.")
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the hidden state before the `linear` projection, or between the "
        "two layers of the `mlp` projection.",
    )
    logit_scale: float = Field(
        10.0,
        gt=0,
        le=100,
        description="Initial multiplier of the cosine similarity (text logits); at most 100, CLIP's own clamp.",
    )
    logit_scale_learnable: bool = Field(True, description="Learn the logit scale.")
    fusion_bias: bool = Field(True, description="Learnable bias added to the scaled similarity.")
    prompts: Prompts = Field(
        "ensemble",
        description="`single` = one prompt per class (its first description, else "
        f'"{SINGLE_TEMPLATE.format("{class name}")}"); `ensemble` = every template (plus each of its descriptions), '
        "each embedding normalised, averaged, renormalised. Class names are humanised in the templates "
        "(`surface_crack`, `oil-stain`, `surfaceCrack` → surface crack, oil stain, surface crack), and an article "
        'right before the name agrees with it ("a photo of an inclusion").',
    )
    class_descriptions: Annotated[Any, BeforeValidator(_class_descriptions_value)] = Field(
        default_factory=dict,
        description="Class name → one description or a list of them, written here or as the path of a YAML / "
        "JSON file holding that mapping (e.g. a thesis's defect catalogue). `single` uses a class's first "
        "description; `ensemble` every template plus each description (the only mapping-valued parameter).",
    )
    templates: list[Annotated[str, AfterValidator(_template_has_one_placeholder)]] = Field(
        default_factory=lambda: list(DEFAULT_TEMPLATES),
        min_length=1,
        description="Prompt templates for `prompts: ensemble`; `{}` is replaced by the class name.",
    )
    text_encoder: TextEncoderKind = Field(
        "minilm",
        description="Text source: `minilm` (bundled all-MiniLM-L6-v2, offline), `sentence` (any HF sentence "
        "encoder, `text_model`), `open_clip`, `random` (fixed random prototypes: the control for text "
        "semantics), `none` (no fusion).",
    )
    text_model: str = Field(
        "",
        description="open_clip architecture (e.g. `ViT-B-32`) or Hugging Face sentence encoder id / folder.",
    )
    text_pretrained: str = Field("", description="open_clip pretrained tag or local checkpoint file.")
    text_cache_dir: str = Field(".cache/text", description="Folder of the cached class embeddings.")
    lr_fusion: float = Field(1e-3, gt=0, description="Learning rate of the fusion projection.")
    lr_detector: float = Field(1e-5, ge=0, description="Learning rate of the unfrozen detector parts.")
    lr_gate: float = Field(
        1e-2, gt=0, description="Learning rate of α, the logit scale and the bias (no weight decay)."
    )
    warmup_epochs: int = Field(
        2, ge=0, description="Epochs that train only the fusion (detector frozen) before `unfreeze` applies."
    )
    unfreeze: Unfreeze = Field(
        "heads", description="Detector parts trained (at `lr_detector`) after the warm-up epochs."
    )
    detector_mode: DetectorMode = Field(
        "train_frozen",
        description="How the frozen detector runs: `train_frozen` (train mode, frozen BatchNorm, no dropout) or "
        "`eval_shim` (eval mode with auxiliary outputs replicated, as in the thesis).",
    )
    kd_weight: float = Field(
        0.0, ge=0, description="Weight of distillation to the frozen baseline's class scores (0 = off)."
    )
    cache_warmup: bool = Field(
        True,
        description="Cache the frozen detector's outputs during the warm-up epochs: faster, and the warm-up "
        "then sees un-augmented images without denoising queries.",
    )


class AblationParams(BaseModel):
    """The ablation grid runner and its statistics."""

    grid: str = Field("params/ablations/small.yaml", description="Ablation grid file (variants, seeds, base).")
    seeds: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: [0], min_length=1, description="Seeds each variant runs with."
    )
    workers: int = Field(1, ge=1, description="Variants run in parallel processes (`executor: local`).")
    executor: Executor = Field(
        "local",
        description="Where the grid's runs execute: `local` worker processes on this machine, `slurm` one SLURM "
        "job per run through submitit (a job array), `submitit-local` the same jobs through submitit's local "
        "executor (subprocesses on this machine: how the SLURM path is tested).",
    )
    slurm_partition: str = Field(
        "", description="SLURM partition of the grid's jobs (`executor: slurm`; required there, `sinfo -s` lists them)."
    )
    slurm_gpus_per_run: int = Field(1, ge=0, description="GPUs per grid run (SLURM `--gpus-per-node`; 0 = CPU).")
    slurm_cpus_per_run: int = Field(
        4, ge=1, description="CPUs per grid run (SLURM `--cpus-per-task`; also the run's OMP / MKL threads)."
    )
    slurm_mem_gb: float = Field(32.0, gt=0, description="Memory per grid run in GB (SLURM `--mem`).")
    slurm_time_min: int = Field(
        240,
        ge=1,
        description="Time limit per grid run in minutes (SLURM `--time`); a job that reaches it is requeued "
        "(submitit, at most 3 times) and its run, recorded `interrupted`, resumes from its last saved epoch.",
    )
    slurm_array_parallelism: int = Field(
        8, ge=1, description="Grid runs at most running at once (SLURM job array `%N`; `submitit-local`: subprocesses)."
    )
    slurm_sbatch: Annotated[dict[str, Any], AfterValidator(_sbatch_options)] = Field(
        default_factory=dict,
        description="Extra sbatch options of the grid's jobs, e.g. `{account: mylab, qos: normal, constraint: a100}` "
        "(submitit's `slurm_additional_parameters`).",
    )
    slurm_log_dir: str = Field(
        "runs/slurm",
        description="Folder of the grid jobs' submitit files and logs (`<folder>/<job id>/`; relative: to the project).",
    )
    reuse: bool = Field(True, description="Reuse a finished run with the same params, dataset hash and code version.")
    bootstrap_resamples: int = Field(
        500,
        ge=10,
        description="Bootstrap resamples of the Δ intervals (validation images; with several seeds, seeds then images).",
    )
    confidence: float = Field(0.95, ge=0.5, le=0.999, description="Confidence level of the bootstrap intervals.")
    wise_lambdas: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
        min_length=1,
        description="WiSE-FT interpolation weights λ: θ = (1−λ)·θ_baseline + λ·θ_finetuned.",
    )


#: Where the grid's runs execute (:mod:`tfg_mm.ablations.executors`): keys a grid file may set at its
#: top level too; never part of a run's params or ``run_id`` (the same run, wherever it ran).
EXECUTOR_KEYS = (
    "executor",
    "slurm_partition",
    "slurm_gpus_per_run",
    "slurm_cpus_per_run",
    "slurm_mem_gb",
    "slurm_time_min",
    "slurm_array_parallelism",
    "slurm_sbatch",
    "slurm_log_dir",
)

#: Display order of the groups (reference doc, ``group_of``).
GROUPS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("Data", DataParams),
    ("Detector", DetectorParams),
    ("Training", TrainingParams),
    ("Phase 2", Phase2Params),
    ("Ablations", AblationParams),
)


class Params(AblationParams, Phase2Params, TrainingParams, DetectorParams, DataParams):
    """Every parameter of every notebook, flat, typed, ranged and documented.

    Build it with :func:`load_params` / :func:`params_from_notebook`, which name the source of a
    bad value and raise :class:`ConfigError`. (``Params(**kw)`` validates too but raises pydantic's
    ``ValidationError``: pydantic routes ``model_validate`` through a custom ``__init__``, so
    wrapping it would hide the sources.) Attribute assignment is validated and raises
    ``ConfigError``, so ``params.epochs = -1`` in a notebook fails as clearly as a bad file.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in type(self).model_fields:
            raise config_error([f"assignment: {MESSAGES.unknown_key(name, value)}"])
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise config_error(MESSAGES.validation_problems(exc, {name: value}, {name: "assignment"})) from None

    @classmethod
    def group_of(cls, name: str) -> str:
        """The group ("Data", "Detector", "Training", "Phase 2", "Ablations") a parameter belongs to."""
        for group, model in GROUPS:
            if name in model.model_fields:
                return group
        raise config_error([MESSAGES.unknown_key(name, None)])


#: How errors name a bad value of this schema (:mod:`tfg_mm.config.messages`).
MESSAGES = ParamsMessages(Params)


def default_of(name: str) -> Any:
    """The schema's default of parameter ``name`` (a fresh copy for list / dict defaults).

    Functions that take a parameter as an argument use it as their default, so that calling them
    without it behaves as a run without it in its params (``alpha: float = default_of("alpha")``).
    """
    if name not in Params.model_fields:
        raise config_error([MESSAGES.unknown_key(name, None)])
    return Params.model_fields[name].get_default(call_default_factory=True)


def diff_from_default(p: Params) -> dict:
    """``{key: value}`` of every parameter that differs from its schema default, in schema order."""
    defaults = Params()
    return {name: getattr(p, name) for name in Params.model_fields if getattr(p, name) != getattr(defaults, name)}
