# One venv, one editable install; every target below builds it first if needed.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test bench clean

$(STAMP): setup.cfg setup.py pyproject.toml $(wildcard middlewares/*/*.c)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## run: serve the gateway (CONFIG=file.yaml to use a config; none serves the offline mock model)
run: $(STAMP)
	$(VENV)/bin/llmproxy serve $(if $(CONFIG),--config $(CONFIG))

## test: the whole test suite
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

## bench: CPU per request of the proxy against a bare aiohttp pass-through
bench: $(STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
