"""Data-parallel training step over ranks: lotus_rt on StarPU-MPI vs torch DDP (gloo), side by side.

The same model (an MLP, float32) and the same data on both sides, each rank training on its
shard of every global batch with SGD: lotus_rt through ``lotus_rt.distributed.data_parallel``
under mpirun (``STARPU_NCPU`` = cores / ranks per rank, unbound workers), torch through
``DistributedDataParallel`` over gloo (one process per rank, ``torch.set_num_threads(cores /
ranks)``). Each configuration starts its ranks fresh (``--warmup`` untimed steps, then
``--steps`` timed steps; a step is zero_grad, forward, loss, backward, optimizer step), for
``--repeats`` rounds whose order alternates lotus/torch. Reported per rank count n and scaling
mode: rank 0's median step time, and the ratio lotus_rt / DDP (> 1: lotus_rt is slower).

- strong scaling: the global batch (``--batch``) is fixed, each rank gets batch / n;
- weak scaling: the per-rank batch is fixed (``--batch`` / max(ranks)), the global batch grows with n.

lotus_rt's rank 0 also counts, over the timed steps, the reduction tasks it ran and how many of
them started before the last of that step's backward tasks ended (a reduction overlapping the
backward of the layers below); every lotus_rt rank's parameters must end identical.

    python -m benchmarks distributed [--quick] [--out DIR] [--ranks 1,2,4] [--batch 256] [--steps 10]

Writes ``distributed[_quick].json`` and ``.png``. Exit status 1 when a run failed or the lotus_rt
ranks disagree. The rank programs are this module (``--child lotus|ddp``).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

MODEL = (784, 512, 256, 10)


# ---------------------------------------------------------------------------------- rank programs

def _model():
    import torch
    torch.manual_seed(0)
    layers = []
    for k, (a, b) in enumerate(zip(MODEL[:-1], MODEL[1:])):
        layers.append(torch.nn.Linear(a, b))
        if k < len(MODEL) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def _batches(global_batch: int, count: int):
    import torch
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(global_batch, MODEL[0], generator=gen), torch.randint(0, MODEL[-1], (global_batch,), generator=gen))
            for _ in range(count)]


def _train(model, step_shard, batches, warmup: int, on_step=None):
    import torch
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    times, loss = [], None
    for k, (x, y) in enumerate(batches):
        xs, ys = step_shard(x), step_shard(y)
        start = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xs), ys)
        loss.backward()
        opt.step()
        elapsed = time.perf_counter() - start
        if k >= warmup:
            times.append(elapsed)
        if on_step is not None:  # after every step, untimed (a warm-up step's records are dropped)
            on_step()
    return times, float(loss)


def _overlap(records) -> dict:
    """Of one step's trace: reduction tasks, and how many started before the last backward task ended."""
    reductions = [r for r in records if r.name.startswith("allreduce ")]
    backward = [r for r in records if not r.name.startswith("allreduce ")
                and any(k in r.name for k in ("_dx", "_dw", "dparam_sum"))]
    if not reductions or not backward:
        return {"reductions": len(reductions), "started_during_backward": 0}
    last = max(r.end_s for r in backward)
    return {"reductions": len(reductions), "started_during_backward": sum(r.start_s < last for r in reductions)}


def child_lotus(cfg: dict) -> None:
    import hashlib

    import torch
    import lotus_rt
    import lotus_rt.distributed as dist
    world = dist.init()
    torch.set_num_threads(1)  # torch's own ops (loss, optimizer) beside StarPU's workers
    model = dist.data_parallel(_model())
    overlaps = []
    batches = _batches(cfg["global_batch"], cfg["warmup"] + cfg["steps"])
    lotus_rt.trace(clear=True)
    times, loss = _train(model, lambda t: dist.shard(t, world), batches, cfg["warmup"],
                         on_step=lambda: overlaps.append(_overlap(lotus_rt.trace(clear=True))))
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    out = {"rank": world.rank, "size": world.size, "step_s": times, "loss": loss, "params_sha256": digest,
           "overlap": {"reductions": sum(o["reductions"] for o in overlaps[cfg["warmup"]:]),
                       "started_during_backward": sum(o["started_during_backward"] for o in overlaps[cfg["warmup"]:])},
           "environment": common.environment(lotus_rt.runtime()) if world.rank == 0 else None}
    pathlib.Path(cfg["out"], f"lotus{world.rank}.json").write_text(json.dumps(out))


def child_ddp(cfg: dict) -> None:
    import torch
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel
    tdist.init_process_group("gloo")
    rank, size = tdist.get_rank(), tdist.get_world_size()
    torch.set_num_threads(cfg["threads"])
    model = DistributedDataParallel(_model())
    k = cfg["global_batch"] // size
    batches = _batches(cfg["global_batch"], cfg["warmup"] + cfg["steps"])
    times, loss = _train(model, lambda t: t[rank * k:(rank + 1) * k], batches, cfg["warmup"])
    pathlib.Path(cfg["out"], f"ddp{rank}.json").write_text(json.dumps({"rank": rank, "step_s": times, "loss": loss}))
    tdist.destroy_process_group()


