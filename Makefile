# Two commands do everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO := .fleetscribe/demo

# Nothing below reaches a model hub: tests and the demo use the tiny offline model.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test lint format clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# constraints.txt pins the torch build that lies on local disk (no multi-GB download)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,monitor]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	# the import contract: layers one way, no GPU stack under the producer (pyproject.toml)
	$(VENV)/bin/lint-imports

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: lint
	$(PY) -m pytest -q --durations=10

# The real pipeline on the embedded default: SQLite, the server-less filesystem broker,
# a real Celery worker process, and the tiny random Qwen3-VL built offline.
demo: install
	rm -rf $(DEMO)
	export FLEETSCRIBE_HOME=$(DEMO) FLEETSCRIBE_MODEL=$(DEMO)/tiny-model FLEETSCRIBE_QUANT=fp32
	export FLEETSCRIBE_MAX_NEW_TOKENS=48 FLEETSCRIBE_FRAMES=8
	$(PY) -m models build-tiny $(DEMO)/tiny-model
	$(PY) -m producer clips $(DEMO)/videos --count 6
	cp $(DEMO)/videos/$$(ls $(DEMO)/videos | head -n 1) $(DEMO)/videos/same_video_other_name.mp4
	echo "this is not a video" > $(DEMO)/videos/notes.mp4
	: > $(DEMO)/videos/empty.mkv
	$(PY) -m worker --loglevel WARNING & worker=$$!
	trap 'kill $$worker 2>/dev/null || true; wait $$worker 2>/dev/null || true' EXIT
	$(PY) -m producer enqueue $(DEMO)/videos --wait
	$(PY) -m producer status
	$(PY) -m db query "SELECT v.id, v.state, v.codec, v.width || 'x' || v.height AS size, \
	    round(v.duration, 1) AS seconds, r.valid, r.tokens_in, r.tokens_out, \
	    round(r.latency_s, 3) AS latency_s, coalesce(r.risk_factor, '') AS risk, \
	    coalesce(r.error, v.reason, '') AS note \
	    FROM videos v LEFT JOIN reports r ON r.video_id = v.id ORDER BY v.id"
	$(PY) -m db query "SELECT s.path, s.outcome, s.video_id FROM submissions s ORDER BY s.id"

clean:
	rm -rf .fleetscribe .pytest_cache .ruff_cache
