# The two commands for a fresh machine: `make demo` and `make test` (each installs everything first).
PYTHON ?= python3
DATA := /usr/share/datasets/fashion-mnist
TEXT := /usr/share/doc/python3.11/html/_sources

.PHONY: install install-test data demo test bench

data:
	@if [ ! -f $(DATA)/train-images-idx3-ubyte.gz ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
		echo "warning: could not apt-get dataset-fashion-mnist; set QDISTILL_DATA or pass --data-dir"; \
	fi
	@if [ ! -d $(TEXT) ]; then \
		(apt-get update -qq && apt-get install -y -qq python3.11-doc) || \
		echo "warning: could not apt-get python3.11-doc; set QDISTILL_TEXT_DIR or pass --data-dir"; \
	fi

install: data
	$(PYTHON) -m pip install -q -e .

install-test: data
	$(PYTHON) -m pip install -q -e '.[test]'

demo: install
	qdistill demo

test: install-test
	$(PYTHON) -m pytest -q

# The whole benchmark (speed ratios, accuracy table, README section); sized for one CUDA GPU.
bench: data
	$(PYTHON) -m pip install -q -e '.[bench]'
	bash bench/run.sh
