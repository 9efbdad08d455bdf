# twotower: the two commands a user needs are `make demo` and `make test`; both set up first.
# `make setup GPU=1` builds a CUDA environment of its own, .venv-gpu (VENV= overrides either).
PYTHON ?= python3.11
GPU    ?= 0
VENV   ?= $(if $(filter 1,$(GPU)),.venv-gpu,.venv)
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.setup-$(if $(filter 1,$(GPU)),gpu,cpu)
FBGEMM_REQ := requirements/$(if $(filter 1,$(GPU)),gpu,cpu).txt
DEMO_DATA ?= data/ml-100k
DEMO_RUN  ?= runs/demo

.PHONY: setup demo test test-fast lint format bench clean

setup: $(STAMP)

ifeq ($(GPU),1)
# CUDA torch and FBGEMM from requirements/gpu.txt, never over an environment holding a CPU build;
# at the end torch.cuda, FBGEMM's CUDA ops and torchrec must load (skipped, with the reason, on a
# machine without a GPU).
$(STAMP): requirements/common.txt requirements/dev.txt $(FBGEMM_REQ) pyproject.toml launch/gpu_environment.py
	test ! -x $(PY) || $(PY) -m launch.gpu_environment check --venv $(VENV)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r $(FBGEMM_REQ)
	$(PIP) install -q --no-deps torchrec==1.8.0
	$(PIP) install -q -r requirements/common.txt -r requirements/dev.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) -m launch.gpu_environment verify --venv $(VENV)
	rm -f $(VENV)/.setup-*
	touch $@
else
$(STAMP): requirements/common.txt requirements/dev.txt $(FBGEMM_REQ) pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r $(FBGEMM_REQ)
	# torchrec's metadata requires the CUDA fbgemm-gpu; its real requirements are in common.txt.
	$(PIP) install -q --no-deps torchrec==1.8.0
	$(PIP) install -q -r requirements/common.txt -r requirements/dev.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import torchrec, fbgemm_gpu, torchdata, pyarrow; print('twotower setup ok')"
	rm -f $(VENV)/.setup-*
	touch $@
endif

demo: setup
	$(VENV)/bin/twotower prepare movielens --variant 100k --out $(DEMO_DATA)
	$(VENV)/bin/twotower launch local --nproc 2 configs/movielens_100k.yaml \
		data.path=$(DEMO_DATA) run.dir=$(DEMO_RUN)
	$(VENV)/bin/twotower plot --run $(DEMO_RUN)

lint: setup
	$(VENV)/bin/ruff check trainer models data_pipeline launch bench tests
	$(VENV)/bin/ruff format --check trainer models data_pipeline launch bench tests
	$(VENV)/bin/mypy config trainer models data_pipeline launch

format: setup
	$(VENV)/bin/ruff format trainer models data_pipeline launch bench tests
	$(VENV)/bin/ruff check --fix trainer models data_pipeline launch bench tests

# The whole suite, slow-marked tests included (CI runs exactly this).
test: setup lint
	FBGEMM_TBE_BOUNDS_CHECK_MODE=0 $(VENV)/bin/pytest -q -m "" tests

# Inner loop: skip the slow marker.
test-fast: setup
	FBGEMM_TBE_BOUNDS_CHECK_MODE=0 $(VENV)/bin/pytest -q -m "not slow" tests

bench: setup
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
