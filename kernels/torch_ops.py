"""Codelet bodies that call torch's own CPU and GPU kernels on a task's buffers.

The whole-model graph (``lotus_rt.graph``) runs convolutions, pooling, batch norm and the
element-wise ops of a model as tasks. Their bodies here hand the task's buffers to torch without
copies (``torch.from_numpy`` on a CPU worker's NumPy views; ``torch.as_tensor`` on a CUDA worker's
CuPy arrays, on StarPU's stream) and call the ATen kernels torch itself uses: oneDNN convolution
and pooling on the CPU, cuDNN/cuBLAS on the GPU. A CPU body runs torch with one intra-op thread
(set once per worker thread): StarPU's workers are the parallelism.

Every body is written once over torch tensors (``_conv_forward``, ...) and registered by
``@body`` in ``BODIES`` as a (CPU body, GPU body) pair under its name ("conv_forward", ...). Arrays arrive in the order of the task's handles with the
storage shape they were registered with; each body reshapes them to the shapes it is given
(``x_shape``...), so a value can be stored in the shape its pickiest consumer wants. Bodies that
add into a gradient buffer (``accumulate=True``) do ``+=``, else they overwrite it.

Batch norm statistics are per-tile (count, mean, M2) partials in float64, combined pairwise
(Chan et al.'s parallel variance) by a tree of tasks, then finalised into (mean, invstd).
"""
from __future__ import annotations

import ctypes
import threading
import warnings
from typing import Any, Callable, Optional

import numpy as np
import torch

aten = torch.ops.aten

_thread = threading.local()


def _one_thread() -> None:
    if not getattr(_thread, "set", False):
        torch.set_num_threads(1)  # this worker thread's team only: the calling thread keeps its own
        _thread.set = True


_tensors: dict[tuple, torch.Tensor] = {}  # (address, shape, dtype) -> a tensor over that memory


def _host(a: Any) -> torch.Tensor:
    """A CPU tensor over the NumPy view's memory. Read-only views (mode R) get a writable alias
    first, which torch needs to wrap them without its warning (the bodies only read them); a
    step plan's tasks see the same buffers at every run, so the tensors are kept by address."""
    key = (a.ctypes.data, a.shape, a.dtype.str)
    tensor = _tensors.get(key)
    if tensor is None:
        if len(_tensors) > 1 << 14:
            _tensors.clear()
        if not a.flags.writeable:
            a = np.ndarray(a.shape, a.dtype, buffer=(ctypes.c_char * a.nbytes).from_address(a.ctypes.data))
        tensor = _tensors[key] = torch.from_numpy(a)
    return tensor


def _device(a: Any) -> torch.Tensor:
    return torch.as_tensor(a, device="cuda")


def _bodies(fn: Callable[..., None]) -> tuple[Callable[..., None], Callable[..., None]]:
    """(cpu body, gpu body) of a body written over torch tensors."""
    def cpu(*arrays: Any, **kwargs: Any) -> None:
        _one_thread()
        fn(*[_host(a) for a in arrays], **kwargs)

    def gpu(*arrays: Any, **kwargs: Any) -> None:
        import cupy
        with torch.cuda.stream(torch.cuda.ExternalStream(cupy.cuda.get_current_stream().ptr)):
            fn(*[_device(a) for a in arrays], **kwargs)

    cpu.__name__, gpu.__name__ = fn.__name__.lstrip("_") + "_cpu", fn.__name__.lstrip("_") + "_gpu"
    return cpu, gpu


BODIES: dict[str, tuple[Callable[..., None], Callable[..., None]]] = {}


def body(fn: Callable[..., None]) -> Callable[..., None]:
    """Register a body written over torch tensors: ``BODIES[name] = (cpu body, gpu body)``."""
    BODIES[fn.__name__.lstrip("_")] = _bodies(fn)
    return fn


def _store(dst: torch.Tensor, value: torch.Tensor, accumulate: bool) -> None:
    if accumulate:
        dst.add_(value.reshape(dst.shape))
    else:
        dst.copy_(value.reshape(dst.shape))


def weight_view(param: torch.Tensor, view: tuple | None) -> torch.Tensor:
    """The convolution weight a parameter stands for: ``param.permute(perm).reshape(shape)``
    (e.g. a Tucker factor (C_in, R) as a (R, C_in, 1, 1) 1x1 kernel), or the parameter itself."""
    if view is None:
        return param
    perm, shape = view
    return param.permute(perm).reshape(shape)


