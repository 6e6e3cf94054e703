# Two commands do everything: `make run` and `make test`. Both build .venv when it is
# missing or older than the requirements.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RAY_STAMP := $(VENV)/.installed-ray
# Ray (about 600 MB with pyarrow) only where it is used: the tests, and ENGINE=ray runs.
RUN_NEEDS := $(STAMP) $(if $(or $(findstring ENGINE=ray,$(PARAMS)),$(findstring ray,$(EMBED_ENGINE))),$(RAY_STAMP))

.PHONY: run test bench venv clean notebook

$(STAMP): requirements.txt requirements-local.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq -r requirements.txt -r requirements-local.txt
	$(PY) -m pip install -qq --no-deps --no-build-isolation -e . || $(PY) -m pip install -qq --no-deps -e .
	touch $(STAMP)

$(RAY_STAMP): requirements-ray.txt $(STAMP)
	$(PY) -m pip install -qq -r requirements-ray.txt
	touch $(RAY_STAMP)

venv: $(STAMP)

## Execute notebooks/run.ipynb with papermill into runs/run-<UTC time>.ipynb.
run: $(RUN_NEEDS)
	$(PY) -m embed_helpers run $(if $(PARAMS),$(foreach p,$(PARAMS),--param $(p)))

## The whole suite: unit and integration tests, doctests, and nbval on the notebook.
## `make test WORKERS=auto` spreads the tests and doctests over the cores (pytest-xdist; see
## conftest.py for what stays together), then runs the notebook, whose cells share a kernel.
WORKERS ?=
test: $(STAMP) $(RAY_STAMP)
ifeq ($(WORKERS),)
	$(PY) -m pytest
else
	$(PY) -m pytest -n $(WORKERS) --dist loadgroup tests embed_helpers
	$(PY) -m pytest notebooks
endif

## Benchmarks (print tables; see GUIDE.md).
bench: $(STAMP) $(RAY_STAMP)
	$(PY) bench/backends.py
	$(PY) bench/ingest.py
	$(PY) bench/cache.py
	$(PY) bench/servers.py
	$(PY) bench/scale.py
	$(PY) bench/long_texts.py
	$(PY) bench/rate_limit.py
	$(PY) bench/batch_api.py
	$(PY) bench/pg_source.py
	$(PY) bench/storage.py
	$(PY) bench/sync.py

## Re-execute notebooks/run.ipynb in place from a clean state (a new database and cache, as
## nbval has), to commit it with its outputs after changing it.
NB_STATE := EMBED_ENV_FILE= DATABASE_URL= EMBED_PGDATA=.pgdata-notebook \
	EMBED_CACHE_PATH=.cache/notebook/cache.jsonl EMBED_RUNS_DIR=.cache/notebook/runs
notebook: $(STAMP)
	rm -rf .pgdata-notebook .cache/notebook
	$(NB_STATE) $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace notebooks/run.ipynb
	$(PY) -c "from embed_helpers.notebook import strip_volatile_outputs as s; s()"
	$(PY) -c "from embed_helpers.pg_embedded import stop; stop('.pgdata-notebook')"
	rm -rf .pgdata-notebook .cache/notebook

clean:
	rm -rf $(VENV) .pgdata .pgdata-test .pgdata-notebook .cache runs .pytest_cache
