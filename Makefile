# Quick start: `make demo` (train, evaluate and infer on the synthetic demo set) and `make test`.
# Both create .venv and install the package (with test extras) when missing; both are idempotent.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := outputs/demo

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: install
	$(BIN)/seg-mlops make-demo-data outputs/demo-data
	$(BIN)/seg-mlops train --config configs/demo.yaml --overwrite
	$(BIN)/seg-mlops evaluate --config configs/demo.yaml --model $(DEMO)/best_model.keras
	$(BIN)/seg-mlops infer --config configs/demo.yaml --model $(DEMO)/best_model.keras \
		--images outputs/demo-data/test/images --output $(DEMO)/infer
	@echo "demo outputs in $(DEMO): best_model.keras, evaluation.csv, train_*.csv/png, epoch_infer/, infer/"

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf outputs .pytest_cache
