"""Settings: LOTUS_* and StarPU variables are checked before any task, read once per runtime,
and changed while it runs only through ``reconfigure()`` (the live knobs) or a restart.
"""
from __future__ import annotations

import json
import os
import textwrap

import pytest

import lotus_rt
import lotus_rt.starpu
from lotus_rt.runtime import settings as config
from conftest import starpu_skip_reason

SKIP_REASON = starpu_skip_reason()
USABLE = (config.usable_policies(lotus_rt.starpu.policies(), lotus_rt.starpu.version())
          if lotus_rt.starpu.available() else [])


# ---------------------------------------------------------------------- configuration errors

CONFIG_SCRIPT = textwrap.dedent("""
    import json, os, numpy as np, lotus_rt
    ran = []
    try:
        rt = lotus_rt.runtime()
        h = rt.register(np.ones(2))
        rt.submit(rt.codelet("probe", cpu=lambda x: ran.append(1)), (h, "RW"))
        rt.wait()
        print("NO_ERROR", rt.engine, rt.policy, len(rt.workers))
    except lotus_rt.ConfigError as exc:
        print("CONFIG_ERROR", isinstance(exc, ValueError), isinstance(exc, lotus_rt.LotusError))
        print("MESSAGE", str(exc).replace(chr(10), " "))
    print("RAN", len(ran))
    # a failed start leaves nothing behind: with a good environment, a runtime starts
    for name in json.loads(os.environ["BAD_VARS"]):
        os.environ.pop(name, None)
    rt = lotus_rt.runtime()
    h = rt.register(np.arange(1.0, 4.0))
    rt.submit(rt.codelet("double", cpu=lambda x: np.multiply(x, 2, out=x)), (h, "RW"))
    rt.wait()
    print("RECOVERED", rt.engine, h.unregister().tolist())
""")


def _run_config(run_py, env):
    proc = run_py(CONFIG_SCRIPT, env={**env, "BAD_VARS": json.dumps(list(env))}, timeout=60)
    lines = dict(line.split(None, 1) for line in proc.stdout.splitlines() if " " in line)
    return proc, lines


@pytest.mark.parametrize("env, words", [
    ({"STARPU_SCHED": "no-such-policy"}, ["STARPU_SCHED", "'no-such-policy'", "valid values", "eager", "dmda"]),
    ({"STARPU_SCHED": "DMDA"}, ["STARPU_SCHED", "valid values"]),
    ({"STARPU_NCPU": "abc"}, ["STARPU_NCPU", "'abc'", "integer"]),
    ({"STARPU_NCPU": "-5"}, ["STARPU_NCPU", "'-5'"]),
    ({"STARPU_NCUDA": "1.5"}, ["STARPU_NCUDA", "'1.5'"]),
], ids=["sched_unknown", "sched_wrong_case", "ncpu_abc", "ncpu_negative", "ncuda_float"])
def test_bad_starpu_env_is_a_config_error_before_any_task(run_py, describe_proc, env, words):
    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    proc, lines = _run_config(run_py, env)
    assert proc.returncode == 0, describe_proc(proc)
    assert lines.get("CONFIG_ERROR") == "True True", describe_proc(proc)
    for word in words:
        assert word in lines["MESSAGE"], (word, lines["MESSAGE"])
    if "STARPU_SCHED" in env:   # every usable policy is listed, refused ones are not
        listed = lines["MESSAGE"].split("valid values: ", 1)[1].split(", ")
        assert listed == USABLE, listed
    assert lines["RAN"] == "0"
    assert lines.get("RECOVERED") == "starpu [2.0, 4.0, 6.0]", describe_proc(proc)


