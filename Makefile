# `make demo` and `make test` work from a clean clone: each creates .venv and installs
# everything first. torch is pinned to the CPU build in requirements.txt.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test test-fast shared-real clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt pyproject.toml
	@# a venv left half-built by an interrupted make (python but no pip) is made again
	$(BIN)/python -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV) && $(PY) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -e .
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-test.txt
	touch $@

demo: install
	$(BIN)/xlip demo --out runs/demo

# Pre-training on the real sets in ../shared/data (configs/shared-real.yaml): the three dataset
# adapters, a WordPiece vocabulary on the training reports, pre-training, zero-shot on NIH test,
# then the evaluation suite of configs/shared-real-eval.yaml (runs/shared-real/eval/README.md).
SHARED ?= ../shared/data
REAL := runs/shared-real
shared-real: install
	$(BIN)/xlip data prepare covid-collection $(SHARED)/covid_cxr --out $(REAL)/data/covid
	$(BIN)/xlip data prepare nih-cxr14 $(SHARED)/nih_cxr14_starter --out $(REAL)/data/nih
	$(BIN)/xlip data prepare iu-xray $(SHARED)/iu_reports/source --reports-only --out $(REAL)/data/iu
	$(BIN)/xlip tokenizer train $(REAL)/data/covid/manifest.csv $(REAL)/data/iu/manifest.csv \
		--out $(REAL)/tokenizer --vocab-size 4000
	$(BIN)/xlip pretrain --config configs/shared-real.yaml
	$(BIN)/xlip eval zeroshot --model $(REAL)
	$(BIN)/xlip eval suite --model $(REAL) --config configs/shared-real-eval.yaml

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
