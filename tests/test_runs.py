"""The run contract: metrics.json round trip, contract checks, run ids, finished-run protection."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tfg_mm
from tfg_mm import paths
from tfg_mm.config import Params, load_params
from tfg_mm.data.loaders import dataset_record
from tfg_mm.errors import ConfigError, DataError
from tfg_mm.paths import RunPaths, project_root
from tfg_mm.training import contract, identity, runs
from tfg_mm.training.contract import is_finished, read_metrics, write_metrics
from tfg_mm.training.identity import code_version, run_id
from tfg_mm.training.runs import finished_run, prepare_run_dir

CLASSES = ("scratch", "perforation")


def _coco_folder(root: Path) -> Path:
    """Two real PNG images and a COCO train / val split over them."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = []
    for index in (1, 2):
        name = f"img{index}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "images" / name)
        images.append({"id": index, "file_name": name, "width": 32, "height": 32})
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
    for split, image in (("train", images[0]), ("val", images[1])):
        coco = {
            "images": [image],
            "annotations": [
                {
                    "id": image["id"],
                    "image_id": image["id"],
                    "category_id": 1,
                    "bbox": [4, 4, 10, 10],
                    "area": 100,
                    "iscrowd": 0,
                }
            ],
            "categories": categories,
        }
        (root / f"instances_{split}.json").write_text(json.dumps(coco))
    return root


def _entry(epoch: int, value: float) -> dict:
    return {
        "epoch": epoch,
        "map": value,
        "map50": value + 0.2,
        "map75": value - 0.1,
        "per_class": {"scratch": {"ap": value, "ap50": value + 0.2}, "perforation": {"ap": float("nan"), "ap50": None}},
        "lr": {"detector": 5e-4, "backbone": 5e-4},
        "losses": {"loss": 12.5 - epoch, "loss_mal": np.float32(1.5)},
        "seconds": 3.2,
    }


@pytest.fixture()
def dataset(tmp_path):
    root = _coco_folder(tmp_path / "coco")
    return dataset_record(root, "instances_train.json", "instances_val.json")


# ---------------------------------------------------------------------------------- identity


