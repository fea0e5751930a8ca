"""``python -m benchmarks.hetero``: the scenario, or one of its child processes (``--child``)."""
import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent.parent))

from benchmarks.hetero import main  # noqa: E402

sys.exit(main())
