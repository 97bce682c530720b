# The README's two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.saestrata-installed

.PHONY: install browser demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/saestrata demo

# Headless Chromium for the dashboard browser test (tests/test_inspect.py), Debian's package;
# the test skips, saying why, where it cannot be installed.
browser:
	@command -v chromium >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && (apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium))) \
		|| echo "chromium not installed: the browser test in tests/test_inspect.py will skip"

test: install browser
	$(BIN)/pytest -q --durations=15 tests

clean:
	rm -rf $(VENV) build *.egg-info