def weight_grad(grad: torch.Tensor, param_shape: tuple[int, ...], view: tuple | None) -> torch.Tensor:
    """The adjoint of ``weight_view``: a kernel-shaped gradient back in the parameter's shape."""
    if view is None:
        return grad
    perm, _ = view
    permuted = tuple(param_shape[p] for p in perm)
    inverse = [perm.index(k) for k in range(len(perm))]
    return grad.reshape(permuted).permute(inverse)


# ---------------------------------------------------------------------------------- convolution

@body
def _conv_forward(x, w, *rest, x_shape, y_shape, w_view, stride, padding, dilation, groups, bias, relu):
    b, y = (rest[0], rest[1]) if bias else (None, rest[0])
    out = y.view(y_shape)
    aten.convolution.out(x.view(x_shape), weight_view(w, w_view), b, stride, padding, dilation, False, [0, 0],
                         groups, out=out)
    if relu:
        out.clamp_min_(0)


@body
def _conv_backward_input(gy, x, w, *rest, x_shape, y_shape, w_view, stride, padding, dilation, groups, relu,
                         accumulate):
    """dx of a convolution (``rest``: the output y when a ReLU was fused, then dx; x is read for
    its shape and layout only)."""
    y, gx = (rest[0], rest[1]) if relu else (None, rest[0])
    g = gy.view(y_shape)
    if relu:
        g = aten.threshold_backward(g, y.view(y_shape), 0)
    dx, _, _ = aten.convolution_backward(g, x.view(x_shape), weight_view(w, w_view), None, stride, padding,
                                         dilation, False, [0, 0], groups, [True, False, False])
    _store(gx, dx, accumulate)


@body
def _conv_backward_weight(gy, x, w, *rest, x_shape, y_shape, w_view, stride, padding, dilation, groups, relu,
                          need_w, need_b, accumulate_w, accumulate_b):
    """This tile's partial gradients of the weight and bias (``rest``: y when a ReLU was fused,
    then the weight partial if ``need_w``, then the bias partial if ``need_b``)."""
    rest = list(rest)
    y = rest.pop(0) if relu else None
    gw = rest.pop(0) if need_w else None
    gb = rest.pop(0) if need_b else None
    g = gy.view(y_shape)
    if relu:
        g = aten.threshold_backward(g, y.view(y_shape), 0)
    weight = weight_view(w, w_view)
    _, dw, db = aten.convolution_backward(g, x.view(x_shape), weight, [weight.shape[0]] if need_b else None,
                                         stride, padding, dilation, False, [0, 0], groups, [False, need_w, need_b])
    if need_w:
        _store(gw, weight_grad(dw, tuple(w.shape), w_view), accumulate_w)
    if need_b:
        _store(gb, db, accumulate_b)


# ---------------------------------------------------------------------------------- linear

@body
def _linear_forward(x, w, *rest, x_shape, bias, relu):
    b, y = (rest[0], rest[1]) if bias else (None, rest[0])
    out = y.view(x_shape[0], w.shape[0])
    if bias:
        aten.addmm.out(b, x.view(x_shape), w.t(), out=out)
    else:
        aten.mm.out(x.view(x_shape), w.t(), out=out)
    if relu:
        out.clamp_min_(0)


@body
def _linear_backward_input(gy, w, *rest, relu, accumulate):
    y, gx = (rest[0], rest[1]) if relu else (None, rest[0])
    g = gy.view(-1, w.shape[0])
    if relu:
        g = aten.threshold_backward(g, y.view(g.shape), 0)
    _store(gx, g @ w, accumulate)


@body
def _linear_backward_weight(gy, x, *rest, x_shape, out_features, relu, need_w, need_b, accumulate_w, accumulate_b):
    rest = list(rest)
    y = rest.pop(0) if relu else None
    gw = rest.pop(0) if need_w else None
    gb = rest.pop(0) if need_b else None
    g = gy.view(x_shape[0], out_features)
    if relu:
        g = aten.threshold_backward(g, y.view(g.shape), 0)
    if need_w:
        _store(gw, g.t() @ x.view(x_shape), accumulate_w)
    if need_b:
        _store(gb, g.sum(0), accumulate_b)


