"""Text encoders, prompts and the embedding cache (tfg_mm.multimodal.text).

Real encoders only: the bundled all-MiniLM-L6-v2 and a tiny randomly initialised open_clip model
registered from a config file. Nothing downloads: the pretrained-tag test runs with the hub offline.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F

from tfg_mm.config import DEFAULT_TEMPLATES, Params, default_of, load_params
from tfg_mm.errors import ConfigError, OfflineError
from tfg_mm.multimodal.text import (
    RandomPrototypes,
    TextEncoder,
    build_text_encoder,
    cache_key,
    class_embeddings,
    class_prompts,
    fill_template,
    humanise,
    load_class_descriptions,
    prompts_record,
)
from tfg_mm.training.phase2 import text_embeddings

TINY_OPEN_CLIP = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder("minilm")


@pytest.fixture()
def tiny_clip_config(tmp_path):
    path = tmp_path / "tfg_tiny_clip.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP))
    return path


class CountingEncoder:
    """Delegates to a real encoder and counts how often it is asked to encode."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.dim, self.description = inner.dim, inner.description

    def encode(self, texts):
        self.calls += 1
        return self.inner.encode(texts)


def test_minilm_is_offline_real_and_described(minilm):
    assert isinstance(minilm, TextEncoder)
    assert minilm.dim == 384
    assert set(minilm.description) == {"kind", "model", "weights", "dim"}
    assert minilm.description["kind"] == "minilm" and minilm.description["dim"] == 384
    assert "sha256:" in minilm.description["weights"]
    emb = minilm.encode(["a thin crack in a metal sheet", "a fracture in the steel plate", "a cat sleeping on a sofa"])
    assert emb.shape == (3, 384) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    # Real semantics: the two defect sentences are closer to each other than to the cat.
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


def test_class_embeddings_normalise_average_renormalise(minilm):
    prompts = class_prompts(["scratch", "dent"], "ensemble", templates=["a photo of a {}.", "a {} defect."])
    got = class_embeddings(minilm, prompts)
    expected = []
    for per_class in prompts:
        each = F.normalize(minilm.encode(per_class), dim=-1)
        expected.append(F.normalize(each.mean(0), dim=-1))
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2))


def test_cache_is_keyed_by_encoder_and_prompts(minilm, tmp_path):
    counting = CountingEncoder(minilm)
    prompts = class_prompts(["hole", "crack"], "single", {"hole": "a small perforation in a metal sheet"})
    first = class_embeddings(counting, prompts, cache_dir=tmp_path)
    path = tmp_path / f"{cache_key(minilm.description, prompts)}.pt"
    assert path.is_file() and counting.calls == 1
    again = class_embeddings(counting, prompts, cache_dir=tmp_path)
    assert counting.calls == 1 and torch.equal(first, again)  # read back, not re-encoded
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # atomic write left no temp file

    other_prompts = class_prompts(["hole", "crack"], "single")
    class_embeddings(counting, other_prompts, cache_dir=tmp_path)
    assert counting.calls == 2 and len(list(tmp_path.glob("*.pt"))) == 2

    counting.description = {**minilm.description, "weights": "other weights"}
    class_embeddings(counting, prompts, cache_dir=tmp_path)
    assert counting.calls == 3 and len(list(tmp_path.glob("*.pt"))) == 3


def test_class_prompts_modes_and_errors():
    single = class_prompts(["Normal", "Roturas"], "single", {"Normal": "Normal, clean surface without defects."})
    assert single == [["Normal, clean surface without defects."], ["a photo of a Roturas."]]
    ensemble = class_prompts(["scratch_mark"], "ensemble", {"scratch_mark": "a long thin scratch"})
    assert len(ensemble[0]) == len(DEFAULT_TEMPLATES) + 1
    assert ensemble[0][0] == DEFAULT_TEMPLATES[0].format("scratch mark") and ensemble[0][-1] == "a long thin scratch"
    with pytest.raises(ConfigError, match="class_descriptions"):
        class_prompts(["a"], "single", {"b": "text"})
    with pytest.raises(ConfigError, match=r"`templates` entry 'no placeholder' must contain exactly one"):
        class_prompts(["a"], "ensemble", templates=["no placeholder"])
    with pytest.raises(ConfigError, match=r"`templates` is empty"):
        class_prompts(["a"], "ensemble", templates=[])
    with pytest.raises(ConfigError, match=r"`prompts: many` is unknown\. Fix: use one of \['single', 'ensemble'\]"):
        class_prompts(["a"], "many")
    with pytest.raises(ConfigError, match="duplicates"):
        class_prompts(["a", "a"])
    assert {"templates", "prompts", "class_descriptions"} <= set(Params.model_fields)  # the names the errors use


def test_class_prompts_defaults_are_the_schema_defaults():
    # One template list: the schema's (the one params/phase2.yaml writes out explicitly).
    assert list(DEFAULT_TEMPLATES) == Params().templates
    names = ["scratch", "dent"]
    assert class_prompts(names) == class_prompts(names, default_of("prompts"), None, Params().templates)
    assert class_prompts(names) == [[t.format(n) for t in DEFAULT_TEMPLATES] for n in names]


