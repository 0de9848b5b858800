# Quick start: `make demo` (the main job on the synthetic demo set, tracked in MLflow) and `make test`.
# Both create .venv and install the package (with test extras) when missing; both are idempotent.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# The main job through MLflow Projects: synthetic data -> tracked training -> registry champion
# -> masks. The experiment is made first so its artifacts live beside the store in tracking/.
# `mlflow run` alone would use ./mlflow.db: point it (and the UI, serving) at the project's store.
demo: export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/tracking/mlflow.db
demo: install
	$(BIN)/python -c "from seg_mlops import tracking; tracking.connect('demo')"
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mlflow run . --env-manager local --experiment-name demo
	@echo "browse runs, curves and epoch images: .venv/bin/seg-mlops ui  (http://127.0.0.1:5000)"

test: install
	# Headless Chromium for the UI tests (Debian packages, installed once; the tests say why if it fails)
	bash tests/browser.sh >/dev/null || true
	# Java 17 for Spark (batch-infer --engine spark), likewise
	bash tracking/java.sh >/dev/null || true
	$(BIN)/python -m pytest

clean:
	rm -rf outputs .pytest_cache  # tracking/ (runs, registry) is kept: remove it by hand
