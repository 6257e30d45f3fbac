# The README's commands. Everything installs into .venv on first use.
PY      := .venv/bin/python
STAMP   := .venv/.installed
export PYTHONPATH := $(CURDIR)

.PHONY: install train test lint bench data clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements-dev.txt
	touch $(STAMP)

data/stdlib/train.jsonl: | $(STAMP)
	$(PY) scripts/prepare_data.py

data: data/stdlib/train.jsonl

train: $(STAMP) data/stdlib/train.jsonl
	$(PY) scripts/train.py --config configs/tiny.py --workdir runs/tiny

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	.venv/bin/ruff check .

bench: $(STAMP)
	$(PY) scripts/bench.py memory --json
	$(PY) scripts/bench.py balance --json
	$(PY) scripts/bench.py layout --json
	$(PY) scripts/bench.py attention --json
	$(PY) scripts/bench.py step --json

clean:
	rm -rf .venv .pytest_cache .ruff_cache