def test_open_clip_tiny_config_random_init_and_local_checkpoint(tiny_clip_config, tmp_path):
    encoder = build_text_encoder("open_clip", model=str(tiny_clip_config), seed=3)
    assert encoder.dim == 24
    assert encoder.description["kind"] == "open_clip" and encoder.description["dim"] == 24
    assert encoder.description["weights"] == "random-init seed=3"
    assert encoder.description["model"].startswith(f"{tiny_clip_config.resolve()} sha256:")
    emb = class_embeddings(encoder, class_prompts(["scratch", "dent", "hole"], "ensemble"))
    assert emb.shape == (3, 24)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    # Seeded: the same description means the same weights (the cache key relies on it).
    same = build_text_encoder("open_clip", model=str(tiny_clip_config), seed=3)
    assert torch.equal(same.encode(["scratch"]), encoder.encode(["scratch"]))

    checkpoint = tmp_path / "tiny_clip.pt"
    torch.save(encoder.model.state_dict(), checkpoint)
    loaded = build_text_encoder("open_clip", model=str(tiny_clip_config), pretrained=str(checkpoint), seed=99)
    assert loaded.description["weights"].startswith(f"file:{checkpoint.resolve()} sha256:")
    assert torch.equal(loaded.encode(["scratch"]), encoder.encode(["scratch"]))


def test_open_clip_pretrained_tag_offline_fails_fast_with_the_fix(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # read at import time by huggingface_hub
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    start = time.perf_counter()
    with pytest.raises(OfflineError) as info:
        build_text_encoder("open_clip", model="ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "text_pretrained: /path/to/that/file" in message
    assert "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message and "text_encoder: minilm" in message


def test_sentence_encoder_offline_hub_id_and_bad_folder(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(OfflineError, match="text_model: DIR"):
        build_text_encoder("sentence", model="sentence-transformers/all-mpnet-base-v2")
    with pytest.raises(ConfigError, match="not a transformers model folder"):
        build_text_encoder("sentence", model=str(tmp_path))


def test_random_prototypes_are_seeded_unit_vectors():
    a = build_text_encoder("random", seed=1, num_classes=4)
    assert isinstance(a, RandomPrototypes) and a.description == {
        "kind": "random",
        "model": "",
        "weights": "seed=1",
        "dim": 384,
    }
    prompts = class_prompts(["w", "x", "y", "z"])
    emb = class_embeddings(a, prompts)
    assert emb.shape == (4, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))
    assert torch.equal(emb, class_embeddings(build_text_encoder("random", seed=1, num_classes=4), prompts))
    assert not torch.equal(emb, class_embeddings(build_text_encoder("random", seed=2, num_classes=4), prompts))
    assert class_embeddings(build_text_encoder("random", num_classes=4, dim=32), prompts).shape == (4, 32)
    with pytest.raises(ConfigError, match="num_classes"):
        class_embeddings(a, prompts[:3])
    with pytest.raises(ConfigError, match=r"build_text_encoder\(\.\.\., dim=1\).*Fix: pass a dim ≥ 2"):
        build_text_encoder("random", num_classes=4, dim=1)


def test_none_and_unknown_kind():
    assert build_text_encoder("none") is None
    with pytest.raises(ConfigError, match=r"`text_encoder: clip` is unknown\. Fix: use one of \['minilm', "):
        build_text_encoder("clip")


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("scratch", "scratch"),
        ("Normal", "Normal"),
        ("surface_crack", "surface crack"),
        ("oil-stain", "oil stain"),
        ("surfaceCrack", "surface crack"),
        ("RolledInScale", "Rolled in scale"),
        ("HTTPError", "HTTP error"),
        ("crazing__pitted-surface", "crazing pitted surface"),
        ("  edge_crack ", "edge crack"),
        ("crack2Wide", "crack2 wide"),
    ],
)
def test_humanise(name, words):
    assert humanise(name) == words


def test_embedded_default_prompts_are_the_templates_with_the_article_agreeing():
    """The embedded set's classes have no separators: their prompts are the templates', except that "a" before
    "inclusion" reads "an" (the one vowel-initial class)."""
    names = ["scratch", "perforation", "break", "stain", "dent", "inclusion"]
    prompts = class_prompts(names)
    assert prompts[:5] == [[t.format(n) for t in DEFAULT_TEMPLATES] for n in names[:5]]
    assert prompts[5] == [
        "a photo of an inclusion defect",
        "inclusion on a metal surface",
        "an industrial image of inclusion",
        "a close-up photo of an inclusion on steel",
        "an inclusion defect on a rolled metal sheet",
        "a surface inspection image showing inclusion",
    ]
    assert class_prompts(names, "ensemble", {}) == prompts
    assert class_prompts(names, "single")[:5] == [[f"a photo of a {n}."] for n in names[:5]]
    assert class_prompts(names, "single")[5] == ["a photo of an inclusion."]


