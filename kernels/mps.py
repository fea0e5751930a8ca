"""Codelet bodies of the MPS classifier's DMRG sweeps (``lotus_rt.mps``).

Conventions (every array is padded to a fixed capacity, so task shapes never depend on data):

- a site tensor ``A[a, s, b]``: (D, d, D), D the bond-dimension cap, d the local feature size;
  bond indices beyond the bond's current rank hold zeros.
- the centre ``C[a, s, b, l]``: (D, d, D, Lc), a site tensor that also carries the label index
  (Lc = number of classes), or Lc = 1 for a label-free centre.
- a bond tensor ``B[a, s, t, b, l]``: (D, d, d, D, Lb), two merged sites (Lb = 1: label-free).
- an environment ``E[n, l, a]``: (n, Le, D) per sample of a batch tile: the contraction of every
  site on one side of a cut with the samples' feature vectors, normalised per sample (the
  classifier's arg-max is invariant to a positive factor per sample, and without it the
  product of 196 sites under- or overflows). Le = 1, or the number of classes when the label
  index lies on that side (the real-space parallel sweep's segments).
- features ``phi[n, s]``: (n, d) for one site and one batch tile.

The label index lives on the bond tensor, on one environment, or on both (one shared index,
see ``_forward``); the bodies find where from the shapes. ``bond_grad`` / ``bond_hv`` are the two
halves of the local least-squares problem min_B 1/2 sum_n |f_n(B) - y_n|^2, f_n = <Phi_n, B>,
with Phi_n = E_left (x) phi_j (x) phi_j+1 (x) E_right: each is two GEMMs over a batch tile.
The same code serves NumPy (CPU) and CuPy (GPU) through the array module ``xp``; nothing here
imports lotus_rt.
"""
from __future__ import annotations

from typing import Any

import numpy as np

TINY = 1e-30


# ---------------------------------------------------------------------------------- helpers

def _normalize(xp: Any, env: Any) -> None:
    """Scale each sample (first axis) of a C-contiguous array to unit norm, in place."""
    flat = env.reshape(env.shape[0], -1)
    norms = xp.sqrt(xp.einsum("ij,ij->i", flat, flat))
    flat *= (1.0 / xp.maximum(norms, TINY))[:, None]


def _as_center(t: Any) -> Any:
    """A site (D, d, D) seen as a label-free centre (D, d, D, 1); a centre unchanged."""
    return t if t.ndim == 4 else t.reshape(t.shape + (1,))


def _as_site(t: Any) -> Any:
    """A label-free centre (D, d, D, 1) seen as a site (D, d, D)."""
    if t.ndim == 4:
        if t.shape[3] != 1:
            raise ValueError(f"expected a label-free tensor, got a centre of shape {t.shape}")
        return t.reshape(t.shape[:3])
    return t


def _projected(xp: Any, left: Any, phi1: Any, phi2: Any) -> Any:
    """P[(n, l), (a, s, t)] = left[n, l, a] phi1[n, s] phi2[n, t]."""
    n, le, dim = left.shape
    d1, d2 = phi1.shape[1], phi2.shape[1]
    pair = (phi1[:, :, None] * phi2[:, None, :]).reshape(n, 1, 1, d1 * d2)
    return (left[:, :, :, None] * pair).reshape(n * le, dim * d1 * d2)


def _labels_axes(left: Any, bond: Any, right: Any) -> tuple[int, int, int]:
    le, lb, lr = left.shape[1], bond.shape[4], right.shape[1]
    sizes = {v for v in (le, lb, lr) if v > 1}
    if len(sizes) > 1 or (le > 1 and lr > 1):
        raise ValueError(f"label axes of left env ({le}), bond ({lb}) and right env ({lr}): the label may be "
                         "on the bond and on at most one environment, with one size")
    return le, lb, lr


# ---------------------------------------------------------------------------------- environments

