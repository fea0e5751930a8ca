"""The package layout holds: rooms import only the rooms below them, kernels import no lotus_rt
module, and the environment is read in one place.

The import contract lives in pyproject.toml and is checked by import-linter's ``lint-imports``
(docs/ARCHITECTURE.md draws the rooms). A copy of the tree with one import against the arrows
must break it: the contract is not vacuous.
"""
from __future__ import annotations

import ast
import pathlib
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

pytest.importorskip("importlinter", reason="import-linter is a dev extra (pip install -e .[dev]); "
                                           "without it the import contract cannot be checked")

# Where the process environment may be read: the Settings module (every LOTUS_* knob and the
# outside variables lotus_rt reports), the command line (it builds environments for the programs
# it starts), and the build script of the binding (pkg-config at build time, never imported).
ENV_READERS = {"lotus_rt/runtime/settings.py", "lotus_rt/cli.py", "lotus_rt/starpu/_build.py"}


def lint_imports(root: pathlib.Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the tree at ``root`` (its own pyproject.toml and packages)."""
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())"], cwd=root, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_the_import_contract_is_kept():
    proc = lint_imports(REPO_ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout and "KEPT" in proc.stdout


@pytest.fixture
def tree_copy(tmp_path):
    """The packages and pyproject.toml, copied (no compiled binding needed: the check is static)."""
    for name in ("lotus_rt", "kernels"):
        shutil.copytree(REPO_ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path)
    return tmp_path


@pytest.mark.parametrize("module, line, broken", [
    ("kernels/conv.py", "from lotus_rt.runtime import settings", "kernels.conv -> lotus_rt.runtime.settings"),
    ("kernels/contract.py", "import lotus_rt", "kernels.contract -> lotus_rt"),
    ("lotus_rt/tn/plan.py", "from lotus_rt import nn", "lotus_rt.tn.plan -> lotus_rt.nn"),
    ("lotus_rt/runtime/core.py", "from lotus_rt.layers import program", "lotus_rt.runtime.core -> lotus_rt.layers"),
])
def test_an_import_against_the_arrows_breaks_the_contract(tree_copy, module, line, broken):
    path = tree_copy / module
    path.write_text(path.read_text() + f"\n{line}  # against the arrows\n")
    proc = lint_imports(tree_copy)
    assert proc.returncode != 0, proc.stdout
    assert "BROKEN" in proc.stdout and broken in proc.stdout, proc.stdout


def _reads_the_environment(source: str) -> bool:
    """Whether code (not a docstring or comment) names os.environ, os.getenv or environ."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb"):
            return True
        if isinstance(node, ast.ImportFrom) and node.module == "os" and \
                any(alias.name in ("environ", "getenv") for alias in node.names):
            return True
    return False


def test_the_environment_is_read_only_by_settings_and_the_cli():
    readers = {str(path.relative_to(REPO_ROOT))
               for path in list((REPO_ROOT / "lotus_rt").rglob("*.py")) + list((REPO_ROOT / "kernels").rglob("*.py"))
               if _reads_the_environment(path.read_text())}
    assert readers <= ENV_READERS, sorted(readers - ENV_READERS)
    assert _reads_the_environment("import os\nx = os.environ.get('A')")  # the check itself can fail


def test_kernels_are_the_top_level_folder_installed_by_the_setup_mapping_alone():
    import lotus_rt
    import lotus_rt.kernels

    assert pathlib.Path(lotus_rt.kernels.__file__).resolve().parent == REPO_ROOT / "kernels"
    source = (REPO_ROOT / "lotus_rt" / "__init__.py").read_text()
    assert "sys.modules" not in source and "spec_from_file_location" not in source  # no import hook
    assert lotus_rt.kernels is sys.modules["lotus_rt.kernels"]