@pytest.mark.parametrize(
    ("template", "name", "expected"),
    [
        ("a photo of a {}.", "oil stain", "a photo of an oil stain."),
        ("A {} defect", "edge crack", "An edge crack defect"),
        ("a  {}", "inclusion", "an  inclusion"),  # spacing kept
        ("a {} defect", "dent", "a dent defect"),
        ("data {}", "inclusion", "data inclusion"),  # only a lone article changes
        ("{} near a", "inclusion", "inclusion near a"),  # only the article right before the name
        ("an {}", "dent", "an dent"),  # a template's own article is kept as written
    ],
)
def test_the_article_before_the_class_name_agrees(template, name, expected):
    assert fill_template(template, name) == expected


def test_humanised_names_in_single_and_ensemble():
    single = class_prompts(["surface_crack", "oil-stain"], "single")
    assert single == [["a photo of a surface crack."], ["a photo of an oil stain."]]
    ensemble = class_prompts(["surface_crack"], "ensemble", templates=["a {} defect", "{} on steel"])
    assert ensemble == [["a surface crack defect", "surface crack on steel"]]


def test_descriptions_file_lists_single_first_ensemble_each(tmp_path):
    path = tmp_path / "catalogue.yaml"
    path.write_text(
        "surface_crack:\n  - A thin dark line across the rolled surface.\n  - A fracture of the sheet's skin.\n"
        "oil-stain: An irregular dark patch with soft edges.\n"
    )
    names = ["surface_crack", "oil-stain", "dent"]
    single = class_prompts(names, "single", str(path))
    assert single == [
        ["A thin dark line across the rolled surface."],
        ["An irregular dark patch with soft edges."],
        ["a photo of a dent."],
    ]
    templates = ["a {} defect", "{} on steel"]
    ensemble = class_prompts(names, "ensemble", path, templates)
    assert ensemble[0] == [
        "a surface crack defect",
        "surface crack on steel",
        "A thin dark line across the rolled surface.",
        "A fracture of the sheet's skin.",
    ]
    assert ensemble[1] == ["an oil stain defect", "oil stain on steel", "An irregular dark patch with soft edges."]
    assert ensemble[2] == ["a dent defect", "dent on steel"]
    # JSON works too, and gives the same prompts as the YAML
    as_json = tmp_path / "catalogue.json"
    as_json.write_text(json.dumps({"surface_crack": ["A thin dark line across the rolled surface."]}))
    assert class_prompts(names, "single", as_json)[0] == single[0]
    # and a mapping written in the params
    assert class_prompts(names, "ensemble", {"dent": ["a shallow hollow", "a pressed-in area"]}, templates)[2] == [
        "a dent defect",
        "dent on steel",
        "a shallow hollow",
        "a pressed-in area",
    ]


def test_descriptions_file_errors(tmp_path):
    path = tmp_path / "cat.yaml"
    path.write_text("surface_crak: a typo in the class name\n")
    with pytest.raises(ConfigError, match=r"cat\.yaml has entries \['surface_crak'\] that are not classes"):
        class_prompts(["surface_crack"], "single", path)
    path.write_text("surface_crack: []\n")
    with pytest.raises(ConfigError, match=r"cat\.yaml: entry 'surface_crack' = \[\] is empty"):
        class_prompts(["surface_crack"], "single", path)
    path.write_text("- a list, not a mapping\n")
    with pytest.raises(ConfigError, match=r"cat\.yaml holds a list, not a mapping"):
        load_class_descriptions(path)
    path.write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match=r"cat\.yaml cannot be parsed"):
        load_class_descriptions(path)
    with pytest.raises(ConfigError, match=r"missing\.yaml does not exist\. Fix: point `class_descriptions`"):
        load_class_descriptions(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"`class_descriptions`: entry 'dent' = 3"):
        load_class_descriptions({"dent": 3})


def test_class_descriptions_parameter_takes_a_mapping_or_a_file():
    assert Params(class_descriptions="params/catalogue.yaml").class_descriptions == "params/catalogue.yaml"
    assert Params(class_descriptions={"dent": ["a", "b"]}).class_descriptions == {"dent": ["a", "b"]}
    with pytest.raises(ConfigError, match=r"`class_descriptions\['dent'\]` = \[\] is not a valid string"):
        load_params({"class_descriptions": {"dent": []}})


def test_prompts_used_are_recorded_by_class(tmp_path):
    """The run contract's `text_encoder` record (phase 2's `text_embeddings`) holds the prompts by class."""
    path = tmp_path / "cat.yaml"
    path.write_text("oil-stain: [a dark patch, an oily smear]\n")
    params = load_params({"text_encoder": "random", "prompts": "ensemble", "class_descriptions": str(path)})
    emb, info = text_embeddings(params, ["oil-stain", "dent"])
    assert emb.shape[0] == 2
    by_class = info["prompts"]
    assert list(by_class) == ["oil-stain", "dent"]
    assert by_class["oil-stain"] == [fill_template(t, "oil stain") for t in DEFAULT_TEMPLATES] + [
        "a dark patch",
        "an oily smear",
    ]
    assert by_class["dent"] == [t.format("dent") for t in DEFAULT_TEMPLATES]
    assert prompts_record(["a"], [["x"]]) == {"a": ["x"]}