def _accumulate(xp: Any, out: Any, phi: Any, s: int, y: Any) -> None:
    """out (+)= phi[:, s] * y, y shaped like out: one pass per local state s (d = 2 GEMMs beat
    forming the (n, D d) product, which is memory-bound)."""
    w = phi[:, s].reshape((-1,) + (1,) * (out.ndim - 1))
    if s == 0:
        xp.multiply(y, w, out=out)
    else:
        out += y * w


def env_left(xp: Any, left: Any, phi: Any, site: Any, out: Any) -> None:
    """out[n, l, c] = normalised sum_{a,s} left[n, l, a] phi[n, s] site[a, s, c].

    ``site`` may be a centre (D, d, D, L) with a label-free ``left``: the label moves into
    ``out`` (L, D) per sample.
    """
    n, le, dim = left.shape
    lm = left.reshape(n * le, dim)
    if site.ndim == 4 and site.shape[3] > 1:
        if le != 1:
            raise ValueError("env_left: a labelled centre needs a label-free left environment")
        for s in range(phi.shape[1]):
            y = (lm @ site[:, s].reshape(dim, -1)).reshape(n, site.shape[2], site.shape[3])
            _accumulate(xp, out, phi, s, y.transpose(0, 2, 1))
    else:
        site = _as_site(site)
        for s in range(phi.shape[1]):
            _accumulate(xp, out, phi, s, (lm @ site[:, s, :]).reshape(out.shape))
    _normalize(xp, out)


def env_right(xp: Any, right: Any, phi: Any, site: Any, out: Any) -> None:
    """out[n, l, a] = normalised sum_{s,b} site[a, s, b] phi[n, s] right[n, l, b].

    ``site`` may be a centre (D, d, D, L) with a label-free ``right``: the label moves into
    ``out`` (L, D) per sample.
    """
    n, le, dim = right.shape
    rm = right.reshape(n * le, dim)
    if site.ndim == 4 and site.shape[3] > 1:
        if le != 1:
            raise ValueError("env_right: a labelled centre needs a label-free right environment")
        labels = site.shape[3]
        for s in range(phi.shape[1]):
            mat = site[:, s].transpose(1, 0, 2).reshape(site.shape[2], site.shape[0] * labels)
            y = (rm @ mat).reshape(n, site.shape[0], labels)
            _accumulate(xp, out, phi, s, y.transpose(0, 2, 1))
    else:
        site = _as_site(site)
        for s in range(phi.shape[1]):
            _accumulate(xp, out, phi, s, (rm @ site[:, s, :].T).reshape(out.shape))
    _normalize(xp, out)


# ---------------------------------------------------------------------------------- bond tensor

def _forward(xp: Any, left: Any, phi1: Any, phi2: Any, right: Any, bond: Any) -> tuple[Any, tuple]:
    """f[n, label] = <Phi_n, bond> for one batch tile, and what ``_backward`` needs.

    The label index may sit on the bond, on one environment, or on the bond *and* one
    environment (one shared index: the real-space sweep's segments each carry a copy of it).
    Label on the bond: the side without it is contracted first with a GEMM of n x 2D x 2D L (or
    P[n, (a s t)] @ bond[(a s t), (b l)] when neither environment has it), then the labelled
    side is read once. Label only in an environment: the label-free bond is contracted with the
    other side first, per sample (n 4D^2), and the labelled environment is read once (n L D).
    """
    le, lb, lr = _labels_axes(left, bond, right)
    n, dim = left.shape[0], bond.shape[3]
    d1, d2 = phi1.shape[1], phi2.shape[1]
    if le == 1 and lb > 1:
        p = _projected(xp, left, phi1, phi2)
        y = (p @ bond.reshape(p.shape[1], dim * lb)).reshape(n, dim, lb)
        if lr == 1:
            return xp.einsum("nbl,nb->nl", y, right[:, 0]), ("bond", p, right[:, 0], False)
        return xp.einsum("nbl,nlb->nl", y, right), ("bond", p, right, True)
    if le > 1 and lb > 1:  # the mirror image of "label on the bond and the right environment"
        mirrored = xp.ascontiguousarray(bond.transpose(3, 2, 1, 0, 4))
        f, ctx = _forward(xp, right, phi2, phi1, left, mirrored)
        return f, ("mirror", ctx, mirrored.shape)
    mat = bond.reshape(dim * d1, d2 * dim)
    if le > 1:
        q = (phi2[:, :, None] * right[:, 0, None, :]).reshape(n, d2 * dim)
        v = xp.einsum("nas,ns->na", (q @ mat.T).reshape(n, dim, d1), phi1)
        return xp.einsum("nla,na->nl", left, v), ("left", q, left, phi1)
    p = (left[:, 0, :, None] * phi1[:, None, :]).reshape(n, dim * d1)
    v = xp.einsum("ntb,nt->nb", (p @ mat).reshape(n, d2, dim), phi2)
    return xp.einsum("nlb,nb->nl", right, v), ("right", p, right, phi2)