def _head_commit(folder: Path) -> str | None:
    """What git says the checkout's commit is (None: not a clone, e.g. an unpacked archive, or no git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=False)
    except OSError:
        return None
    return head.stdout.strip() if head.returncode == 0 else None


def test_code_version_in_and_outside_git(monkeypatch, tmp_path):
    code = code_version()
    assert set(code) == {"package", "git_commit", "git_dirty", "source_sha256"}
    assert code["package"] and len(code["source_sha256"]) == 64
    assert code["git_commit"] == _head_commit(Path(tfg_mm.__file__).parent)
    # no git executable at all: no crash, unknown commit
    assert identity._git(["rev-parse", "HEAD"], tmp_path) is None  # tmp_path is not a repository
    identity._code_version.cache_clear()
    monkeypatch.setenv("PATH", str(tmp_path))
    try:
        code = code_version()
        assert code["git_commit"] is None and code["git_dirty"] is None
    finally:
        identity._code_version.cache_clear()


def test_git_dirty_flag_looks_at_sources_notebooks_and_params_only(tmp_path):
    """What make all writes (reports/, runs/, data/, anything untracked elsewhere) leaves a clone clean."""
    if _head_commit(Path(tfg_mm.__file__).parent) is None:
        pytest.skip("no git executable")
    repo = tmp_path / "clone"
    for rel in ("tfg_mm/__init__.py", "notebooks/01.ipynb", "params/default.yaml", "scripts/b.py", "pyproject.toml"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("x\n")

    def git(*args):
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)

    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    package = repo / "tfg_mm"
    commit, dirty = identity.git_state(package)
    assert commit == _head_commit(repo) and dirty is False
    for rel in ("reports/01_baseline.html", "runs/baseline/metrics.json", "data/synthetic/a.json", "notes.txt"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("written by make all\n")
    assert identity.git_state(package) == (commit, False)
    assert identity.git_state(repo / "runs" / "baseline") == (commit, False)  # from any folder of the checkout
    for rel in ("tfg_mm/__init__.py", "notebooks/01.ipynb", "params/default.yaml", "pyproject.toml"):
        original = (repo / rel).read_text()
        (repo / rel).write_text("changed\n")
        assert identity.git_state(package) == (commit, True), rel
        (repo / rel).write_text(original)
    (repo / "tfg_mm" / "new.py").write_text("")  # an untracked source decides results too
    assert identity.git_state(package) == (commit, True)
    (tmp_path / "elsewhere").mkdir()
    assert identity.git_state(tmp_path / "elsewhere") == (None, None)


def test_dataset_record_hashes_content(tmp_path, dataset):
    assert Path(dataset["root"]) == tmp_path / "coco"
    assert dataset["train_json"].endswith("instances_train.json") and len(dataset["hash"]) >= 16
    again = dataset_record(tmp_path / "coco", "instances_train.json", "instances_val.json")
    assert again["hash"] == dataset["hash"]
    # one changed pixel is another dataset
    image = np.array(Image.open(tmp_path / "coco" / "images" / "img2.png"))
    image[0, 0] = 255 - image[0, 0]
    Image.fromarray(image).save(tmp_path / "coco" / "images" / "img2.png")
    assert dataset_record(tmp_path / "coco", "instances_train.json", "instances_val.json")["hash"] != dataset["hash"]
    with pytest.raises(DataError, match=r"instances_test.json: annotation file not found.*`val_json`"):
        dataset_record(tmp_path / "coco", "instances_train.json", "instances_test.json")


def test_run_id_is_stable_and_ignores_only_storage_and_execution_settings():
    code = {"package": "0.1.0", "git_commit": "a" * 40, "git_dirty": False, "source_sha256": "b" * 64}
    base = run_id(Params(), "hash1", code)
    assert len(base) == 16 and base == run_id(Params(), "hash1", code)
    same = load_params(
        run_dir="runs/elsewhere", overwrite=True, resume=False, device="cpu", num_workers=4, seeds=[0, 1, 2], workers=3
    )
    assert run_id(same, "hash1", code) == base
    assert run_id(Params(), "hash1", {**code, "git_dirty": True}) == base
    assert run_id({"epochs": 12}, "hash1", code) == base  # a mapping is validated to the same params
    assert run_id(load_params(lr=1e-3), "hash1", code) != base
    assert run_id(load_params(seed=1), "hash1", code) != base
    assert run_id(Params(), "hash2", code) != base
    assert run_id(Params(), "hash1", {**code, "source_sha256": "c" * 64}) != base


# ---------------------------------------------------------------------------------- metrics.json


def test_metrics_round_trip(tmp_path, dataset):
    run_dir = prepare_run_dir(tmp_path / "run")
    params = load_params(epochs=2, run_dir=str(run_dir), alpha=0.1)
    history = [_entry(0, 0.30), _entry(1, 0.40)]
    final = {k: v for k, v in history[1].items() if k in ("map", "map50", "map75", "per_class")} | {"epoch": 1}
    path = write_metrics(
        run_dir,
        params=params,
        dataset=dataset,
        history=history,
        final=final,
        extra={"alpha_history": [0.1, 0.12]},
        status="finished",
    )
    assert path == run_dir / "metrics.json"
    raw = path.read_text()
    assert "NaN" not in raw  # strict JSON: non-finite numbers are null
    record = read_metrics(run_dir)
    assert record["status"] == "finished" and is_finished(run_dir)
    assert record["params"] == params.model_dump(mode="json") and len(record["params"]) == len(Params.model_fields)
    assert record["params_changed"] == {"epochs": 2, "run_dir": str(run_dir), "alpha": 0.1}
    assert record["dataset"] == dataset
    assert record["code_version"] == code_version()
    assert record["run_id"] == run_id(params, dataset["hash"], code_version())
    assert [e["map"] for e in record["history"]] == [0.30, 0.40]
    assert record["history"][0]["per_class"]["perforation"] == {"ap": None, "ap50": None}
    assert record["history"][0]["losses"]["loss_mal"] == 1.5
    assert record["final"]["map50"] == pytest.approx(0.6) and record["alpha_history"] == [0.1, 0.12]
    assert load_params(record["params"]) == params  # the stored params reproduce the run's params
    assert read_metrics(path)["run_id"] == record["run_id"]  # a metrics.json path works too


def test_metrics_record_the_environment_that_decides_the_numbers(tmp_path, dataset):
    """Versions, CPU / GPU, kernel capability, threads and the deterministic flag: the real values."""
    import numpy
    import torch
    import torchvision
    import transformers

    run_dir = prepare_run_dir(tmp_path / "run")
    write_metrics(run_dir, params=Params(), dataset=dataset, history=[_entry(0, 0.1)], final=None)
    record = read_metrics(run_dir)
    env = record["environment"]
    assert record["schema_version"] == contract.SCHEMA_VERSION == 4
    assert set(env) == {
        "python",
        "platform",
        "packages",
        "cpu",
        "cpu_capability",
        "torch_threads",
        "deterministic_algorithms",
        "gpu",
        "cuda",
        "cudnn",
    }
    assert set(env["packages"]) == set(identity.ENVIRONMENT_PACKAGES)
    assert env["python"] == platform.python_version() and env["platform"] == platform.platform()
    # the versions are those of the modules this process imported (torch with its build tag)
    assert env["packages"]["torch"] == torch.__version__
    assert env["packages"]["torchvision"] == torchvision.__version__.split("+")[0]
    assert env["packages"]["transformers"] == transformers.__version__
    assert env["packages"]["numpy"] == numpy.__version__
    for name in ("pycocotools", "accelerate", "open_clip_torch"):  # dependencies of the project: installed
        assert isinstance(env["packages"][name], str) and env["packages"][name][0].isdigit(), name
    assert isinstance(env["cpu"], str) and env["cpu"] and env["cpu"] != "unknown"
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["torch_threads"] == torch.get_num_threads() >= 1
    assert env["deterministic_algorithms"] in ("off", "on", "warn only")
    if torch.cuda.is_available():
        assert env["gpu"] == torch.cuda.get_device_name() and env["cuda"] == torch.version.cuda
    else:
        assert env["gpu"] is env["cuda"] is env["cudnn"] is None
    with pytest.raises(DataError, match="`extra` may not replace contract keys: environment"):
        write_metrics(run_dir, params=Params(), dataset=dataset, history=[], final=None, extra={"environment": {}})


@pytest.mark.slow
def test_environment_is_the_kernels_and_threads_in_force(tmp_path):
    """Forced AVX2 / generic kernels, one thread and deterministic algorithms are recorded as such."""
    probe = (
        "import json, torch; from tfg_mm.training import identity; torch.use_deterministic_algorithms(True, warn_only=True); "
        "print(json.dumps(identity.environment()))"
    )
    seen = {}
    for capability in ("default", "avx2"):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
        seen[capability] = json.loads(out.stdout)
    assert seen["default"]["cpu_capability"] == "DEFAULT"
    assert seen["avx2"]["cpu_capability"] in ("AVX2", "DEFAULT")  # DEFAULT on a CPU without AVX2
    assert seen["default"]["torch_threads"] == seen["avx2"]["torch_threads"] == 1
    assert seen["default"]["deterministic_algorithms"] == "warn only"


def test_a_schema_1_contract_without_environment_still_reads(tmp_path, dataset):
    run_dir = prepare_run_dir(tmp_path / "run")
    write_metrics(run_dir, params=Params(), dataset=dataset, history=[_entry(0, 0.1)], final=None)
    record = json.loads((run_dir / "metrics.json").read_text())
    del record["environment"]
    (run_dir / "metrics.json").write_text(json.dumps(record))
    with pytest.raises(DataError, match="missing environment"):  # a version-2 file must carry it
        read_metrics(run_dir)
    (run_dir / "metrics.json").write_text(json.dumps(record | {"schema_version": 1}))
    assert "environment" not in read_metrics(run_dir)


def test_running_status_is_not_finished(tmp_path, dataset):
    run_dir = prepare_run_dir(tmp_path / "run")
    write_metrics(run_dir, params=Params(), dataset=dataset, history=[_entry(0, 0.1)], final=None)
    assert read_metrics(run_dir)["status"] == "running" and not is_finished(run_dir)


def test_broken_contract_is_refused_and_nothing_is_written(tmp_path, dataset):
    run_dir = prepare_run_dir(tmp_path / "run")
    write_metrics(run_dir, params=Params(), dataset=dataset, history=[_entry(0, 0.1)], final=None)
    before = (run_dir / "metrics.json").read_bytes()
    bad_entry = _entry(1, 0.2)
    del bad_entry["map75"]
    with pytest.raises(DataError) as excinfo:
        write_metrics(
            run_dir,
            params=Params(),
            dataset=dataset,
            history=[_entry(0, 0.1), bad_entry, _entry(0, 0.3) | {"per_class": {"scratch": {"ap": 0.1}}}],
            final=None,
            extra={"history": []},
            status="finished",
        )
    message = str(excinfo.value)
    for text in (
        "history[1]: missing map75",
        "history[2]: `epoch` must be an integer greater",
        "per_class['scratch'] must have `ap` and `ap50`",
        "`final` is required when status is finished",
        "`extra` may not replace contract keys: history",
    ):
        assert text in message, text
    assert (run_dir / "metrics.json").read_bytes() == before
    with pytest.raises(ConfigError, match="unknown key `lr_fuson`"):
        write_metrics(run_dir, params={"lr_fuson": 1}, dataset=dataset, history=[], final=None)
    with pytest.raises(ValueError, match="allowed: running, finished, failed"):
        write_metrics(run_dir, params=Params(), dataset=dataset, history=[], final=None, status="done")


def test_read_metrics_missing_or_malformed(tmp_path):
    with pytest.raises(ConfigError, match=r"no metrics.json; .* is not a run folder.*`baseline`"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.json").write_text('{"status": "finished",\n "history": [}\n')
    with pytest.raises(DataError, match=r"metrics.json: not valid JSON \(line 2"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.json").write_text('{"status": "finished", "history": []}')
    with pytest.raises(DataError, match=r"does not follow the run contract:\n  - missing schema_version"):
        read_metrics(tmp_path)


# ---------------------------------------------------------------------------------- run folders


def _finish(run_dir: Path, dataset: dict) -> None:
    final = {"map": 0.5, "map50": 0.8, "map75": 0.4, "per_class": {}}
    write_metrics(run_dir, params=Params(), dataset=dataset, history=[], final=final, status="finished")


def test_finished_run_is_protected_unless_overwrite(tmp_path, dataset):
    run_dir = prepare_run_dir(tmp_path / "runs" / "baseline")
    assert run_dir.is_dir() and (run_dir / paths.MARKER_FILE).is_file()
    (run_dir / "best").mkdir()
    _finish(run_dir, dataset)
    before = (run_dir / "metrics.json").read_bytes()
    with pytest.raises(ConfigError) as excinfo:
        prepare_run_dir(run_dir, overwrite=False, resume=True)
    message = str(excinfo.value)
    assert "already holds a finished run (map 0.5000, map50 0.8000)" in message
    assert "nothing was changed" in message and "overwrite: true" in message and "-p overwrite True" in message
    assert (run_dir / "metrics.json").read_bytes() == before and (run_dir / "best").is_dir()
    with pytest.raises(ConfigError, match="already holds a finished run"):
        prepare_run_dir(run_dir, resume=False)
    # asked for: a fresh, empty run folder (with its marker), no leftovers beside it
    assert prepare_run_dir(run_dir, overwrite=True) == run_dir
    assert sorted(p.name for p in run_dir.iterdir()) == [paths.MARKER_FILE]
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["baseline"]


def test_a_finished_run_is_reused_only_with_the_same_run_id(tmp_path, dataset):
    run_dir = prepare_run_dir(tmp_path / "run")
    assert finished_run(run_dir, "0" * 16) is None  # nothing there yet
    write_metrics(run_dir, params=Params(), dataset=dataset, history=[_entry(0, 0.1)], final=None)
    rid = read_metrics(run_dir)["run_id"]
    assert finished_run(run_dir, rid) is None  # running, not finished
    _finish(run_dir, dataset)
    assert finished_run(run_dir, rid) == read_metrics(run_dir)
    assert finished_run(run_dir, "0" * 16) is None  # another run


def test_run_paths_are_resolved_once_and_params_keep_them_as_written(tmp_path):
    params = load_params({"dataset": "data/other", "run_dir": "runs/x", "checkpoint": str(tmp_path / "ckpt")})
    run_paths = RunPaths.of(params)
    assert run_paths == RunPaths(
        dataset=project_root() / "data/other", run_dir=project_root() / "runs/x", source=tmp_path / "ckpt"
    )
    assert (params.dataset, params.run_dir) == ("data/other", "runs/x")  # the contract stores them relative
    assert RunPaths.of(load_params({"pretrained": "weights"})).source == project_root() / "weights"
    assert RunPaths.of(Params()).source is None  # random init
    with pytest.raises(AttributeError):
        run_paths.run_dir = Path("/elsewhere")  # frozen


def test_interrupted_run_is_kept_for_resume_or_cleared_without(tmp_path, dataset):
    run_dir = prepare_run_dir(tmp_path / "run")
    write_metrics(run_dir, params=Params(), dataset=dataset, history=[_entry(0, 0.1)], final=None)
    (run_dir / "last.pt").write_bytes(b"checkpoint")
    assert prepare_run_dir(run_dir, resume=True) == run_dir
    assert (run_dir / "last.pt").read_bytes() == b"checkpoint"
    prepare_run_dir(run_dir, resume=False)
    assert not (run_dir / "last.pt").exists() and not (run_dir / "metrics.json").exists()


def test_a_folder_not_made_by_tfg_mm_is_never_emptied(tmp_path):
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("precious")
    with pytest.raises(ConfigError, match="not made by tfg_mm .* refusing to empty it"):
        prepare_run_dir(foreign, overwrite=True)
    assert (foreign / "chapter1.tex").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        prepare_run_dir(tmp_path / "file")


# ---------------------------------------------------------------------------------- resume identity


def _interrupted(run_dir: Path, dataset: dict, params: Params) -> None:
    write_metrics(run_dir, params=params, dataset=dataset, history=[_entry(0, 0.1)], final=None)
    (run_dir / "state").mkdir()
    (run_dir / paths.STATE_FILE).write_bytes(b"state")


def test_an_interrupted_run_resumes_only_as_the_same_run(tmp_path, dataset):
    run_dir = prepare_run_dir(tmp_path / "run")
    old = load_params({"run_dir": str(run_dir), "lr": 0.002})
    _interrupted(run_dir, dataset, old)
    code = code_version()
    before = (run_dir / "metrics.json").read_bytes()
    runs.check_run_dir(run_dir, old, dataset["hash"], code)  # the same run: resumed
    # what may change on resume: the run id's exclusions (where / how it runs)
    runs.check_run_dir(run_dir, load_params(old, {"num_workers": 2, "device": "cpu"}), dataset["hash"], code)
    with pytest.raises(ConfigError) as err:
        runs.check_run_dir(run_dir, load_params(old, {"lr": 1e-4, "seed": 7}), "f" * 64, code)
    message = str(err.value)
    for expected in ("`lr`: 0.002 -> 0.0001", "`seed`: 0 -> 7", "dataset content hash", "overwrite: true", "run_dir"):
        assert expected in message, expected
    assert "status running, evaluated epochs [0]" in message
    # another code version is another run, too
    with pytest.raises(ConfigError, match="code `source_sha256`"):
        runs.check_run_dir(run_dir, old, dataset["hash"], {**code, "source_sha256": "0" * 64})
    # the fixes: resume: false / overwrite: true start over (prepare_run_dir empties the folder)
    runs.check_run_dir(run_dir, load_params(old, {"lr": 1e-4, "resume": False}), dataset["hash"], code)
    runs.check_run_dir(run_dir, load_params(old, {"lr": 1e-4, "overwrite": True}), dataset["hash"], code)
    assert (run_dir / "metrics.json").read_bytes() == before


def test_a_state_without_a_readable_contract_is_not_resumed_blindly(tmp_path, dataset):
    run_dir = prepare_run_dir(tmp_path / "run")
    (run_dir / "state").mkdir()
    (run_dir / paths.STATE_FILE).write_bytes(b"state")
    with pytest.raises(ConfigError, match="identity cannot be read"):
        runs.check_run_dir(run_dir, Params(run_dir=str(run_dir)), dataset["hash"], code_version())
    # a run that failed before its first evaluation has nothing to resume: a new run may start there
    (run_dir / paths.STATE_FILE).unlink()
    write_metrics(run_dir, params=Params(), dataset=dataset, history=[], final=None, status="failed")
    assert runs.interrupted_run(run_dir) is None
    runs.check_run_dir(run_dir, Params(run_dir=str(run_dir), lr=0.5), dataset["hash"], code_version())


def test_mark_failed_keeps_the_history(tmp_path, dataset):
    run_dir = prepare_run_dir(tmp_path / "run")
    assert contract.mark_failed(run_dir, {"type": "X"}) is None  # no contract yet: the caller writes one
    write_metrics(run_dir, params=Params(), dataset=dataset, history=[_entry(0, 0.1), _entry(1, 0.2)], final=None)
    contract.mark_failed(run_dir, {"type": "TrainingError", "message": "boom", "epoch": 2, "step": 5})
    record = read_metrics(run_dir)
    assert record["status"] == "failed" and record["failure"]["step"] == 5
    assert [h["epoch"] for h in record["history"]] == [0, 1]
    assert finished_run(run_dir, record["run_id"]) is None and not is_finished(run_dir)  # never reused
