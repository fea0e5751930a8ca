"""The rank program of tests/test_distributed.py: run under mpirun, one process per rank.

    mpirun -np 3 python tests/distributed_checks.py OUT_DIR [binding] [einsum] [dp] [fail] [comm]

Each rank runs the named checks (all but ``fail`` and ``comm`` by default) and writes what it
saw to OUT_DIR/rank<r>.json (and its trained parameters to OUT_DIR/params<r>.npz); the test
compares the ranks. ``fail`` makes a task raise on the last rank: that rank's wait raises, and
lotus_rt.distributed's abort hook must end every rank (the test checks that nothing hangs).
``comm`` runs on an mpi4py communicator that splits MPI_COMM_WORLD into pairs of ranks.
"""
from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

import lotus_rt
from lotus_rt.runtime import mpi


def check_binding(world: mpi.World, out: dict) -> None:
    rt = lotus_rt.runtime()
    size, rank = world.size, world.rank
    fill = rt.codelet("fill_from", cpu=lambda src, dst, value: np.copyto(dst, src + value))
    data = [world.register(np.full(3, float(r)) if r % size == rank else np.zeros(3), owner=r % size)
            for r in range(max(size, 2))]
    # owner computes: the task writing data[r] runs on rank r and reads data[r+1] from its owner
    ran = [r for r in range(size) if world.submit(fill, (data[(r + 1) % len(data)], "R"), (data[r], "W"),
                                                  value=10.0 * (r + 1)) is not None]
    # execute_on: rank size-1 computes data[0] (owned by rank 0), StarPU-MPI sends it back to rank 0
    moved = world.submit(fill, (data[1], "R"), (data[0], "RW"), execute_on=size - 1, value=0.5)
    for h in data:
        world.get(h)
    world.wait()
    values = []
    for h in data:
        with h.acquire("R") as a:
            values.append(a.tolist())
    out["owner_computes"] = {"ran_here": ran, "moved_ran_here": moved is not None, "values": values}
    # starpu_mpi_redux_data: each rank adds (rank+1) into the sum owned by rank 0
    total = world.register(np.zeros(4), owner=0)
    world.reduction(total)
    contribution = rt.codelet("contribute", cpu=lambda acc, value: np.add(acc, value, out=acc))
    for r in range(size):
        world.submit(contribution, (total, "REDUX"), execute_on=r, value=float(r + 1))
    world.redux(total)
    world.get(total)
    world.wait()
    with total.acquire("R") as a:
        out["redux"] = a.tolist()
    # bad input: one clear error, before any task
    errors = {}
    for key, call in {
        "unowned": lambda: world.submit(fill, (rt.register(np.zeros(3)), "R"), (data[0], "W"), value=1.0),
        "owner_range": lambda: world.register(np.zeros(2), owner=size),
        "mode": lambda: world.submit(fill, (data[0], "RX"), value=1.0),
        "redux_unset": lambda: world.submit(contribution, (data[0], "REDUX"), value=1.0),
    }.items():
        try:
            call()
        except (TypeError, ValueError) as exc:
            errors[key] = f"{type(exc).__name__}: {exc}"
    out["errors"] = errors
    world.wait()
    for h in data + [total]:
        h.unregister()


