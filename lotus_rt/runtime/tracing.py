"""Turn ``lotus_rt.trace()`` records into pictures and files people can open.

``gantt_png``: one row per worker, one bar per task coloured by task kind (the task name up to
its first '[' or digit run, so "pair3[2]" and "pair0[1]" share a colour), idle gaps left white.
``chrome_trace``: the Trace Event Format (complete events, ``ph: "X"``, microseconds) that
Perfetto and chrome://tracing open; one thread per worker.
``export``: either of them, chosen by the file's suffix (what LOTUS_TRACE_FILE uses at shutdown).
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Sequence

from lotus_rt.runtime.core import TaskRecord


def task_kind(name: str) -> str:
    """What a task does: the first word of "<codelet> <layer>[tile]" names (the whole-model
    graph's), else the name up to its first '[' or digit run ("pair3[2]" -> "pair")."""
    if " " in name:
        return name.split(" ", 1)[0]
    return re.sub(r"(\[.*|\d+.*)$", "", name) or name


def task_layer(name: str) -> str:
    """The layer of a whole-model graph task ("conv_dx 3.core[1]" -> "3.core"), else its kind."""
    if " " not in name:
        return task_kind(name)
    return name.split(" ", 1)[1].split("[", 1)[0]


def gantt_png(records: Sequence[TaskRecord], workers: Sequence[str], path: str | pathlib.Path,
              title: str = "", color_by: str = "kind") -> pathlib.Path:
    """One row per worker, one bar per task, coloured by what it does (``color_by="kind"``) or by
    the layer it belongs to (``"layer"``: tasks of different layers running at the same time
    show as different colours stacked in time). The legend sits to the right of the chart."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if color_by not in ("kind", "layer"):
        raise ValueError(f"gantt_png: color_by={color_by!r} is not valid; valid values: kind, layer")
    key = task_kind if color_by == "kind" else task_layer
    path = pathlib.Path(path)
    rows = {name: k for k, name in enumerate(workers)}
    for r in records:
        rows.setdefault(r.worker, len(rows))
    groups = list(dict.fromkeys(key(r.name) for r in sorted(records, key=lambda r: r.start_s)))
    palette = plt.get_cmap("tab20")
    colours = {group: palette(k % 20) for k, group in enumerate(groups)}
    t0 = min((r.start_s for r in records), default=0.0)
    ncol = 1 + len(groups) // 18
    fig, ax = plt.subplots(figsize=(11 + 1.8 * ncol, max(0.6 * len(rows) + 1.8, 0.22 * min(len(groups), 18) + 1.2)))
    for r in records:
        ax.barh(rows[r.worker], (r.end_s - r.start_s) * 1e3, left=(r.start_s - t0) * 1e3, height=0.8,
                color=colours[key(r.name)], edgecolor="none")
    ax.set_yticks(range(len(rows)), list(rows))
    ax.invert_yaxis()
    ax.set_xlabel("time since the first task (ms)")
    ax.set_title(title or f"{len(records)} tasks")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[g]) for g in groups]
    ax.legend(handles, groups, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=ncol, fontsize="x-small",
              frameon=False, title=color_by)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def chrome_trace(records: Sequence[TaskRecord], workers: Sequence[str]) -> dict:
    """Trace Event Format document: one complete event per task, one thread per worker."""
    tids = {name: k for k, name in enumerate(workers)}
    for r in records:
        tids.setdefault(r.worker, len(tids))
    events = [{"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}}
              for name, tid in tids.items()]
    for r in sorted(records, key=lambda r: (r.start_s, r.task_id)):
        events.append({"name": r.name, "cat": task_kind(r.name), "ph": "X", "pid": 1, "tid": tids[r.worker],
                       "ts": r.start_s * 1e6, "dur": max(0.0, (r.end_s - r.start_s) * 1e6),
                       "args": {"task_id": r.task_id, "kind": r.kind}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(records: Sequence[TaskRecord], workers: Sequence[str], path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.write_text(json.dumps(chrome_trace(records, workers)))
    return path


def export(records: Sequence[TaskRecord], workers: Sequence[str], path: str | pathlib.Path,
           title: str = "") -> pathlib.Path:
    """Write ``records`` as a Chrome trace (``.json``) or a Gantt chart (``.png``)."""
    path = pathlib.Path(path)
    if path.suffix.lower() == ".json":
        return write_chrome_trace(records, workers, path)
    if path.suffix.lower() == ".png":
        return gantt_png(records, workers, path, title=title)
    raise ValueError(f"trace export: {path} must end in .json (Chrome trace) or .png (Gantt chart)")
