"""Numbers that nothing was chosen on: the held-out test split, the selection rules, and the judgement of a run.

The test split of the synthetic set, the checks of a `test_json` before any work, the `select` rules (phase 2 never
selects its starting point, the baseline, unless asked to fall back), and `final.test` equal to what
`python -m tfg_mm evaluate` measures on the same checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import tiny
from tfg_mm import reporting
from tfg_mm.config import load_params
from tfg_mm.data.loaders import dataset_record
from tfg_mm.data.synthetic import generate
from tfg_mm.data.validate import DataWarning
from tfg_mm.errors import CheckpointError, ConfigError, DataError
from tfg_mm.training import loop
from tfg_mm.training.baseline import run_baseline
from tfg_mm.training.judge import evaluate_target
from tfg_mm.training.phase2 import run_phase2


@pytest.fixture(scope="module")
def test_dataset(tmp_path_factory) -> Path:
    """The tiny synthetic set of conftest with a test split of 6 images."""
    root = tmp_path_factory.mktemp("data") / "with_test"
    return generate(
        root, seed=3, n_train=12, n_val=6, n_test=6, image_size=160, defect_free_fraction=0.0, progress=False
    )


def _params(dataset, tmp_path, **overrides):
    return load_params(
        tiny(dataset, **{"run_dir": str(tmp_path / "run"), "test_json": "instances_test.json", **overrides})
    )


# --------------------------------------------------------------------------------------------
# The split
# --------------------------------------------------------------------------------------------
def test_the_test_split_changes_no_byte_of_train_and_val(tmp_path):
    without = generate(tmp_path / "a", seed=5, n_train=6, n_val=4, n_test=0, image_size=96, progress=False)
    with_test = generate(tmp_path / "b", seed=5, n_train=6, n_val=4, n_test=5, image_size=96, progress=False)
    for name in ("instances_train.json", "instances_val.json"):
        assert (without / name).read_bytes() == (with_test / name).read_bytes(), name
    for image in sorted((without / "images").iterdir()):
        assert image.read_bytes() == (with_test / "images" / image.name).read_bytes(), image.name
    test = json.loads((with_test / "instances_test.json").read_text())
    val = json.loads((with_test / "instances_val.json").read_text())
    assert len(test["images"]) == 5 and test["categories"] == val["categories"]
    assert not {im["file_name"] for im in test["images"]} & {im["file_name"] for im in val["images"]}
    assert len({im["id"] for im in test["images"]} | {im["id"] for im in val["images"]}) == 9  # ids unique
    # the dataset hash of a run with the test split covers it
    base = dataset_record(with_test, "instances_train.json", "instances_val.json")
    full = dataset_record(with_test, "instances_train.json", "instances_val.json", test_json="instances_test.json")
    assert base["hash"] != full["hash"] and full["test_json"].endswith("instances_test.json")
    assert "test_json" not in base


def test_a_test_json_that_is_missing_of_other_classes_or_overlapping_stops_before_any_work(test_dataset, tmp_path):
    with pytest.raises(DataError, match=r"instances_nope\.json: annotation file not found.*test_json"):
        run_baseline(_params(test_dataset, tmp_path, test_json="instances_nope.json"), progress=False)
    bad = tmp_path / "bad"
    shutil.copytree(test_dataset, bad)
    data = json.loads((bad / "instances_test.json").read_text())
    renamed = [dict(c) for c in data["categories"]]
    renamed[-1]["name"] = "crack"
    (bad / "instances_other.json").write_text(json.dumps({**data, "categories": renamed}))
    val = json.loads((bad / "instances_val.json").read_text())
    (bad / "instances_overlap.json").write_text(json.dumps({**data, "images": data["images"] + val["images"][:2]}))
    with pytest.raises(DataError, match=r"instances_other\.json: the test split lists the categories"):
        run_baseline(_params(bad, tmp_path, test_json="instances_other.json", run_dir=str(tmp_path / "r2")))
    with pytest.raises(DataError, match=r"instances_overlap\.json: 2 of its 8 images are also in the validation split"):
        run_baseline(_params(bad, tmp_path, test_json="instances_overlap.json", run_dir=str(tmp_path / "r3")))
    for name in ("run", "r2", "r3"):
        assert not (tmp_path / name / "checkpoints").exists()  # nothing trained


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------
def _scripted(monkeypatch, scores: dict[int, float]) -> None:
    """The loop's evaluation returns ``scores[epoch]`` as every metric (the selection reads nothing else)."""
    real = loop.Trainer.evaluate

    def evaluate(self):
        metrics, dets = real(self)
        return {**metrics, "map": scores[self.epoch], "map50": scores[self.epoch]}, dets

    monkeypatch.setattr(loop.Trainer, "evaluate", evaluate)