def _backward(xp: Any, ctx: tuple, err: Any, out: Any) -> None:
    """out = sum_n Phi_n err_n (the transpose of ``_forward``), in the bond's layout."""
    kind = ctx[0]
    if kind == "bond":
        _, p, right, labelled = ctx
        if labelled:  # right (n, L, D): q[n, b, l] = right[n, l, b] err[n, l]
            q = (right * err[:, :, None]).transpose(0, 2, 1).reshape(err.shape[0], -1)
        else:
            q = (right[:, :, None] * err[:, None, :]).reshape(err.shape[0], -1)
        xp.matmul(p.T, q, out=out.reshape(p.shape[1], q.shape[1]))
    elif kind == "mirror":
        _, inner, shape = ctx
        g = xp.empty(shape, dtype=out.dtype)
        _backward(xp, inner, err, g)
        out.reshape(shape[3], shape[2], shape[1], shape[0], shape[4])[...] = g.transpose(3, 2, 1, 0, 4)
    elif kind == "left":
        _, q, left, phi1 = ctx
        u = xp.einsum("nl,nla->na", err, left)
        p = (u[:, :, None] * phi1[:, None, :]).reshape(u.shape[0], -1)
        xp.matmul(p.T, q, out=out.reshape(p.shape[1], q.shape[1]))
    else:
        _, p, right, phi2 = ctx
        u = xp.einsum("nl,nlb->nb", err, right)
        q = (phi2[:, :, None] * u[:, None, :]).reshape(u.shape[0], -1)
        xp.matmul(p.T, q, out=out.reshape(p.shape[1], q.shape[1]))


def bond_grad(xp: Any, left: Any, phi1: Any, phi2: Any, right: Any, bond: Any, labels: Any, out: Any) -> None:
    """One batch tile's share of the gradient of 1/2 sum_n |f_n - onehot(y_n)|^2 at ``bond``.

    ``out`` is flat: the gradient (bond.size values, bond's layout), then the tile's summed
    squared error and its number of correctly classified samples (for progress reports).
    """
    f, ctx = _forward(xp, left, phi1, phi2, right, bond)
    m = bond.size
    err = f.copy()
    err[xp.arange(f.shape[0]), labels] -= 1.0
    _backward(xp, ctx, err, out[:m])
    out[m] = (err * err).sum()
    out[m + 1] = (f.argmax(axis=1) == labels).sum()


def bond_hv(xp: Any, left: Any, phi1: Any, phi2: Any, right: Any, vec: Any, out: Any) -> None:
    """One batch tile's share of H v = sum_n Phi_n <Phi_n, v> (the local problem's Gram times v)."""
    f, ctx = _forward(xp, left, phi1, phi2, right, vec)
    _backward(xp, ctx, f, out)


