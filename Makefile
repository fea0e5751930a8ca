# lotus_rt: `make demo` runs the main job, `make test` the test suite; both install what they need.
PYTHON ?= python3

STAMP := .deps-stamp
# Changing any of these reinstalls the package (and so recompiles the StarPU binding).
STAMP_INPUTS := setup.py pyproject.toml lotus_rt/starpu/_build.py lotus_rt/starpu/_shim.c lotus_rt/starpu/_mpi_shim.c
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
TORCH_PIN := torch==2.13.0
# Exits 0 when the lotus_rt that $(PYTHON) imports (from outside the repo) is this checkout's.
export INSTALLED_HERE := import importlib.util as u, os, sys; s = u.find_spec("lotus_rt"); \
  sys.exit(not (s and s.origin and os.path.realpath(s.origin) == os.path.realpath(sys.argv[1])))

# Exits 0 when the binding $(PYTHON) imports was compiled with StarPU-MPI (lotus_rt.distributed).
export HAS_MPI := import sys, lotus_rt.starpu._lotus_starpu as m; sys.exit(not hasattr(m.lib, "lotus_mpi_init"))

.PHONY: deps test demo bench check-starpu-1.4

# Idempotent; each step runs only when its check fails, so a second `make deps` takes a second or two.
# The editable install is redone when .deps-stamp is missing or older than STAMP_INPUTS, or when
# $(PYTHON) does not import lotus_rt from this checkout.
deps:
	@set -e; \
	if [ -n "$${STARPU_PREFIX:-}" ]; then \
	  export PKG_CONFIG_PATH="$$STARPU_PREFIX/lib/pkgconfig:$$STARPU_PREFIX/lib64/pkgconfig:$$STARPU_PREFIX/lib/x86_64-linux-gnu/pkgconfig:$${PKG_CONFIG_PATH:-}"; \
	fi; \
	if { pkg-config --exists starpu-1.4 || pkg-config --exists starpu-1.3; } 2>/dev/null; then :; else \
	  echo "make deps: StarPU not found by pkg-config; installing libstarpu-dev pkg-config with apt-get"; \
	  $(SUDO) apt-get update; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y libstarpu-dev pkg-config; \
	  rm -f $(STAMP); \
	fi; \
	if command -v mpirun >/dev/null 2>&1 && { pkg-config --exists ompi || command -v mpicc; } >/dev/null 2>&1; then :; else \
	  echo "make deps: MPI not found (mpirun, MPI headers); installing openmpi-bin libopenmpi-dev with apt-get"; \
	  $(SUDO) apt-get update; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y openmpi-bin libopenmpi-dev; \
	  rm -f $(STAMP); \
	fi; \
	if ! $(PYTHON) -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" >/dev/null 2>&1; then \
	  echo "make deps: installing $(TORCH_PIN) (CPU wheel)"; \
	  $(PYTHON) -m pip install "$(TORCH_PIN)"; \
	fi; \
	if [ ! -f $(STAMP) ] || [ -n "$$(find $(STAMP_INPUTS) -newer $(STAMP) 2>/dev/null)" ] \
	   || ! (cd / && $(PYTHON) -c "$$INSTALLED_HERE" "$(CURDIR)/lotus_rt/__init__.py") \
	   || { { pkg-config --exists starpumpi-1.4 || pkg-config --exists starpumpi-1.3; } 2>/dev/null \
	        && ! (cd / && $(PYTHON) -c "$$HAS_MPI") >/dev/null 2>&1; }; then \
	  echo "make deps: pip install -e .[dev,demo]"; \
	  $(PYTHON) -m pip install -e ".[dev,demo]"; \
	  touch $(STAMP); \
	  if (cd / && $(PYTHON) -c "import lotus_rt.starpu._lotus_starpu") >/dev/null 2>&1; then \
	    echo "make deps: StarPU binding lotus_rt.starpu._lotus_starpu built"; \
	  else \
	    echo "make deps: WARNING: the StarPU binding was not built or does not load; lotus_rt will use its inline engine"; \
	  fi; \
	fi

test: deps
	$(PYTHON) -m pytest -q tests

demo: deps
	$(PYTHON) -m lotus_rt.cli demo

bench: deps
	$(PYTHON) -m benchmarks $(or $(SCENARIO),all)

# Compile-checks the binding against Debian trixie's StarPU 1.4 headers (fetched privately).
check-starpu-1.4: deps
	PYTHON="$(PYTHON)" bash scripts/check-starpu-headers.sh
