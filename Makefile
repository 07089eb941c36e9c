# The README's two commands: `make book` (build the course into _build/html) and `make test`.
# Each creates the virtual environment .venv when it is missing and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Chapters run in quick mode on the CPU unless told otherwise (TRLIB_MODE=full make book).
export TRLIB_MODE ?= quick
export PYTHONHASHSEED ?= 0
BOOK_FLAGS ?= -W -n --keep-going
NOTEBOOKS := $(sort $(wildcard book/*.ipynb))
PYTEST_WORKERS ?= 2

.PHONY: book test test-lib test-notebooks venv clean benchmarks repository-url

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

book: $(STAMP)
	$(VENV)/bin/jupyter-book build . --all $(BOOK_FLAGS)
	@echo "The book is in _build/html/index.html"

test: test-lib test-notebooks

test-lib: $(STAMP)
	$(PY) -m pytest tests trlib --doctest-modules -q -n $(PYTEST_WORKERS) -p no:cacheprovider

# Every chapter executes as on Colab: myst-nb hidden from the kernel (tests/without_myst_nb).
test-notebooks: $(STAMP)
	PYTHONPATH="$(CURDIR)/tests/without_myst_nb$${PYTHONPATH:+:$$PYTHONPATH}" \
	$(PY) -m pytest --nbval-lax --nbval-cell-timeout=300 -q -n $(PYTEST_WORKERS) --dist loadfile -p no:cacheprovider $(NOTEBOOKS)

benchmarks: $(STAMP)
	for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

# The repository's address is one setting (pyproject.toml [project.urls] Repository):
# `make repository-url URL=https://github.com/OWNER/REPO` sets it and rewrites every place derived from it.
repository-url:
	$(PYTHON) tools/sync_repository_url.py $(if $(URL),--set $(URL))

clean:
	rm -rf _build
