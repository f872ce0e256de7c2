# The two quick-start commands are `make run` and `make test`; both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
GENREC := $(VENV)/bin/genrec
RECIPE ?= apps/configs/hstu_ml100k.toml

.PHONY: setup run test test-slow bench doctor clean

setup:
	@scripts/bootstrap.sh

# Prepare the embedded MovieLens-100K and train + evaluate the default recipe.
run: setup
	$(GENREC) prepare movielens-100k
	$(GENREC) train --config $(RECIPE) $(ARGS)

# The fast default suite (what CI runs). Slow end-to-end tests: `make test-slow`.
test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) bench/data_bench.py

doctor: setup
	$(GENREC) doctor

clean:
	rm -rf $(VENV) build *.egg-info