@pytest.mark.parametrize("env, words", [
    ({"LOTUS_ENGINE": "bogus"}, ["LOTUS_ENGINE", "'bogus'", "valid values", "starpu", "inline"]),
    ({"LOTUS_TRACE": "maybe"}, ["LOTUS_TRACE", "'maybe'"]),
    ({"LOTUS_TRACE_CAPACITY": "0"}, ["LOTUS_TRACE_CAPACITY", "'0'", "positive integer"]),
    ({"LOTUS_TRACE_CAPACITY": "lots"}, ["LOTUS_TRACE_CAPACITY", "'lots'"]),
    ({"LOTUS_IDLE_PAUSE": "sometimes"}, ["LOTUS_IDLE_PAUSE", "'sometimes'", "valid values"]),
    ({"LOTUS_FUSE": "maybe"}, ["LOTUS_FUSE", "'maybe'", "auto, on, off"]),
    ({"LOTUS_HEAP": "jemalloc"}, ["LOTUS_HEAP", "'jemalloc'", "keep, system"]),
    ({"LOTUS_TRACE_FILE": "t.txt"}, ["LOTUS_TRACE_FILE", "'t.txt'", ".json or .png"]),
], ids=["engine_bogus", "trace_maybe", "capacity_zero", "capacity_text", "idle_pause_bad", "fuse_bad",
        "heap_bad", "trace_file_bad"])
def test_bad_lotus_env_is_a_config_error(run_py, describe_proc, env, words):
    proc, lines = _run_config(run_py, env)
    assert proc.returncode == 0, describe_proc(proc)
    assert lines.get("CONFIG_ERROR") == "True True", describe_proc(proc)
    for word in words:
        assert word in lines["MESSAGE"], (word, lines["MESSAGE"])
    assert lines["RAN"] == "0"
    assert lines.get("RECOVERED", "").endswith("[2.0, 4.0, 6.0]"), describe_proc(proc)


def test_starpu_env_is_passed_to_starpu(run_py, describe_proc):
    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    proc, lines = _run_config(run_py, {"STARPU_NCPU": "1", "STARPU_SCHED": "eager"})
    assert proc.returncode == 0, describe_proc(proc)
    assert lines.get("NO_ERROR") == "starpu eager 1", describe_proc(proc)
    assert lines["RAN"] == "1"


def test_engine_name_is_case_and_space_insensitive(run_py, describe_proc):
    proc, lines = _run_config(run_py, {"LOTUS_ENGINE": " Inline "})
    assert proc.returncode == 0, describe_proc(proc)
    assert lines.get("NO_ERROR") == "inline inline 1", describe_proc(proc)
    assert lines["RAN"] == "1"


# ---------------------------------------------------------------------- config functions in-process


def test_read_settings_values():
    s = config.read_settings({"LOTUS_ENGINE": "starpu", "LOTUS_TRACE": "off", "LOTUS_TRACE_CAPACITY": "17"})
    assert (s.engine, s.trace, s.trace_capacity) == ("starpu", False, 17)
    s = config.read_settings({})
    assert (s.engine, s.trace, s.trace_capacity) == (None, True, config.Settings.trace_capacity)
    assert s.idle_pause is True and config.read_settings({"LOTUS_IDLE_PAUSE": "off"}).idle_pause is False
    assert config.read_settings({"LOTUS_ENGINE": ""}).engine is None


def test_check_starpu_env_in_process():
    policies = ["eager", "dmda"]
    config.check_starpu_env(policies, {"STARPU_SCHED": "dmda", "STARPU_NCPU": "-1", "STARPU_NCUDA": "0"})
    with pytest.raises(lotus_rt.ConfigError, match="STARPU_SCHED='lws'.*eager, dmda"):
        config.check_starpu_env(policies, {"STARPU_SCHED": "lws"})
    with pytest.raises(lotus_rt.ConfigError, match="STARPU_CALIBRATE"):
        config.check_starpu_env(policies, {"STARPU_CALIBRATE": "yes"})
    assert os.environ.get("STARPU_SILENT") == "1"   # conftest's setting is in place


# ---------------------------------------------------------------------- one route: read once, passed down