def bond_scores(xp: Any, left: Any, phi1: Any, phi2: Any, right: Any, bond: Any, out: Any) -> None:
    """out[n, label] = f_n(bond): the classifier's scores with the centre on this bond."""
    out[...] = _forward(xp, left, phi1, phi2, right, bond)[0]


def merge(xp: Any, left: Any, right: Any, out: Any, *, center: str) -> None:
    """out[a, s, t, b, l] = sum_c left[a, s, c, (l)] right[c, t, b, (l)]: the bond tensor of two
    neighbouring sites; ``center`` says which carries the label: "left", "right", or "both"
    (two centres holding copies of one label index, joined element-wise in l)."""
    dim, d = left.shape[0], left.shape[1]
    if center == "right":
        site, c = _as_site(left), _as_center(right)
        out[...] = (site.reshape(dim * d, -1) @ c.reshape(c.shape[0], -1)).reshape(out.shape)
    elif center == "left":
        c, site = _as_center(left), _as_site(right)
        lb = c.shape[3]
        res = c.transpose(0, 1, 3, 2).reshape(dim * d * lb, c.shape[2]) @ site.reshape(site.shape[0], -1)
        out[...] = res.reshape(dim, d, lb, site.shape[1], site.shape[2]).transpose(0, 1, 3, 4, 2)
    elif center == "both":
        lb = left.shape[3]
        a = left.reshape(dim * d, left.shape[2], lb).transpose(2, 0, 1)            # (l, (a s), c)
        b = right.reshape(right.shape[0], -1, lb).transpose(2, 0, 1)               # (l, c, (t b))
        out.reshape(dim * d, -1, lb)[...] = xp.matmul(a, b).transpose(1, 2, 0)
    else:
        raise ValueError(f"merge: center must be 'left', 'right' or 'both', got {center!r}")


def label_copy(xp: Any, site: Any, out: Any) -> None:
    """out[a, s, b, l] = site[a, s, b] for every l: a site given a copy of the label index."""
    out[...] = _as_site(site)[..., None]


# ---------------------------------------------------------------------------------- local solvers

def cg_init(xp: Any, grad: Any, x: Any, r: Any, p: Any, state: Any, *, n_samples: int, reg: float) -> None:
    """Start conjugate gradients on (H/N + reg) x = b/N from x: r = p = -(gradient)."""
    m = x.size
    xf, rf = x.reshape(-1), r.reshape(-1)
    rf[...] = -(grad[:m] / n_samples + reg * xf)
    p.reshape(-1)[...] = rf
    state[0] = rf @ rf
    state[1] = grad[m]
    state[2] = grad[m + 1]


def cg_step(xp: Any, hv: Any, x: Any, r: Any, p: Any, state: Any, *, n_samples: int, reg: float) -> None:
    """One conjugate-gradient iteration, ``hv`` holding sum over tiles of H p."""
    xf, rf, pf = x.reshape(-1), r.reshape(-1), p.reshape(-1)
    q = hv.reshape(-1) / n_samples + reg * pf
    rr, pq = float(state[0]), float(pf @ q)
    if not (rr > 0.0 and pq > 0.0):  # converged (or H lost positivity to rounding): keep x
        return
    alpha = rr / pq
    xf += alpha * pf
    rf -= alpha * q
    rr_new = float(rf @ rf)
    pf *= rr_new / rr
    pf += rf
    state[0] = rr_new


def gd_step(xp: Any, grad: Any, x: Any, state: Any, *, n_samples: int, reg: float, lr: float) -> None:
    """One gradient step x -= lr (g/N + reg x) on the local problem."""
    m = x.size
    xf = x.reshape(-1)
    step = grad[:m] / n_samples + reg * xf
    xf -= lr * step
    state[0] = step @ step
    state[1] = grad[m]
    state[2] = grad[m + 1]


# ---------------------------------------------------------------------------------- SVD split

