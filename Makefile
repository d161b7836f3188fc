# One file of verbs. `make all` and `make test` set up .venv/ themselves on a fresh machine.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: all test test-fast lint data baseline phase2 ablations lowshot full-grid reports benchmark bench-real params-doc clean-venv

$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

## The main job on the embedded default: data -> baseline -> phase 2 -> small ablation grid -> reports
all: $(STAMP)
	$(VPY) -m tfg_mm pipeline

## The test suite: everything (what CI runs)
test: $(STAMP)
	$(VPY) -m pytest -q -p no:cacheprovider

## The fast tier: every test that neither trains nor executes a notebook (marker `slow`)
test-fast: $(STAMP)
	$(VPY) -m pytest -q -p no:cacheprovider -m "not slow"

## Lint and format check (ruff; `ruff format .` fixes the formatting)
lint: $(STAMP)
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

data: $(STAMP)
	$(VPY) -m tfg_mm generate

## One step of `make all` (its notebook, params file and report); each finds or trains what it needs first
baseline: $(STAMP)
	$(VPY) -m tfg_mm pipeline --only 01_baseline

phase2: $(STAMP)
	$(VPY) -m tfg_mm pipeline --only 02_phase2

ablations: $(STAMP)
	$(VPY) -m tfg_mm pipeline --only 03_ablations

## The low-data grid (notebook 04; not part of `all`: a baseline per k, about an hour on 2 CPU cores), then the index
lowshot: $(STAMP)
	$(VPY) -m tfg_mm pipeline --only 04_lowshot
	$(VPY) -m tfg_mm report

## Rebuild reports/index.html from the finished runs (trains nothing)
reports: $(STAMP)
	$(VPY) -m tfg_mm report

full-grid: $(STAMP)
	$(VPY) -m tfg_mm pipeline --grid params/ablations/full.yaml

benchmark: $(STAMP)
	$(VPY) scripts/benchmark.py

## DeepPCB (real PCB defects) end to end, judged on its own test split: reports/bench_real.json, docs/real_data.md
## (DATA=/path/to/deeppcb; default ../shared/datasets/deeppcb beside the checkout; 50 min on 2 CPU cores, measured)
bench-real: $(STAMP)
	$(VPY) scripts/bench_real.py $(if $(DATA),--data $(DATA))

params-doc: $(STAMP)
	$(VPY) -m tfg_mm params-doc --write docs/parameters.md

clean-venv:
	rm -rf $(VENV)
