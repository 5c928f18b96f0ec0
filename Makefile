# The two commands: `make demo` and `make test`. Both set everything up first.
VENV := .venv
PY := $(VENV)/bin/python
# The tier that needs no root, as nobody when run as root (scripts/unprivileged.sh), in three
# processes: on 2 cores a third fills the time a quarter of these tests spend waiting (timeouts,
# child processes); an idle worker takes tests from a busy one (worksteal).
UNIT := bash scripts/unprivileged.sh $(PY) -m pytest -p no:cacheprovider -n 3 --dist worksteal \
	-m "not netns and not kube"

.PHONY: setup demo test lint typecheck layering unit bench fuzz lock image clean

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/ambientctl demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy .

# The import contracts of pyproject.toml's [tool.importlinter].
layering: setup
	$(VENV)/bin/lint-imports

# Every test that needs no root, as an unprivileged user; under a minute.
unit: setup
	$(UNIT)

# Each test runs once: the unprivileged tier as nobody, then the netns tier as root.
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .
	$(VENV)/bin/lint-imports
	$(UNIT)
	$(PY) -m pytest -p no:cacheprovider --durations=25 -m "netns or kube"

# Every scenario of the mesh cost benchmark in one run (needs root; about 20 min on 2 cores:
# 3 interleaved latency rounds at 3 rates).
# `$(PY) benchmarks/mesh_bench.py --quick` takes about 7 min (2 rounds at 1000 rps);
# benchmarks/l4_datapath.py still runs on its own.
bench: setup
	$(PY) benchmarks/mesh_bench.py

# The mesh's container image, ambient-mesh/mesh:0.13.0, into the local image store (root;
# setup builds it too). `scripts/image-build.sh --tag T --version V` for another tag.
image:
	bash scripts/image-build.sh

# Each parser's fuzz target (fuzz/targets/) under atheris for FUZZ_SECONDS, one after the
# other, at low priority; prints executions, exec/s, coverage and crashes per target. A
# crashing input lands in fuzz/crashes/<target>/, which `make test` replays.
FUZZ_SECONDS ?= 60
fuzz: setup
	nice -n 10 $(PY) -m fuzz.run --seconds $(FUZZ_SECONDS)

# constraints.txt from the newest releases pyproject.toml allows (scripts/lock.sh).
lock:
	bash scripts/lock.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info .setup-stamp
