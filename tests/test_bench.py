"""The benchmark suite runs: ``python -m benchmarks SCENARIO --quick`` writes sound JSON and a PNG.

Each scenario runs once, in a subprocess from the repository root (as a user would run it),
with a private STARPU_HOME and StarPU silenced; the checks then read what it wrote: the
environment record, the scenario's main results (positive medians, correct answers, and the
facts the scenario is about, e.g. that each policy's process really ran that policy) and the
PNG's magic bytes. ``layers`` is checked only when its module exists.
"""
from __future__ import annotations

import json
import pathlib
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, describe, mpi_skip_reason, python_path, starpu_skip_reason

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIMEOUT_S = 180
ENV_KEYS = ("starpu_version", "workers", "policy", "date")
NEEDS_STARPU = {"policies", "ncpu", "hetero", "distributed"}   # they vary StarPU settings across processes
# more arguments for a scenario's quick run: hetero traces a CPU run (no hybrid run without a GPU)
EXTRA_ARGS = {"hetero": ["--gantt", "cpu:dmda"]}


def run_benchmarks(args: list[str], tmp_path, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    home = tmp_path / "starpu_home"
    home.mkdir(exist_ok=True)
    env = dict(os.environ, STARPU_SILENT="1", STARPU_HOME=str(home))
    env["PYTHONPATH"] = python_path(env.get("PYTHONPATH"))
    return subprocess.run([sys.executable, *args], cwd=str(REPO_ROOT), env=env, capture_output=True,
                          text=True, timeout=timeout)


def positive(spread: dict) -> bool:
    return spread["median"] > 0 and spread["min"] > 0 and len(spread["samples"]) >= 1


# ------------------------------------------------------------------ per-scenario checks

def check_overhead(data: dict) -> None:
    for key in ("independent", "chain"):
        assert positive(data[f"{key}_us_per_task"]) and positive(data[f"{key}_replayed_us_per_task"])
        assert positive(data["replay_speedup"][key])
    gemm = data["gemm"]
    assert positive(gemm["dag_s"]) and positive(gemm["numpy_s"]) and positive(gemm["numpy_over_dag"])
    assert gemm["tasks"] == (gemm["size"] // gemm["tile"]) ** 3
    assert gemm["max_rel_error"] <= gemm["tolerance"] <= 1e-10


def check_einsum(data: dict) -> None:
    assert data["networks"]
    for net in data["networks"]:
        assert net["lotus"]
        for lot in net["lotus"]:
            assert positive(lot["time_s"]) and positive(lot["torch_over_lotus"])
            assert lot["plan"]["tasks"] >= 1
            assert lot["max_rel_error"] <= 1e-4
        assert net["flops"]["auto"]["ratio_vs_optimal"] >= 1.0 - 1e-12
    assert set(data["summary"]) == {net["name"] for net in data["networks"]}


def check_policies(data: dict) -> None:
    rows = {r["label"]: r for r in data["summary"]}
    assert {"eager", "lws", "dmda"} <= set(rows), rows.keys()
    assert rows["eager"]["gemm_speedup"] == rows["eager"]["tt_speedup"] == 1.0
    assert rows["eager"]["gemm_best_pass_speedup"] == 1.0
    for r in rows.values():
        assert r["gemm_ms"] > 0 and r["tt_ms"] > 0 and r["gemm_speedup"] > 0 and r["tt_speedup"] > 0
        assert r["gemm_speedup"] == pytest.approx(rows["eager"]["gemm_ms"] / r["gemm_ms"])
    assert not data["failed"]
    for run in data["runs"]:   # each process really ran under its own STARPU_SCHED
        assert run["status"] == "ok"
        assert run["environment"]["policy"] == run["label"] == run["env"]["STARPU_SCHED"]
        assert sum(run["worker_tasks"].values()) > 0
        for w in run["workloads"].values():
            assert w["max_rel_error"] <= w["tolerance"]
    import lotus_rt.starpu
    from lotus_rt.runtime import settings as config
    version = lotus_rt.starpu.version()
    refused = set(lotus_rt.starpu.policies()) - set(config.usable_policies(lotus_rt.starpu.policies(), version))
    assert {s["policy"] for s in data["skipped"]} == refused
    assert all(s["reason"] for s in data["skipped"])
    assert not refused & set(rows)


def check_ncpu(data: dict) -> None:
    rows = data["summary"]
    assert [r["ncpu"] for r in rows] == list(range(1, (os.cpu_count() or 1) + 1))
    assert rows[0]["gemm_speedup"] == rows[0]["tt_speedup"] == 1.0
    for r in rows:
        for kind in ("gemm", "tt"):
            assert r[f"{kind}_ms"] > 0
            assert r[f"{kind}_efficiency"] == pytest.approx(r[f"{kind}_speedup"] / r["ncpu"])
    for run, row in zip(data["runs"], rows):   # STARPU_NCPU really set the number of workers
        assert len(run["environment"]["workers"]) == row["ncpu"]
        assert len(run["worker_tasks"]) == row["ncpu"]


def check_tiles(data: dict) -> None:
    gemm, tt = data["gemm"], data["tt"]
    assert gemm[0]["untiled"] and gemm[0]["tasks"] == 1 and gemm[0]["tile"] == data["config"]["gemm"]["size"]
    tasks = [r["tasks"] for r in gemm]
    assert tasks == sorted(tasks) and len(set(tasks)) == len(tasks)   # smaller tiles, more tasks
    assert tt[0]["tile"] == "auto" and any(r["untiled"] for r in tt)
    for r in gemm + tt:
        assert positive(r["time_s"]) and positive(r["speedup_vs_untiled"])
        assert r["max_rel_error"] <= r["tolerance"]
        if r["untiled"]:
            assert r["speedup_vs_untiled"]["samples"] == [1.0] * len(r["time_s"]["samples"])


def check_layers(data: dict) -> None:
    cases = data["cases"]
    assert cases
    for case in cases:
        assert positive(case["lotus_s"]) and positive(case["torch_s"])
        assert case["max_rel_error"] <= 1e-4


def check_model(data: dict) -> None:
    names = [m["name"] for m in data["models"]]
    assert names == ["mnist_cnn", "resnet8"], names
    for m in data["models"]:
        for variant in ("dense", "tensorized"):
            r = m["variants"][variant]
            assert r["max_rel_error"] <= 1e-4 and r["tasks_per_step"]["forward"] > 0
            assert positive(r["time_s"]["lotus"]) and positive(r["time_s"]["eager"])
            assert positive(r["eager_over"]["lotus"]) and r["compile_skipped"]
        assert m["variants"]["tensorized"]["params"] < m["variants"]["dense"]["params"]
    assert (pathlib.Path(data["gantt"])).read_bytes()[:8] == PNG_MAGIC


def check_hetero(data: dict) -> None:
    cfg = data["config"]
    assert data["complete"] is True and cfg["policies"] == ["dmda", "eager"]
    ran = {r["mix"] for r in data["runs"]}
    skipped = {s["mix"]: s["reason"] for s in data["skipped"] if "mix" in s}
    assert "cpu" in ran
    for mix in cfg["mixes"]:   # every mix ran or says why not (no CUDA worker, no GPU for CuPy, ...)
        assert (mix in ran) != (mix in skipped) and skipped.get(mix, "ran"), (mix, ran, skipped)
    expected_kinds = {"cpu": {"cpu"}, "gpu": {"cuda"}, "hybrid": {"cpu", "cuda"}}
    for run in data["runs"]:   # each process ran its own policy and worker mix
        assert run["status"] == "ok", run
        assert run["environment"]["policy"] == run["policy"] == run["env"]["STARPU_SCHED"]
        kinds = {kind for kind, _ in run["environment"]["workers"]}
        assert kinds == expected_kinds[run["mix"]], (run["mix"], kinds)
        for w in run["workloads"].values():
            assert positive(w["time_s"]) and w["max_rel_error"] <= w["tolerance"]
            assert sum(w["tasks_by_kind"].values()) > 0 and set(w["tasks_by_kind"]) <= kinds
        gemm = run["workloads"]["gemm"]
        assert gemm["tasks_per_call"] == gemm["tasks_expected"] == (gemm["params"]["size"] // gemm["params"]["tile"]) ** 3
    assert {c["mix"] for c in data["calibration"]} == ran and all(c["status"] == "ok" for c in data["calibration"])
    for ref in (s for s in data["skipped"] if "reference" in s):
        assert ref["reason"]
    for kind, best in data["best_single"].items():   # speed-ups are relative to the best single device
        rows = [r for r in data["summary"] if r["workload"] == kind and r["mix"] != "reference"]
        assert rows and all(r["median_ms"] > 0 and r["speedup"] > 0 for r in rows)
        assert max(r["speedup"] for r in rows if r["mix"] in ("cpu", "gpu")) == pytest.approx(1.0)
        assert best["median_s"] * 1e3 == pytest.approx(min(r["median_ms"] for r in rows if r["mix"] in ("cpu", "gpu")))
    assert len(data["targets"]) == 3
    for t in data["targets"]:
        assert t["status"] in ("met", "missed", "not measured", "not applicable") and t["detail"], t
    if "gpu" in skipped:
        assert data["targets"][0]["status"] == "not measured" and data["single_gemm"] is None
    assert "name" in data["environment"]["gpu"]
    assert data["gantt"]["run"] == "dmda on cpu"
    with open(data["gantt"]["png"], "rb") as f:
        assert f.read(8) == PNG_MAGIC


def check_decompose(data: dict) -> None:
    rows = data["rows"]
    assert {(r["tensor"], r["method"]) for r in rows} == {(t, m) for t in ("conv", "random", "low-rank")
                                                          for m in ("tucker", "tucker2", "cp", "tt")}
    for r in rows:
        assert positive(r["time_s"]["tensorly"]) and positive(r["time_s"]["lotus_rt"])
        assert positive(r["lotus_over_tensorly"])
        assert r["lotus_over_tensorly"]["samples"] == pytest.approx(
            [o / t for o, t in zip(r["time_s"]["lotus_rt"]["samples"], r["time_s"]["tensorly"]["samples"])])
        assert 0 <= r["error"]["lotus_rt"] < 1 and 0 <= r["error"]["tensorly"] < 1
        assert r["met"] == (r["error_met"] and r["time_met"])
        if r["tensor"] == "low-rank":   # exactly low-rank at the decomposition's own ranks: fitted
            assert r["error"]["lotus_rt"] < 1e-8, r
    assert data["all_met"] == all(r["met"] for r in rows)


def check_distributed(data: dict) -> None:
    (row,) = data["summary"]  # quick: 2 ranks, strong scaling
    assert row["ranks"] == 2 and row["mode"] == "strong"
    assert row["lotus_ms"] > 0 and row["ddp_ms"] > 0 and row["lotus_over_ddp"] == pytest.approx(row["lotus_ms"] / row["ddp_ms"])
    assert not data["failed"]
    lotus = [r for r in data["runs"] if r["kind"] == "lotus"]
    assert lotus and all(r["status"] == "ok" and r["ranks_agree"] for r in lotus)
    # rank 0 runs 9 reduction tasks a step (6 parameters, 2 ranks: roots alternate)
    assert row["overlap"]["reductions"] == 9 * data["config"]["steps"]
    assert {r["kind"] for r in data["runs"]} == {"lotus", "ddp"}


CHECKS = {"overhead": check_overhead, "einsum": check_einsum, "policies": check_policies,
          "ncpu": check_ncpu, "tiles": check_tiles, "layers": check_layers, "hetero": check_hetero,
          "decompose": check_decompose, "model": check_model, "distributed": check_distributed}


@pytest.mark.parametrize("name", list(CHECKS))
def test_scenario_quick_writes_json_and_png(name, tmp_path):
    if name in NEEDS_STARPU and starpu_skip_reason():
        pytest.skip(starpu_skip_reason())
    if name == "distributed" and mpi_skip_reason():
        pytest.skip(mpi_skip_reason())
    out = tmp_path / "out"
    proc = run_benchmarks(["-m", "benchmarks", name, "--quick", "--out", str(out), *EXTRA_ARGS.get(name, [])],
                          tmp_path)
    assert proc.returncode == 0, describe(proc)
    json_path, png_path = out / f"{name}_quick.json", out / f"{name}_quick.png"
    assert json_path.is_file(), describe(proc)
    data = json.loads(json_path.read_text())
    env = data.get("environment", data)
    for key in ENV_KEYS:
        assert env.get(key), (key, env)
    assert data["quick"] is True
    CHECKS[name](data)
    assert png_path.read_bytes()[:8] == PNG_MAGIC
    assert png_path.stat().st_size > 5000   # an actual chart, not an empty canvas


def test_script_mode_runs(tmp_path):
    """``python benchmarks/overhead.py`` works too (benchmarks.common importable as a script)."""
    proc = run_benchmarks(["benchmarks/overhead.py", "--tasks", "200", "--repeats", "1", "--size", "128",
                           "--tile", "64", "--out", str(tmp_path)], tmp_path)
    assert proc.returncode == 0, describe(proc)
    data = json.loads((tmp_path / "overhead.json").read_text())
    assert data["config"] == {"tasks": 200, "repeats": 1} and data["quick"] is False
    assert (tmp_path / "overhead.png").read_bytes()[:8] == PNG_MAGIC


def test_list_and_unknown_scenario(tmp_path):
    proc = run_benchmarks(["-m", "benchmarks", "--list"], tmp_path, timeout=60)
    assert proc.returncode == 0, describe(proc)
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    assert listed == ["overhead", "einsum", "layers", "model", "policies", "ncpu", "tiles", "hetero", "decompose",
                      "mps", "distributed", "all"], proc.stdout
    proc = run_benchmarks(["-m", "benchmarks", "no-such-scenario"], tmp_path, timeout=60)
    assert proc.returncode == 2 and "unknown scenario 'no-such-scenario'" in proc.stderr, describe(proc)


def test_missing_scenario_module_is_reported_not_raised(monkeypatch, capsys):
    from benchmarks import __main__ as suite

    monkeypatch.setitem(suite.SCENARIOS, "ghost", ("benchmarks.no_such_module", "a module not written"))
    assert suite.main(["ghost", "--quick"]) == 2
    assert "scenario 'ghost' is unavailable: module benchmarks.no_such_module" in capsys.readouterr().err
    assert suite.main(["--list"]) == 0
    ghost = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ghost ")]
    assert len(ghost) == 1 and "[unavailable: module benchmarks.no_such_module" in ghost[0]


def test_median_spread_and_result_paths(tmp_path):
    from benchmarks import common

    assert common.median_spread([3, 1, 2]) == {"median": 2.0, "min": 1.0, "max": 3.0, "samples": [3.0, 1.0, 2.0]}
    path = common.write_result(tmp_path, "demo", True, {"x": 1})
    assert path == tmp_path / "demo_quick.json" and json.loads(path.read_text()) == {"x": 1}
    assert common.png_path(path) == tmp_path / "demo_quick.png"
    assert common.result_path(tmp_path, "demo", False).name == "demo.json"


def test_hetero_targets_follow_the_numbers():
    """hetero's targets are computed from the measurements (synthetic ones here), never fixed."""
    from benchmarks import common, hetero

    def run(mix: str, ms: float) -> dict:
        w = {"time_s": common.median_spread([ms / 1e3]), "tasks_by_kind": {"cpu": 4}, "params": {}}
        return {"mix": mix, "policy": "dmda", "status": "ok", "workloads": {k: dict(w) for k in hetero.WORKLOADS}}

    def analysed(cpu_ms: float, gpu_ms: float, hybrid_ms: float, codelet_ms: float) -> dict:
        result = {"config": {"mixes": ["cpu", "gpu", "hybrid"], "policies": ["dmda"], "gpu_precision": {}},
                  "skipped": [], "runs": [run("cpu", cpu_ms), run("gpu", gpu_ms), run("hybrid", hybrid_ms)],
                  "references": {"cupy": {"single_gemm": {"time_s": common.median_spread([0.010])}}},
                  "single_gemm": {"time_s": common.median_spread([codelet_ms / 1e3]), "tflops": 1.0,
                                  "size": 8192, "dtype": "float32", "run": "dmda on gpu"}}
        hetero.analyse(result)
        return result

    data = analysed(cpu_ms=100, gpu_ms=50, hybrid_ms=40, codelet_ms=10.5)
    assert data["best_single"]["gemm"] == {"mix": "gpu", "policy": "dmda", "median_s": 0.05}
    assert data["balance"]["tt"]["ideal_hybrid_speedup"] == pytest.approx(1.5) and data["balance"]["tt"]["balanced"]
    assert [t["status"] for t in data["targets"]] == ["met", "met", "met"]      # 0.95x, 1.25x, 1.25x
    data = analysed(cpu_ms=100, gpu_ms=50, hybrid_ms=48, codelet_ms=12)
    assert [t["status"] for t in data["targets"]] == ["missed", "met", "missed"]   # 0.83x, 1.04x
    data = analysed(cpu_ms=1000, gpu_ms=50, hybrid_ms=55, codelet_ms=10)
    assert [t["status"] for t in data["targets"]] == ["met", "missed", "not applicable"]   # ideal 1.05x