def check_einsum(world: mpi.World, out: dict) -> None:
    import lotus_rt.distributed as dist
    rng = np.random.default_rng(7)
    size, rank = world.size, world.rank
    # TT-matrix times a batch: x on rank 0, one core per rank
    x, g1, g2 = rng.standard_normal((32, 8)), rng.standard_normal((8, 6, 4)), rng.standard_normal((4, 5))
    owners = [0, 1 % size, 2 % size]
    mine = [a if o == rank else dist.Remote(a.shape, a.dtype) for a, o in zip((x, g1, g2), owners)]
    y = dist.einsum("bi,ijk,kl->bjl", *mine, owners=owners)
    out["einsum_err"] = float(np.abs(y - np.einsum("bi,ijk,kl->bjl", x, g1, g2)).max())
    # an MPS-like chain, one segment per rank, then a sweep: a second einsum on the first's result
    segments = [rng.standard_normal((5, 7, 5)) for _ in range(4)]
    left = rng.standard_normal((5,))
    graph = dist.Graph()
    seg = [graph.put(s if k % size == rank else dist.Remote(s.shape, s.dtype), owner=k % size)
           for k, s in enumerate(segments)]
    v = graph.put(left if rank == 0 else dist.Remote(left.shape, left.dtype), owner=0)
    state = graph.einsum("a,aib,bjc->ijc", v, seg[0], seg[1])
    state = graph.einsum("ijc,ckd,dle->ijkle", state, seg[2], seg[3])
    result = graph.fetch(state)
    reference = np.einsum("a,aib,bjc,ckd,dle->ijkle", left, *segments)
    out["sweep_err"] = float(np.abs(result - reference).max() / np.abs(reference).max())
    out["placement"] = graph.placement
    out["tasks_here"] = graph.tasks_here
    graph.release()


def check_dp(world: mpi.World, out: dict, out_dir: pathlib.Path) -> None:
    import torch
    import lotus_rt.distributed as dist

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.ReLU(),
                                   torch.nn.Linear(8, 3)).double()

    model, reference = make(), make()
    if world.rank:  # other weights on the other ranks: data_parallel must give them rank 0's
        with torch.no_grad():
            for p in model.parameters():
                p.add_(world.rank)
    dist.data_parallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    batch = 6 * world.size
    lotus_rt.trace(clear=True)
    for _ in range(5):
        x = torch.randn(batch, 10, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (batch,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(dist.shard(x)), dist.shard(y)).backward()
        opt.step()
        ref_opt.zero_grad()
        torch.nn.functional.cross_entropy(reference(x), y).backward()  # one process, the full batch
        ref_opt.step()
    with torch.no_grad():
        out["dp_err"] = max(float((p - q).abs().max()) for p, q in zip(model.parameters(), reference.parameters()))
    out["dp_reduction_tasks_here"] = len(dist.reducer_of(model).futures)
    records = lotus_rt.trace()
    out["dp_trace"] = [(r.name, r.start_s, r.end_s) for r in records]
    np.savez(out_dir / f"params{world.rank}.npz", *[p.detach().numpy() for p in model.parameters()])


def check_fail(world: mpi.World, out: dict) -> None:
    rt = lotus_rt.runtime()

    def body(a):
        if world.rank == world.size - 1:
            raise ValueError(f"deliberate failure on rank {world.rank}")
        a += 1

    step = rt.codelet("may_fail", cpu=body)
    data = [world.register(np.zeros(2), owner=r) for r in range(world.size)]
    for _ in range(3):
        for h in data:
            world.submit(step, (h, "RW"))
        world.wait()
    out["fail_survived"] = True


def main(argv: list[str]) -> int:
    out_dir = pathlib.Path(argv[0])
    checks = argv[1:] or ["binding", "einsum", "dp"]
    comm = None
    if "comm" in checks:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD.Split(MPI.COMM_WORLD.Get_rank() // 2)  # ranks 0-1 together, 2-3 together
    world = mpi.init(comm)
    out: dict = {"rank": world.rank, "size": world.size, "workers": len(lotus_rt.runtime().workers)}
    if comm is not None:
        from mpi4py import MPI
        out["world_rank"] = MPI.COMM_WORLD.Get_rank()
    if "binding" in checks or "comm" in checks:
        check_binding(world, out)
    if "einsum" in checks:
        check_einsum(world, out)
    if "dp" in checks:
        check_dp(world, out, out_dir)
    if "fail" in checks:
        check_fail(world, out)
    (out_dir / f"rank{out.get('world_rank', world.rank)}.json").write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
