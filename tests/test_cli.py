"""The ``lotus-rt`` command line and the trace exports: ``info`` reports StarPU, workers,
performance models and every LOTUS_* setting; ``trace`` records any program into a Chrome
trace (validated against the trace-event format) or a Gantt PNG; bad values are clear errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import describe, run_python, starpu_skip_reason
from lotus_rt.runtime import omp, perfmodels

SKIP_REASON = starpu_skip_reason()

# Runs a tiled einsum and a few dependent tasks; prints how many tasks ran in total.
PROGRAM = r"""
import numpy as np, lotus_rt
rng = np.random.default_rng(0)
a, b = rng.standard_normal((96, 40)), rng.standard_normal((40, 24))
out = lotus_rt.einsum("ij,jk->ik", a, b, tile=16)
assert np.allclose(out, a @ b)
rt = lotus_rt.runtime()
h = rt.register(np.ones(5))
inc = rt.codelet("increment", cpu=lambda x: np.add(x, 1, out=x))
for _ in range(7):
    rt.submit(inc, (h, "RW"))
rt.wait(); h.unregister()
print("TASKS", sum(s.tasks for s in rt.stats()))
"""


def _cli(*args: str, env: dict | None = None, unset: tuple[str, ...] = (),
         timeout: float = 120) -> subprocess.CompletedProcess:
    """``lotus-rt ARGS`` in a subprocess (conftest's run_python: repository importable)."""
    return run_python("import sys; from lotus_rt.cli import main; sys.exit(main(sys.argv[1:]))",
                      env, unset=unset, timeout=timeout, args=args)


def _tasks_run(proc: subprocess.CompletedProcess) -> int:
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("TASKS ")]
    return int(line.split()[1])