# ---------------------------------------------------------------------------------- activations

@body
def _relu_forward(x, y):
    torch.clamp_min(x.view(y.shape), 0, out=y)


@body
def _relu_backward(gy, y, gx, *, accumulate):
    _store(gx, aten.threshold_backward(gy.view(y.shape), y, 0), accumulate)


@body
def _gelu_forward(x, y, *, approximate):
    aten.gelu.out(x.view(y.shape), approximate=approximate, out=y)


@body
def _gelu_backward(gy, x, gx, *, approximate, accumulate):
    _store(gx, aten.gelu_backward(gy.view(x.shape), x, approximate=approximate), accumulate)


@body
def _scale_forward(x, mask, y):
    """Dropout with a mask drawn by torch (already scaled by 1 / (1 - p))."""
    torch.mul(x.view(y.shape), mask.view(y.shape), out=y)


@body
def _scale_backward(gy, mask, gx, *, accumulate):
    _store(gx, gy * mask.view(gy.shape), accumulate)


# ---------------------------------------------------------------------------------- pooling

@body
def _maxpool_forward(x, y, indices, *, x_shape, kernel, stride, padding, dilation, ceil_mode):
    """On the CPU through a channels-last copy: ATen's channels-last max pooling is vectorised
    over channels, its NCHW one is not (one 32x32x28x28 tile, 2x2, one thread: 1.6 ms with the
    copies vs 3.7 ms). Same values and indices (flat offsets within each plane) either way."""
    xs = x.view(x_shape)
    if xs.is_cuda:
        aten.max_pool2d_with_indices.out(xs, kernel, stride, padding, dilation, ceil_mode,
                                         out=y.view(indices.shape), indices=indices)
        return
    pooled, where = aten.max_pool2d_with_indices(xs.contiguous(memory_format=torch.channels_last), kernel, stride,
                                                 padding, dilation, ceil_mode)
    y.view(indices.shape).copy_(pooled)
    indices.copy_(where)


@body
def _maxpool_backward(gy, x, indices, gx, *, x_shape, kernel, stride, padding, dilation, ceil_mode, accumulate):
    dx = aten.max_pool2d_with_indices_backward(gy.view(indices.shape), x.view(x_shape), kernel, stride, padding,
                                               dilation, ceil_mode, indices)
    _store(gx, dx, accumulate)


@body
def _avgpool_forward(x, y, *, x_shape, y_shape, kernel, stride, padding, ceil_mode, count_include_pad,
                     divisor_override):
    aten.avg_pool2d.out(x.view(x_shape), kernel, stride, padding, ceil_mode, count_include_pad, divisor_override,
                        out=y.view(y_shape))


@body
def _avgpool_backward(gy, x, gx, *, x_shape, y_shape, kernel, stride, padding, ceil_mode, count_include_pad,
                      divisor_override, accumulate):
    dx = aten.avg_pool2d_backward(gy.view(y_shape), x.view(x_shape), kernel, stride, padding, ceil_mode,
                                  count_include_pad, divisor_override)
    _store(gx, dx, accumulate)


# ---------------------------------------------------------------------------------- joins

@body
def _add_forward(a, b, y, *, relu):
    torch.add(a.view(y.shape), b.view(y.shape), out=y)
    if relu:
        y.clamp_min_(0)


@body
def _pass_gradient(gy, *rest, relu, accumulate):
    """A gradient passed on unchanged (an add's inputs), through a fused ReLU's mask."""
    y, gx = (rest[0], rest[1]) if relu else (None, rest[0])
    g = aten.threshold_backward(gy, y.view(gy.shape), 0) if relu else gy
    _store(gx, g, accumulate)


@body
def _cat_forward(*arrays, shapes, y_shape, dim):
    *xs, y = arrays
    torch.cat([x.view(s) for x, s in zip(xs, shapes)], dim=dim, out=y.view(y_shape))


@body
def _slice_gradient(gy, gx, *, y_shape, dim, start, stop, accumulate):
    """One concatenated input's gradient: its slice of the output's."""
    _store(gx, gy.view(y_shape).narrow(dim, start, stop - start), accumulate)


