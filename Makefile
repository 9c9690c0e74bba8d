# Two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= a lighthouse on a cliff at dusk, dramatic sky

.PHONY: setup demo test lint proto bench-quick serve fleet

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml scripts/bootstrap.sh
	scripts/bootstrap.sh $(VENV)

demo: setup
	$(VENV)/bin/refinery generate "$(PROMPT)" --refiner builtin:tiny-sdxl-refiner@1 --steps 20 --seed 7 -o demo.png

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy && $(PY) scripts/check_sizes.py

proto: setup
	$(PY) scripts/gen_proto.py

# Every benchmark's --quick (seconds each, tiny sizes, the same code path): CI's check that they still run.
bench-quick: setup
	bash .ci/benchmarks.sh

serve: setup
	$(VENV)/bin/refinery serve

# N `refinery serve` replicas behind nginx with pair affinity, on loopback (deploy/local/fleet.py; needs nginx).
fleet: setup
	$(PY) -m deploy.local.fleet $(FLEET_ARGS)