@pytest.mark.skipif(SKIP_REASON is not None, reason=str(SKIP_REASON))
def test_trace_command_writes_a_valid_chrome_trace(tmp_path):
    out = tmp_path / "run.json"
    proc = _cli("trace", "-o", str(out), "--", sys.executable, "-c", PROGRAM)
    assert proc.returncode == 0, describe(proc)
    document = json.loads(out.read_text())
    events = document["traceEvents"]
    tasks = [e for e in events if e["ph"] == "X"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert len(tasks) == _tasks_run(proc) == 6 + 7  # 96/16 tiles + 7 increments
    for e in tasks:
        assert {"name", "ph", "ts", "dur", "pid", "tid"} <= set(e), e
        assert isinstance(e["ts"], (int, float)) and e["dur"] >= 0 and e["tid"] in names
    for tid in names:  # one worker runs one task at a time: its events never overlap
        mine = sorted((e["ts"], e["dur"]) for e in tasks if e["tid"] == tid)
        assert all(ts + dur <= next_ts + 1.0 for (ts, dur), (next_ts, _) in zip(mine, mine[1:])), mine
    assert sum(e["name"] == "increment" for e in tasks) == 7
    assert f"{len(tasks)} tasks" in proc.stdout


@pytest.mark.skipif(SKIP_REASON is not None, reason=str(SKIP_REASON))
def test_trace_file_png_is_a_gantt_chart(tmp_path):
    out = tmp_path / "gantt.png"
    proc = _cli("trace", "-o", str(out), "--", sys.executable, "-c", PROGRAM)
    assert proc.returncode == 0, describe(proc)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trace_command_refuses_a_bad_suffix_before_running(tmp_path):
    marker = tmp_path / "ran"
    proc = _cli("trace", "-o", str(tmp_path / "t.txt"), "--", sys.executable, "-c",
                f"open({str(marker)!r}, 'w')")
    assert proc.returncode == 2 and "LOTUS_TRACE_FILE" in proc.stderr and ".json or .png" in proc.stderr
    assert not marker.exists()


@pytest.mark.skipif(SKIP_REASON is not None, reason=str(SKIP_REASON))
def test_info_reports_runtime_models_and_every_setting(tmp_path):
    home = {"STARPU_HOME": str(tmp_path), "STARPU_SCHED": "dmda", "LOTUS_TILE": "16"}
    run = run_python(PROGRAM, home, timeout=120)
    assert run.returncode == 0, describe(run)
    proc = _cli("info", env=home)
    assert proc.returncode == 0, describe(proc)
    text = proc.stdout
    assert "StarPU 1." in text and "policy: dmda" in text and "(cpu)" in text
    assert f"performance models: {tmp_path}" in text
    assert "contract_pair" in text and "task sizes calibrated" in text  # dmda measured the tiles
    for name in ("LOTUS_ENGINE", "LOTUS_TRACE", "LOTUS_TRACE_CAPACITY", "LOTUS_TRACE_FILE", "LOTUS_OPTIMIZE",
                 "LOTUS_TILE", "LOTUS_IDLE_PAUSE", "LOTUS_FUSE", "LOTUS_PRECISION", "LOTUS_HEAP"):
        assert f"  {name}=" in text, name
    assert "LOTUS_TILE=16\n" in text and "LOTUS_OPTIMIZE=auto (default)" in text
    assert "STARPU_SCHED=dmda" in text and "StarPU settings:\n" in text
    assert "Heap (freed memory kept for the next step): glibc keeps freed memory" in text


@pytest.mark.skipif(SKIP_REASON is not None, reason=str(SKIP_REASON))
def test_info_says_when_no_starpu_variable_is_set(tmp_path):
    unset = tuple(name for name in os.environ if name.startswith("STARPU_"))
    proc = _cli("info", env={"HOME": str(tmp_path)}, unset=unset)  # StarPU's files under HOME/.starpu
    assert proc.returncode == 0, describe(proc)
    assert "StarPU settings: none set (StarPU's defaults)" in proc.stdout


def test_info_with_a_bad_setting_is_one_clear_error():
    proc = _cli("info", env={"LOTUS_IDLE_PAUSE": "maybe"})
    assert proc.returncode == 2, describe(proc)
    assert "LOTUS_IDLE_PAUSE='maybe'" in proc.stderr and "Traceback" not in proc.stderr


MODEL_FILE = """##################
# Performance Model Version
45
####################
# DEV_0
# device type (CPU - 0, CUDA - 1, OPENCL - 2, MIC - 3, MPI_MS - 5)
0
#####
# hash\t\tsize\t\tflops\t\tmean (us)\tdev (us)\tsum\t\tsum2\t\tn
0a1b2c3d\t4096\t0.0\t5.0\t1.0\t60.0\t310.0\t12
0a1b2c3e\t8192\t0.0\t9.0\t1.0\t27.0\t250.0\t3
####################
# DEV_1
# device type (CPU - 0, CUDA - 1, OPENCL - 2, MIC - 3, MPI_MS - 5)
1
#####
# hash\t\tsize\t\tflops\t\tmean (us)\tdev (us)\tsum\t\tsum2\t\tn
0a1b2c3d\t4096\t0.0\t1.0\t0.1\t10.0\t11.0\t10
"""


def test_perf_model_files_are_summarised(tmp_path):
    folder = tmp_path / "codelets" / "45"
    folder.mkdir(parents=True)
    (folder / "lotus_contract_pair.myhost").write_text(MODEL_FILE)
    (folder / "lotus_conv_fold.otherhost").write_text(MODEL_FILE)  # another machine's: ignored
    (folder / "someone_else.myhost").write_text(MODEL_FILE)
    env = {"STARPU_PERF_MODEL_DIR": str(tmp_path), "STARPU_HOSTNAME": "myhost"}
    (model,) = perfmodels.lotus_models(env)
    assert (model.codelet, model.devices, model.footprints, model.calibrated, model.samples) == \
        ("contract_pair", ("cpu", "cuda"), 3, 2, 25)
    assert perfmodels.model_dir({"STARPU_HOME": "/x"}) == perfmodels.pathlib.Path("/x/.starpu/sampling")


def test_bench_list_names_every_scenario():
    proc = _cli("bench", "--list")
    assert proc.returncode == 0, describe(proc)
    for scenario in ("overhead", "einsum", "layers", "policies", "ncpu", "tiles"):
        assert scenario in proc.stdout


def test_lotus_rt_programs_pass_the_short_spin_to_what_they_run():
    """`lotus-rt trace -- cmd` runs cmd with GOMP_SPINCOUNT set (set before torch could load)."""
    code = "import os; print('spin=' + str(os.environ.get('GOMP_SPINCOUNT')))"
    run = _cli("trace", "-o", "unused.json", "--", sys.executable, "-c", code,
               unset=("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"))
    assert f"spin={omp.SPINCOUNT}" in run.stdout, describe(run)
    run = _cli("trace", "-o", "unused.json", "--", sys.executable, "-c", code, env={"GOMP_SPINCOUNT": "11"})
    assert "spin=11" in run.stdout, describe(run)