# ---------------------------------------------------------------------------------- batch norm
#
# The per-tile batch-norm bodies are a dozen small torch calls each. Called from Python, every
# call holds the GIL while torch parses its arguments, so two workers' bodies serialise on it:
# one (32, 64, 8, 8) backward tile took 72 us alone and 154-178 us on each of two threads at once
# (two processes: 72 us each). Their cores below are TorchScript, whose calls run with the GIL
# released: 65 us alone, 72 us on each of two threads (/tmp micro-benchmark, 2026-12-06).


def _gil_free(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled by TorchScript (run without the GIL); ``fn`` itself where TorchScript is
    gone from this torch (same results, slower on several workers)."""
    try:
        with warnings.catch_warnings():  # deprecated in favour of torch.compile, which keeps the GIL
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(fn)
    except Exception:  # noqa: BLE001 - a torch without TorchScript: the Python function is correct
        return fn


def _bn_partial_core(xs: torch.Tensor, part: torch.Tensor) -> None:
    c = xs.shape[1]
    count = xs.numel() // c
    # torch's CPU sum is a cascade (pairwise) summation: accurate to a few float32 roundings and
    # ~15x faster than one in double
    mean = xs.sum(dim=[0, 2, 3]).to(torch.float64) / count
    centered = xs - mean.to(xs.dtype).view(1, c, 1, 1)
    m2 = centered.mul_(centered).sum(dim=[0, 2, 3]).to(torch.float64)
    part[0] = float(count)
    part[1:1 + c] = mean
    part[1 + c:] = m2


_bn_partial_core = _gil_free(_bn_partial_core)


@body
def _bn_partial(x, part, *, x_shape):
    """This tile's per-channel (count, mean, M2): part = [count, mean (C), M2 (C)] in float64,
    by two passes over the tile (its mean, then the squares about it)."""
    _bn_partial_core(x.view(x_shape), part)


@body
def _bn_combine(other, part):
    """part <- the statistics of both partials' samples (Chan et al.'s pairwise update)."""
    c = (part.shape[0] - 1) // 2
    na, nb = part[0].item(), other[0].item()
    n = na + nb
    delta = other[1:1 + c] - part[1:1 + c]
    part[1:1 + c] += delta * (nb / n)
    part[1 + c:] += other[1 + c:] + delta * delta * (na * nb / n)
    part[0] = n


@body
def _bn_finalize(part, factor, stats, *running, eps, track):
    """stats = [mean, invstd] in the data's dtype; running mean/var updated as torch does
    (``factor``: the momentum, or 1/num_batches_tracked when momentum is None; unbiased var)."""
    c = stats.shape[0] // 2
    n = part[0].item()
    mean, var = part[1:1 + c], part[1 + c:] / n
    stats[:c] = mean
    stats[c:] = 1.0 / torch.sqrt(var + eps)
    if track:
        rm, rv = running
        f = factor[0].item()
        rm.mul_(1 - f).add_(mean.to(rm.dtype), alpha=f)
        rv.mul_(1 - f).add_((part[1 + c:] / max(n - 1, 1)).to(rv.dtype), alpha=f)


@body
def _bn_eval_stats(rm, rv, stats, *, eps):
    c = stats.shape[0] // 2
    stats[:c] = rm
    stats[c:] = 1.0 / torch.sqrt(rv + eps)


def _bn_normalize_core(x: torch.Tensor, stats: torch.Tensor, w: Optional[torch.Tensor], b: Optional[torch.Tensor],
                       out: torch.Tensor, relu: bool) -> None:
    c = x.shape[1]
    if w is not None and b is not None:
        alpha = stats[c:] * w
        beta = b - stats[:c] * alpha
    else:
        alpha = stats[c:]
        beta = -stats[:c] * alpha
    # torch's own batch-norm kernel in eval mode with weight alpha, bias beta, mean 0, var 1 and
    # eps 0 forms exactly x * alpha + beta, in one vectorised pass (54 us for a (32, 16, 32, 32)
    # tile on one thread; addcmul with per-channel broadcasts 211 us, mul then add 62 us in two)
    empty = torch.empty(0, dtype=x.dtype, device=x.device)
    torch.native_batch_norm(x, alpha, beta, torch.zeros_like(alpha), torch.ones_like(alpha), False, 0.0, 0.0,
                            out=out, save_mean=empty, save_invstd=empty)
    if relu:
        out.clamp_min_(0)


_bn_normalize_core = _gil_free(_bn_normalize_core)


@body
def _bn_normalize(x, stats, *rest, x_shape, affine, relu):
    """y = (x - mean) * invstd * w + b as torch's CPU kernel forms it (x * alpha + beta)."""
    w, b, y = (rest[0], rest[1], rest[2]) if affine else (None, None, rest[0])
    _bn_normalize_core(x.view(x_shape), stats, w, b, y.view(x_shape), relu)