def truncation_rank(s: np.ndarray, max_rank: int, cutoff: float, rtol: float = 0.0) -> int:
    """Smallest rank whose discarded weight (sum of the dropped s_i^2) is at most ``cutoff`` of
    the total, capped at ``max_rank``; singular values at most ``rtol`` s_max count as zero and
    are always dropped (the numerical rank, as in ``numpy.linalg.matrix_rank``); 1 is the floor."""
    w = np.asarray(s, dtype=np.float64) ** 2
    total = w.sum()
    if total <= 0.0:
        return 1
    tail = np.append(np.cumsum(w[::-1])[::-1], 0.0)  # tail[k]: weight discarded when keeping k
    keep = int(np.argmax(tail <= cutoff * total))
    numerical = int(np.count_nonzero(np.asarray(s, dtype=np.float64) > rtol * float(np.max(s))))
    return max(1, min(keep, max_rank, numerical))


def _svd(xp: Any, m: Any) -> tuple[Any, Any, Any]:
    try:
        return xp.linalg.svd(m, full_matrices=False)
    except Exception:  # noqa: BLE001 - gesdd may not converge: retry in float64, then cast back
        u, s, vt = xp.linalg.svd(m.astype(xp.float64), full_matrices=False)
        return u.astype(m.dtype), s.astype(m.dtype), vt.astype(m.dtype)


def _truncate(m: Any, s: Any, max_rank: int, cutoff: float, info: Any) -> int:
    """The rank to keep of m's singular values ``s`` (``truncation_rank``, numerical rank relative
    to m's size); ``info`` <- (kept rank, discarded weight / total weight, norm of m)."""
    s_host = s.get() if hasattr(s, "get") else np.asarray(s)
    k = truncation_rank(s_host, max_rank, cutoff, rtol=max(m.shape) * float(np.finfo(s_host.dtype).eps))
    total = float((s_host.astype(np.float64) ** 2).sum())
    info[0] = k
    info[1] = float((s_host[k:].astype(np.float64) ** 2).sum()) / total if total > 0 else 0.0
    info[2] = np.sqrt(total)
    return k


def split(xp: Any, bond: Any, left: Any, right: Any, info: Any, *, direction: str, max_rank: int,
          cutoff: float) -> None:
    """Truncated SVD of a bond tensor back into two sites, the label going along ``direction``.

    "right": left <- U (a site, left-orthonormal), right <- S V^T (the centre, with the label).
    "left": left <- U S (the centre, with the label), right <- V^T (a site, right-orthonormal).
    ``info`` <- (kept rank, discarded weight / total weight, norm of the bond tensor).
    """
    dim, d1, d2, _, lb = bond.shape
    if direction == "right":
        m = bond.reshape(dim * d1, d2 * dim * lb)
    elif direction == "left":
        m = bond.transpose(0, 1, 4, 2, 3).reshape(dim * d1 * lb, d2 * dim)
    else:
        raise ValueError(f"split: direction must be 'left' or 'right', got {direction!r}")
    u, s, vt = _svd(xp, m)
    k = _truncate(m, s, max_rank, cutoff, info)
    left[...] = 0
    right[...] = 0
    if direction == "right":
        _as_site(left).reshape(dim * d1, -1)[:, :k] = u[:, :k]
        _as_center(right)[:k] = (s[:k, None] * vt[:k]).reshape(k, d2, dim, lb)
    else:
        _as_center(left)[:, :, :k, :] = (u[:, :k] * s[None, :k]).reshape(dim, d1, lb, k).transpose(0, 1, 3, 2)
        _as_site(right)[:k] = vt[:k].reshape(k, d2, dim)


