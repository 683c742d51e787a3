# diffmesh: `make demo` and `make test` work from a fresh clone (they create .venv first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv protos chart-settings models demo test bench up down clean

venv: $(STAMP)

# torch goes first, pinned: an unpinned torch (or a package pinning another) pulls a CUDA build.
# open_clip_torch only supplies CLIP's BPE vocabulary file; --no-deps keeps torchvision out.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps open_clip_torch==3.3.0
	touch $(STAMP)

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

# The chart's table of which stage has which setting (files/stage-settings.json).
chart-settings: $(STAMP)
	$(PY) -m diffmesh.stage_settings

models: $(STAMP)
	$(VENV)/bin/diffmesh models build-tiny

demo: $(STAMP)
	$(VENV)/bin/diffmesh demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP) models
	$(PY) -m bench.run --out bench/results/bench.json

# make up DENOISER_REPLICAS=2 DENOISER_CANARY=1 [DENOISER_CANARY_WEIGHT=20] (any backend: <STAGE>_*)
# The backend names come from the stage table (evaluated only when `up` runs).
BACKENDS = $(shell $(PY) -c "from diffmesh.stages import STAGES; print(*(s.name for s in STAGES.backends()))")
UP_ARGS = $(foreach s,$(BACKENDS),$(call up_args,$(s),$(shell echo $(s) | tr a-z A-Z)))
up_args = $(if $($(2)_REPLICAS),--replicas $(1)=$($(2)_REPLICAS)) $(if $(filter 1,$($(2)_CANARY)),--canary $(1)=$(or $($(2)_CANARY_WEIGHT),20))

up: $(STAMP)
	@test -f .models/registry.yaml || $(VENV)/bin/diffmesh models build-tiny
	$(VENV)/bin/diffmesh up $(strip $(UP_ARGS))

down:
	$(VENV)/bin/diffmesh down

clean:
	rm -rf .models .mesh out bench/results