@pytest.mark.parametrize(
    "select, chosen, fell_back",
    [("best_val", 1, False), ("last", 3, False), ("best_val_or_baseline", 0, True)],
)
def test_the_starting_point_is_the_reference_not_a_candidate(tiny_params, monkeypatch, select, chosen, fell_back):
    """A run that only degrades after its start: `best_val` takes its best trained epoch (never epoch 0), `last` its
    last, and only `best_val_or_baseline` falls back to the start, saying so."""
    _scripted(monkeypatch, {0: 0.5, 1: 0.4, 2: 0.3, 3: 0.2})
    params = tiny_params(epochs=3, max_steps_per_epoch=1, eval_every=1, select=select)
    final = run_baseline(params, progress=False)["final"]
    assert (final["epoch"], final["fell_back"], final["select"]) == (chosen, fell_back, select)
    assert ("among the trained epochs 1-3" in final["selected_by"]) is (select == "best_val")


# --------------------------------------------------------------------------------------------
# The judgement of a run
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_final_test_is_what_evaluate_measures_and_phase2_never_selects_the_baseline(test_dataset, tmp_path):
    base = run_baseline(_params(test_dataset, tmp_path, epochs=1, run_dir=str(tmp_path / "base")), progress=False)
    test = base["final"]["test"]
    assert test["selected"]["epoch"] == 1 and test["last"]["epoch"] == 1
    assert set(test["selected"]["per_class"]) == set(base["final"]["per_class"])
    assert set(test["selected"]["operating_points"]) == set(base["final"]["per_class"])
    assert (tmp_path / "base" / "detections_test.json").exists() and (tmp_path / "base" / "analysis_test.json").exists()
    block, path = evaluate_target(tmp_path / "base", "test")
    assert path == tmp_path / "base" / "evaluation_test.json"
    for key in ("map", "map50", "map75", "per_class", "operating_points"):
        assert block[key] == test["selected"][key], key
    val, _ = evaluate_target(tmp_path / "base", "val")
    assert val["map"] == base["final"]["map"]  # the selected checkpoint read back gives its own validation number

    phase2 = run_phase2(
        _params(
            test_dataset,
            tmp_path,
            epochs=2,
            warmup_epochs=1,
            baseline=str(tmp_path / "base"),
            run_dir=str(tmp_path / "p2"),
        ),
        progress=False,
    )
    assert phase2["final"]["epoch"] >= 1 and phase2["final"]["test"]["last"]["epoch"] == 2
    fused, _ = evaluate_target(tmp_path / "p2", "test", which="last")
    assert fused["map"] == phase2["final"]["test"]["last"]["map"]  # the fused text branch, read back

    # the reports' tables read these numbers: validation, test (selected, last) and the Δ against the baseline
    judged = phase2["final"]["test"]
    table = reporting.test_table(phase2, baseline_final=base["final"])
    assert list(table.loc["mAP"].iloc[:3]) == [
        round(x, 4) for x in (phase2["final"]["map"], judged["selected"]["map"], judged["last"]["map"])
    ]
    assert table.loc["mAP", "Δ test (selected − baseline)"] == pytest.approx(
        round(judged["selected"]["map"], 4) - round(test["selected"]["map"], 4), abs=1e-9
    )
    points = reporting.test_operating_points_table(phase2)
    assert list(points.index) == [
        f"{n} (hard)" if n in ("perforation", "break") else n for n in judged["selected"]["per_class"]
    ]
    assert list(points["test boxes"]) == [e["instances"] for e in judged["selected"]["per_class"].values()]


@pytest.mark.slow
def test_a_class_without_test_instances_says_so_and_a_foreign_split_writes_nothing(test_dataset, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(test_dataset, root)
    test = json.loads((root / "instances_test.json").read_text())
    dent = next(c["id"] for c in test["categories"] if c["name"] == "dent")
    test["annotations"] = [a for a in test["annotations"] if a["category_id"] != dent]
    (root / "instances_test.json").write_text(json.dumps(test))
    val = json.loads((root / "instances_val.json").read_text())
    val["annotations"] = [a for a in val["annotations"] if a["category_id"] != dent]
    (root / "instances_val.json").write_text(json.dumps(val))
    with pytest.warns(DataWarning) as warned:
        final = run_baseline(_params(root, tmp_path, epochs=0), progress=False)["final"]
    messages = [str(w.message) for w in warned]
    for split in ("validation", "test"):  # before any work: the class and the split named
        assert any(f"no {split} instances of dent" in m for m in messages), messages
    entry = final["test"]["selected"]["per_class"]["dent"]
    assert entry == {**entry, "ap": None, "ap50": None, "instances": 0, "note": "no test instances"}
    assert final["per_class"]["dent"]["note"] == "no validation instances"
    table = reporting.final_table({"final": final})
    assert table.loc["AP dent", "run"] == "no validation instances"
    # a split of other classes: the project's error naming both lists, and nothing written
    other = tmp_path / "other"
    generate(other, seed=4, n_train=4, n_val=4, image_size=160, classes=["scratch", "stain"], progress=False)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(
        CheckpointError, match=r"trained on the classes \['scratch', 'perforation'.*has \['scratch', 'stain'\]"
    ):
        evaluate_target(tmp_path / "run", str(other / "instances_val.json"), sources=[{"dataset": str(other)}])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    with pytest.raises(ConfigError, match="not finished"):
        (tmp_path / "run" / "metrics.json").write_text(
            (tmp_path / "run" / "metrics.json").read_text().replace('"status": "finished"', '"status": "running"', 1)
        )
        evaluate_target(tmp_path / "run", "test")
