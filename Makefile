# The README's commands. Everything installs into .venv on first use.
PY      := .venv/bin/python
STAMP   := .venv/.installed
export PYTHONPATH := $(CURDIR)

.PHONY: install train test lint bench data clean longctx

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
	$(PY) -m pytest -q --durations=15 tests

lint: $(STAMP)
	.venv/bin/ruff check .

bench: $(STAMP)
	$(PY) scripts/bench.py memory --json
	$(PY) scripts/bench.py balance --json
	$(PY) scripts/bench.py layout --json
	$(PY) scripts/bench.py attention --json
	$(PY) scripts/bench.py step --json

# The long-context recipe (docs/long_context.md); not part of `make test`. LONGCTX_EVAL adds
# flags to both evaluations (e.g. --batch 1); PASSKEY the held-out prompts' file.
LONGCTX      := runs/longctx
LONGCTX_DATA := --retrieval_examples 4000 --retrieval_long_examples 400 \
                --retrieval_warmup_examples 100000 --retrieval_gap_copy_examples 40000 \
                --retrieval_rung_examples 30000
PASSKEY      := data/longctx/heldout_passkey.jsonl

longctx: $(STAMP)
	$(PY) scripts/prepare_data.py $(LONGCTX_DATA)
	$(PY) scripts/train.py --config configs/longctx_warmup.py --workdir $(LONGCTX)/warmup
	$(PY) scripts/train.py --config configs/longctx_rung.py --workdir $(LONGCTX)/rung \
	    --config.train.init_from=$(LONGCTX)/warmup
	$(PY) scripts/train.py --config configs/longctx_stage1.py --workdir $(LONGCTX)/stage1 \
	    --config.train.init_from=$(LONGCTX)/rung
	$(PY) scripts/train.py --config configs/longctx_stage2.py --workdir $(LONGCTX)/stage2 \
	    --config.train.init_from=$(LONGCTX)/stage1
	for s in stage1 stage2; do \
	    $(PY) scripts/eval.py --workdir $(LONGCTX)/$$s --data data/longctx/heldout_long.jsonl \
	        --context 16384 --passkey_file $(PASSKEY) --out $(LONGCTX)/eval_$$s.json \
	        $(LONGCTX_EVAL) || exit 1; \
	done
	$(PY) scripts/longctx_report.py --eval "stage 1=$(LONGCTX)/eval_stage1.json" \
	    --eval "stage 2=$(LONGCTX)/eval_stage2.json" --out_dir $(LONGCTX)
	for s in stage1 stage2; do \
	    $(PY) scripts/longctx_probe.py --workdir $(LONGCTX)/$$s --out $(LONGCTX)/probe_$$s.json \
	        --lengths 64,256,1024,4096,16384 --per_length 4 || exit 1; \
	done

clean:
	rm -rf .venv .pytest_cache .ruff_cache
