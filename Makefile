# Two targets a newcomer needs. Each creates .venv itself and pins torch==2.13.0 (never an unpinned torch).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_TOKENS ?= 600000

.PHONY: demo test setup
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

# Scratch vs StackBERT vs Apollo vs apollo-plus on the embedded synthetic corpus (about 10 minutes on 2 CPU cores).
demo: setup
	$(VENV)/bin/apollo compare --preset gpt-tiny --methods scratch,stackbert,apollo,apollo-plus \
		--tokens $(DEMO_TOKENS) --eval-every 20 --eval-blocks 100 --out runs/demo --overwrite

test: setup
	$(PY) -m pytest