# ---------------------------------------------------------------------------------- launching

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: str, **extra: str) -> dict:
    return common.subprocess_env(home, **extra)


def run_lotus(nranks: int, cfg: dict, home: str, timeout: float) -> dict:
    cores = os.cpu_count() or 1
    args = ["timeout", "-k", "10", str(int(timeout)), "mpirun", "-np", str(nranks), "--bind-to", "none"]
    args += (["--oversubscribe"] if nranks > cores else []) + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    env = _env(home, STARPU_NCPU=str(max(1, cores // nranks)), STARPU_WORKERS_NOBIND="1",
               OMPI_MCA_mpi_yield_when_idle="1")  # as lotus-rt launch does
    env.pop("LOTUS_ENGINE", None)
    proc = subprocess.run(args + [sys.executable, "-m", "benchmarks.distributed_bench", "--child", "lotus",
                                  json.dumps(cfg)], env=env, cwd=str(common.REPO_ROOT), capture_output=True,
                          text=True, timeout=timeout + 30)
    return _collect(proc, cfg["out"], "lotus", nranks)


def run_ddp(nranks: int, cfg: dict, home: str, timeout: float) -> dict:
    """The torch DDP reference; a failed launch (seen once in a while on a loaded 2-core machine:
    a gloo rank aborting while it connects) is tried once more, and the run says so."""
    run = _run_ddp_once(nranks, cfg, home, timeout)
    if run["status"] != "ok":
        first = run
        run = _run_ddp_once(nranks, cfg, home, timeout)
        run["retried_after"] = {"status": first["status"], "output": first.get("output", "")[-1500:]}
    return run


def _run_ddp_once(nranks: int, cfg: dict, home: str, timeout: float) -> dict:
    cores = os.cpu_count() or 1
    cfg = dict(cfg, threads=max(1, cores // nranks))
    port = str(_free_port())
    procs = []
    for rank in range(nranks):
        env = _env(home, RANK=str(rank), WORLD_SIZE=str(nranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   OMP_NUM_THREADS=str(cfg["threads"]))
        procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.distributed_bench", "--child", "ddp",
                                       json.dumps(cfg)], env=env, cwd=str(common.REPO_ROOT),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline, output, rc = time.monotonic() + timeout, [], 0
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, _ = p.communicate()
            rc = 124
        output.append(out or "")
        rc = rc or p.returncode
    return _collect(subprocess.CompletedProcess([], rc, "".join(output), ""), cfg["out"], "ddp", nranks)


def _collect(proc: subprocess.CompletedProcess, out_dir: str, kind: str, nranks: int) -> dict:
    files = [pathlib.Path(out_dir, f"{kind}{r}.json") for r in range(nranks)]
    if proc.returncode != 0 or not all(f.exists() for f in files):
        return {"status": f"failed ({proc.returncode})", "output": (proc.stdout + proc.stderr)[-3000:]}
    ranks = [json.loads(f.read_text()) for f in files]
    for f in files:
        f.unlink()
    return {"status": "ok", "ranks": ranks, "step_s": common.median_spread(ranks[0]["step_s"])}


# ---------------------------------------------------------------------------------- the scenario

def plot(result: dict, path) -> None:
    fig, axes = common.figure(2, width=5.2)
    for ax, mode in zip(axes, ("strong", "weak")):
        rows = [r for r in result["summary"] if r["mode"] == mode]
        counts = [r["ranks"] for r in rows]
        for name, key in (("lotus_rt (StarPU-MPI)", "lotus_ms"), ("torch DDP (gloo)", "ddp_ms")):
            ax.plot(counts, [r[key] for r in rows], marker="o", label=name)
        ax.set_xticks(counts)
        ax.set_xlabel("ranks")
        ax.set_ylabel("step time, ms (rank 0 median)")
        ax.set_title(f"{mode} scaling" + (f", global batch {result['config']['batch']}" if mode == "strong" else
                                          f", {result['config']['batch'] // max(result['config']['ranks'])} per rank"),
                     fontsize=10)
        ax.legend(fontsize=8)
    env = result["environment"] or {}
    common.save(fig, path, f"data-parallel MLP {'-'.join(map(str, MODEL))} float32, {env.get('cpu_count')} cores "
                           f"({env.get('date')}, {env.get('hostname')})")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        cfg = json.loads(argv[2])
        (child_lotus if argv[1] == "lotus" else child_ddp)(cfg)
        return 0
    p = common.parser("distributed", __doc__.splitlines()[0])
    p.add_argument("--ranks", type=common.int_list, default=None, help="rank counts (default 1,2,4; quick: 2)")
    p.add_argument("--batch", type=int, default=None, help="global batch of strong scaling (default 256; quick 32)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 10; quick 3)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=None, help="rounds per configuration (default 2; quick 1)")
    p.add_argument("--modes", default=None, help="strong,weak (default; quick: strong)")
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    q = args.quick
    ranks = args.ranks or ([2] if q else [1, 2, 4])
    batch = args.batch or (32 if q else 256)
    steps = args.steps or (3 if q else 10)
    repeats = args.repeats or (1 if q else 2)
    warmup = 1 if q and args.warmup == 3 else args.warmup
    modes = [m for m in (args.modes or ("strong" if q else "strong,weak")).split(",") if m]
    if not modes or set(modes) - {"strong", "weak"}:
        print(f"distributed: --modes {args.modes!r}: choose among strong, weak", file=sys.stderr)
        return 2
    if shutil.which("mpirun") is None:
        print("distributed: mpirun not found (make deps installs OpenMPI)", file=sys.stderr)
        return 2
    from lotus_rt.starpu.mpi import mpi_available
    if not mpi_available():
        from lotus_rt.starpu.mpi import load_mpi
        load_mpi()  # raises, saying what is missing
    if any(batch % n for n in ranks) or batch < max(ranks):
        print(f"distributed: --batch {batch} must split evenly over each of {ranks} ranks", file=sys.stderr)
        return 2

    runs, summary, failed, environment = [], [], False, None
    with tempfile.TemporaryDirectory(prefix="lotus_dist_") as tmp:
        home = os.path.join(tmp, "starpu_home")
        os.makedirs(home)
        for mode in modes:
            for n in ranks:
                global_batch = batch if mode == "strong" else (batch // max(ranks)) * n
                cfg = {"global_batch": global_batch, "steps": steps, "warmup": warmup, "out": tmp}
                samples = {"lotus": [], "ddp": []}
                for rep in range(repeats):
                    order = ("lotus", "ddp") if rep % 2 == 0 else ("ddp", "lotus")
                    for kind in order:
                        run = (run_lotus if kind == "lotus" else run_ddp)(n, cfg, home, args.timeout)
                        run.update(kind=kind, mode=mode, nranks=n, global_batch=global_batch, repeat=rep)
                        print(f"distributed: {mode} n={n} {kind}: {run['status']}"
                              + (f", {run['step_s']['median'] * 1e3:.1f} ms/step" if run["status"] == "ok" else
                                 "\n" + run.get("output", "")), flush=True)
                        if run["status"] != "ok":
                            failed = True
                        elif kind == "lotus":
                            digests = {r["params_sha256"] for r in run["ranks"]}
                            run["ranks_agree"] = len(digests) == 1
                            failed |= not run["ranks_agree"]
                            run["overlap"] = run["ranks"][0]["overlap"]
                            environment = environment or run["ranks"][0]["environment"]
                            samples["lotus"].extend(run["ranks"][0]["step_s"])
                        else:
                            samples["ddp"].extend(run["ranks"][0]["step_s"])
                        runs.append(run)
                if samples["lotus"] and samples["ddp"]:
                    lotus_ms = statistics.median(samples["lotus"]) * 1e3
                    ddp_ms = statistics.median(samples["ddp"]) * 1e3
                    last = [r for r in runs if r["kind"] == "lotus" and r["nranks"] == n and r["mode"] == mode
                            and r["status"] == "ok"]
                    summary.append({"mode": mode, "ranks": n, "global_batch": global_batch, "lotus_ms": lotus_ms,
                                    "ddp_ms": ddp_ms, "lotus_over_ddp": lotus_ms / ddp_ms,
                                    "overlap": last[-1]["overlap"] if last else None})
    print(f"{'mode':<7}{'ranks':>6}{'batch':>7}{'lotus ms':>10}{'DDP ms':>9}{'lotus/DDP':>11}  reductions started during backward")
    for r in summary:
        ov = r["overlap"] or {}
        print(f"{r['mode']:<7}{r['ranks']:>6}{r['global_batch']:>7}{r['lotus_ms']:>10.1f}{r['ddp_ms']:>9.1f}"
              f"{r['lotus_over_ddp']:>10.2f}x  {ov.get('started_during_backward', 0)}/{ov.get('reductions', 0)}")
    result = {"scenario": "distributed", "quick": q, "environment": environment,
              "config": {"model": list(MODEL), "dtype": "float32", "ranks": ranks, "batch": batch, "steps": steps,
                         "warmup": warmup, "repeats": repeats, "modes": modes, "cpu_count": os.cpu_count()},
              "summary": summary, "runs": runs, "failed": failed}
    path = common.write_result(args.out, "distributed", q, result)
    if summary:
        plot(result, common.png_path(path))
    print(f"distributed: wrote {path}")
    return 1 if failed or not summary else 0


if __name__ == "__main__":
    sys.exit(main())