def split_matrix(xp: Any, m: Any, left: Any, right: Any, info: Any, *, direction: str, max_rank: int,
                 cutoff: float) -> None:
    """Truncated SVD of a matrix m (rows, cols) into left (rows, cap) and right (cap, cols), the
    kept rank k <= cap in the first k columns / rows and zeros after them (a TT layer's merged
    bond: no padding to a common bond dimension, so the SVD costs what the matrix does).

    "right": left <- U, right <- S V^T; "left": left <- U S, right <- V^T. ``info`` <- (kept rank,
    discarded weight / total weight, norm of m).
    """
    if direction not in ("left", "right"):
        raise ValueError(f"split_matrix: direction must be 'left' or 'right', got {direction!r}")
    cap = left.shape[1]
    if right.shape[0] != cap or left.shape[0] != m.shape[0] or right.shape[1] != m.shape[1]:
        raise ValueError(f"split_matrix: factors {left.shape} and {right.shape} do not fit a matrix {m.shape}")
    u, s, vt = _svd(xp, m)
    k = _truncate(m, s, min(max_rank, cap), cutoff, info)
    left[...] = 0
    right[...] = 0
    if direction == "right":
        left[:, :k] = u[:, :k]
        right[:k] = s[:k, None] * vt[:k]
    else:
        left[:, :k] = u[:, :k] * s[None, :k]
        right[:k] = vt[:k]


# ---------------------------------------------------------------------------------- inference

def predict(xp: Any, feats: Any, sites: Any, center: Any, out: Any, *, center_site: int) -> None:
    """out[n, label]: scores of a tile of samples, ``feats`` (n, N, d), ``sites`` (N, D, d, D)
    (the entry at ``center_site`` is ignored), ``center`` (D, d, D, L) at ``center_site``."""
    n, nsites, _ = feats.shape
    dim = sites.shape[1]
    left = xp.zeros((n, 1, dim), dtype=sites.dtype)
    left[:, 0, 0] = 1
    right = left.copy()
    scratch = xp.empty_like(left)
    for j in range(center_site):
        env_left(xp, left, feats[:, j], sites[j], scratch)
        left, scratch = scratch, left
    for j in range(nsites - 1, center_site, -1):
        env_right(xp, right, feats[:, j], sites[j], scratch)
        right, scratch = scratch, right
    p = (left[:, 0, :, None] * feats[:, center_site, None, :]).reshape(n, -1)
    y = (p @ center.reshape(p.shape[1], -1)).reshape(n, dim, center.shape[3])
    out[...] = xp.einsum("nbl,nb->nl", y, right[:, 0])


def add(xp: Any, a: Any, out: Any) -> None:
    out += a


# ---------------------------------------------------------------------------------- CPU / GPU entry points

def _cupy() -> Any:
    import cupy
    return cupy


def _bodies(fn):
    def cpu(*args, **kwargs):
        return fn(np, *args, **kwargs)

    def gpu(*args, **kwargs):
        return fn(_cupy(), *args, **kwargs)

    cpu.__name__, gpu.__name__ = f"{fn.__name__}_cpu", f"{fn.__name__}_gpu"
    cpu.__doc__ = gpu.__doc__ = fn.__doc__
    return cpu, gpu


env_left_cpu, env_left_gpu = _bodies(env_left)
env_right_cpu, env_right_gpu = _bodies(env_right)
bond_grad_cpu, bond_grad_gpu = _bodies(bond_grad)
bond_hv_cpu, bond_hv_gpu = _bodies(bond_hv)
bond_scores_cpu, bond_scores_gpu = _bodies(bond_scores)
merge_cpu, merge_gpu = _bodies(merge)
cg_init_cpu, cg_init_gpu = _bodies(cg_init)
cg_step_cpu, cg_step_gpu = _bodies(cg_step)
gd_step_cpu, gd_step_gpu = _bodies(gd_step)
split_cpu, split_gpu = _bodies(split)
split_matrix_cpu, split_matrix_gpu = _bodies(split_matrix)
predict_cpu, predict_gpu = _bodies(predict)
add_cpu, add_gpu = _bodies(add)
label_copy_cpu, label_copy_gpu = _bodies(label_copy)