def _bn_backward_partial_core(gy: torch.Tensor, y: Optional[torch.Tensor], x: torch.Tensor, stats: torch.Tensor,
                              part: torch.Tensor) -> None:
    c = x.shape[1]
    g = gy if y is None else torch.ops.aten.threshold_backward(gy, y, 0)  # the fused ReLU's mask
    centered = x - stats[:c].view(1, c, 1, 1)
    centered.mul_(g)
    part[:c] = g.sum(dim=[0, 2, 3]).to(torch.float64)
    part[c:] = centered.sum(dim=[0, 2, 3]).to(torch.float64) * stats[c:].to(torch.float64)


_bn_backward_partial_core = _gil_free(_bn_backward_partial_core)


@body
def _bn_backward_partial(gy, x, stats, *rest, x_shape, relu):
    """This tile's per-channel [sum(dy), sum(dy * xhat)] (``rest``: y if a ReLU was fused, then
    the partial); summed by torch in the data's dtype (double accumulators on the CPU), stored
    in float64 for the reduction tree."""
    y, part = (rest[0], rest[1]) if relu else (None, rest[0])
    _bn_backward_partial_core(gy.view(x_shape), None if y is None else y.view(x_shape), x.view(x_shape), stats, part)


def _bn_backward_input_core(gy: torch.Tensor, y: Optional[torch.Tensor], x: torch.Tensor, stats: torch.Tensor,
                            sums: torch.Tensor, w: Optional[torch.Tensor], gx: torch.Tensor, count: int,
                            training: bool, accumulate: bool) -> None:
    c = x.shape[1]
    g = gy if y is None else torch.ops.aten.threshold_backward(gy, y, 0)  # the fused ReLU's mask
    invstd = stats[c:]
    scale = (invstd * w if w is not None else invstd).view(1, c, 1, 1)
    out = torch.empty_like(g) if accumulate else gx
    if training:
        k = (sums[c:] / count).to(g.dtype) * invstd
        # -(x - mean) * k - mean(dy) in one pass: torch's eval batch norm with weight -k, bias
        # -mean(dy), mean ``mean``, var 1 and eps 0 (it would take three passes as sub, mul, sub)
        empty = torch.empty(0, dtype=x.dtype, device=x.device)
        torch.native_batch_norm(x, -k, -(sums[:c] / count).to(g.dtype), stats[:c], torch.ones_like(k), False, 0.0,
                                0.0, out=out, save_mean=empty, save_invstd=empty)
        out.add_(g)
        out.mul_(scale)
    else:
        torch.mul(g, scale, out=out)
    if accumulate:
        gx.add_(out)


_bn_backward_input_core = _gil_free(_bn_backward_input_core)


@body
def _bn_backward_input(gy, x, stats, sums, *rest, x_shape, count, affine, relu, training, accumulate):
    """dx of batch norm, with batch statistics (training) or the running ones (eval):
    (dy - mean(dy) - (x - mean) * invstd * mean(dy * xhat)) * invstd * w, formed in place in
    one buffer."""
    rest = list(rest)
    y = rest.pop(0) if relu else None
    w = rest.pop(0) if affine else None
    gx = rest.pop(0)
    _bn_backward_input_core(gy.view(x_shape), None if y is None else y.view(x_shape), x.view(x_shape), stats, sums,
                            w, gx.view(x_shape), int(count), training, accumulate)


@body
def _bn_param_grads(sums, *grads, need_w, need_b, accumulate_w, accumulate_b):
    """dweight = sum(dy * xhat), dbias = sum(dy), from the reduced sums."""
    c = sums.shape[0] // 2
    grads = list(grads)
    if need_w:
        _store(grads.pop(0), sums[c:], accumulate_w)
    if need_b:
        _store(grads.pop(0), sums[:c], accumulate_b)


@body
def _add_into(a, out):
    out.add_(a)


@body
def _copy(a, out):
    out.copy_(a.view(out.shape))


