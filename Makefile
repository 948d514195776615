# asok: `make run` serves the counter example, `make test` runs every tier, `make bench` measures.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PYVIEW_VENV := .venv-pyview
PORT ?= 8000

.PHONY: run test lint test-core test-browser test-asgi bench deps browser clean

run:
	$(PY) asok.py serve examples/counter --port $(PORT) --debug

$(VENV)/.deps: Makefile
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check pytest playwright uvicorn websockets jinja2 redis \
		'ruff>=0.17,<0.18' 'pyflakes>=3,<5'
	touch $@

deps: $(VENV)/.deps

# pyview, measured beside asok by `make bench`, in its own environment (its dependencies stay out of .venv)
$(PYVIEW_VENV)/.deps: Makefile
	$(PY) -m venv $(PYVIEW_VENV)
	$(PYVIEW_VENV)/bin/python -m pip install -q --disable-pip-version-check 'pyview-web>=0.9,<0.10' 'uvicorn[standard]'
	touch $@

browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
	@test -x /usr/sbin/nginx || { apt-get update -qq && apt-get install -y -qq nginx-light; }

# ruff with its default rules and the quote rules (Q), less those ruff.toml names with a reason; pyflakes
lint: deps
	$(VPY) -m ruff check --no-cache asok.py
	$(VPY) -m pyflakes asok.py

test: deps browser lint
	$(VPY) -m pytest -q test_asok.py
	$(VPY) -m pytest -q test_browser.py -p no:cacheprovider

bench: deps browser $(PYVIEW_VENV)/.deps
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	$(VPY) bench.py --pyview $(PYVIEW_VENV)/bin/python

clean:
	rm -rf $(VENV) $(PYVIEW_VENV) .pytest_cache __pycache__ examples/*/.asok