def test_trace_file_settings():
    assert config.read_settings({"LOTUS_TRACE_FILE": "a/b.JSON"}).trace_file == "a/b.JSON"
    assert config.read_settings({}).trace_file is None
    with pytest.raises(config.ConfigError, match="LOTUS_TRACE is off"):
        config.read_settings({"LOTUS_TRACE": "0", "LOTUS_TRACE_FILE": "t.json"})


@pytest.mark.parametrize("raw, value", [(None, "auto"), ("", "auto"), ("auto", "auto"), ("fp32", "fp32"),
                                        ("TF32", "tf32"), (" bf16", "bf16"), ("fp16", "fp16")])
def test_lotus_precision_setting(raw, value):
    env = {} if raw is None else {"LOTUS_PRECISION": raw}
    assert config.read_settings(env).precision == value
    report = config.read_settings(env).report()["LOTUS_PRECISION"]
    assert report.startswith(value) and report.endswith("(default)") == (not raw)  # empty: unset


@pytest.mark.parametrize("raw", ["fp64", "half", "1", "tf-32"])
def test_bad_lotus_precision_is_one_clear_error(raw):
    with pytest.raises(lotus_rt.ConfigError) as info:
        config.read_settings({"LOTUS_PRECISION": raw})
    message = str(info.value)
    assert f"LOTUS_PRECISION={raw!r}" in message and "auto, fp32, tf32, bf16, fp16" in message


def test_reconfigure_changes_the_live_knobs_and_refuses_the_others(monkeypatch):
    rt = lotus_rt.Runtime(config.read_settings({"LOTUS_ENGINE": "inline"}))
    try:
        assert rt.settings.tile is None and rt.settings.fuse == "auto"
        monkeypatch.setenv("LOTUS_TILE", "4")
        monkeypatch.setenv("LOTUS_FUSE", "off")
        assert rt.settings.tile is None  # not re-read behind the runtime's back
        new = rt.reconfigure()
        assert (new.tile, new.fuse) == (rt.settings.tile, rt.settings.fuse) == (4, "off")
        assert "LOTUS_TILE" in rt.settings.explicit and rt.settings.report()["LOTUS_TILE"] == "4"
        rt.reconfigure(fuse="on", precision="fp16", idle_pause=False)
        assert (rt.settings.fuse, rt.settings.precision, rt.settings.idle_pause, rt.settings.tile) == \
            ("on", "fp16", False, 4)
        with pytest.raises(lotus_rt.ConfigError, match="LOTUS_FUSE='sometimes'"):
            rt.reconfigure(fuse="sometimes")
        with pytest.raises(lotus_rt.ConfigError, match="'engine' cannot change while the runtime runs"):
            rt.reconfigure(engine="starpu")
        monkeypatch.setenv("LOTUS_ENGINE", "starpu")
        with pytest.raises(lotus_rt.ConfigError, match="LOTUS_ENGINE changed: it takes effect only when the "
                                                        "runtime restarts"):
            rt.reconfigure()
        assert rt.settings.engine == "inline" and rt.settings.fuse == "on"  # nothing half-applied
        monkeypatch.delenv("LOTUS_ENGINE")
        monkeypatch.delenv("LOTUS_TILE")
        rt.reconfigure()
        assert rt.settings.tile is None and "LOTUS_TILE" not in rt.settings.explicit
    finally:
        rt.shutdown()


def test_a_new_runtime_reads_the_environment_again(run_py, describe_proc):
    """An explicit restart (shutdown, then runtime()) is the other route a setting changes by."""
    code = textwrap.dedent("""
        import os, lotus_rt
        first = lotus_rt.runtime().settings.fuse
        os.environ["LOTUS_FUSE"] = "off"
        same = lotus_rt.runtime().settings.fuse
        lotus_rt.shutdown()
        print("FUSE", first, same, lotus_rt.runtime().settings.fuse)
    """)
    proc = run_py(code, {"LOTUS_ENGINE": "inline", "LOTUS_FUSE": "on"})
    assert proc.returncode == 0, describe_proc(proc)
    assert "FUSE on on off" in proc.stdout, describe_proc(proc)
