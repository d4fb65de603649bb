"""Fused power-iteration spectral normalisation (R4F head), Triton.

Semantics of ``torch.nn.utils.parametrizations.spectral_norm`` (dim 0) on a weight matrix W (C x H) with
buffers u (C) and v (H) that carry no gradient:

* training forward: ``n`` power iterations, in torch's order and with torch's ``F.normalize``
  (``x / max(||x||, eps)``), updating u and v in place:
      u = normalize(W v);  v = normalize(W^T u)
  then ``sigma = u^T W v`` and the output ``W / sigma``;
* eval forward (``n = 0``): no update, sigma recomputed from the stored u, v;
* backward, u and v held constant (they are the values of this forward, kept for it even when a later
  forward updates the buffers: the R3F pattern of two forwards before one backward):
      dL/dW = G / sigma - (<G, W> / sigma^2) u v^T.

Arithmetic is float32 whatever the weight dtype (float32, float16, bfloat16); the output has the weight's
dtype. After each normalisation u and v are rounded through the buffers' dtype, as torch's
``F.normalize(..., out=buffer)`` does, so sigma is exactly ``u^T W v`` of the stored buffers.

The kernels run on the weight's memory seen as a row-major matrix: W itself (contiguous weights, N-D
weights flattened as ``W.flatten(1)``), ``W^T`` (a weight stored transposed, dim 0 innermost: u and v
swap roles and the iteration updates v first), or W with its columns permuted (channels_last convolution
weights: v is gathered into that order and scattered back, two copies of H elements). The output has the
weight's strides, like torch's ``weight / sigma``. Only weights whose dim 0 is in the middle of the memory
order, or that are not dense, are computed on a contiguous copy (and the result copied into their layout).

Two paths:

* fused (the padded C x H tile fits ``MAX_FUSED_ELEMENTS``): one program loads W once, iterates on chip,
  writes u, v, sigma and W / sigma: one launch forward, one launch backward;
* tiled (larger heads): per iteration a split-K matrix-vector kernel over all (row block, K split)
  programs plus a one-program kernel that sums the splits and normalises; the last normalisation also
  gives ``sigma = v_raw^T v`` (``v_raw = W^T u``, so this is ``u^T W v`` without another pass over W);
  then a grid-stride kernel writes W / sigma. Forward ``4 n + 1`` launches (eval: 3), backward 2
  (``<G, W>`` partial sums, then the rank-1 update).

Autograd (:class:`SpectralNormFunction`): the forward always runs the kernels, also under torch.func
transforms (``vmap`` runs them once per batch member). The backward runs them for ordinary backward
passes; when its result must be differentiable (double backward) or it receives batched or torch.func
tensors (``is_grads_batched``, ``torch.func.grad``/``vjp``/``jacrev``) it evaluates the same formula in
PyTorch operations. Forward-mode derivatives (``jvp``, ``forward_ad``, ``jacfwd``) are PyTorch operations.

``LAUNCHES`` counts kernel launches by kernel name (tests use it to prove the kernel ran).
"""
from __future__ import annotations

import math
import operator
from collections import Counter
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .._dispatch import device_context

__all__ = ["spectral_normalize", "SpectralNormFunction", "fits_one_program", "LAUNCHES", "MAX_FUSED_ELEMENTS",
           "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Largest padded C x H tile (float32 elements) one program holds in registers. At 8192 and 16 warps
# ptxas (sm_90) fits every aspect ratio, 1 x 8192 to 8192 x 1, in <= 128 registers without spilling;
# 16384 spills for tall heads (1024 x 16). Larger heads (e.g. 1000 x 4096) take the tiled path.
MAX_FUSED_ELEMENTS = 8192
# Tiled path: matvec tile (rows of W, columns of W); the column side is W's contiguous dimension.
TILE_ROWS, TILE_COLS = 64, 128
ELEMENTWISE_BLOCK = 1024  # CUDA; the interpreter (CPU) takes 16x larger tiles: it pays per operation
MAX_ELEMENTWISE_PROGRAMS = 1024

LAUNCHES: Counter[str] = Counter()


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _normalize(x, eps):
    # torch's F.normalize: x / max(||x||_2, eps)
    return x / tl.maximum(tl.sqrt(tl.sum(x * x, axis=0)), eps)


@triton.jit
def _sn_fused_fwd_kernel(w_ptr, u_ptr, v_ptr, out_ptr, u_save_ptr, v_save_ptr, sigma_ptr,
                         C, H, n_iters, eps,
                         UPDATE: tl.constexpr, COL_FIRST: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    # W here is the row-major C x H matrix the weight is in memory, u its row vector, v its column vector.
    # COL_FIRST (a weight stored transposed, W = weight^T): update v before u, which is torch's order on
    # the weight (its u is our v).
    rows = tl.arange(0, BLOCK_C)
    cols = tl.arange(0, BLOCK_H)
    rmask = rows < C
    cmask = cols < H
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * H + cols[None, :]  # 64-bit: row * H overflows int32 at scale
    # padding is 0, so it adds nothing to any sum and stays 0 through the normalisations
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    if UPDATE:
        for _ in range(n_iters):
            # u = normalize(W v), v = normalize(W^T u), each rounded through its buffer's dtype (out=buffer)
            if COL_FIRST:
                v = _normalize(tl.sum(w * u[:, None], axis=0), eps).to(v_ptr.dtype.element_ty).to(tl.float32)
                u = _normalize(tl.sum(w * v[None, :], axis=1), eps).to(u_ptr.dtype.element_ty).to(tl.float32)
            else:
                u = _normalize(tl.sum(w * v[None, :], axis=1), eps).to(u_ptr.dtype.element_ty).to(tl.float32)
                v = _normalize(tl.sum(w * u[:, None], axis=0), eps).to(v_ptr.dtype.element_ty).to(tl.float32)
        tl.store(u_ptr + rows, u.to(u_ptr.dtype.element_ty), mask=rmask)  # in-place buffer update
        tl.store(v_ptr + cols, v.to(v_ptr.dtype.element_ty), mask=cmask)
    # the clones backward uses (float32 holds the buffer values exactly)
    tl.store(u_save_ptr + rows, u, mask=rmask)
    tl.store(v_save_ptr + cols, v, mask=cmask)
    sigma = tl.sum(u * tl.sum(w * v[None, :], axis=1), axis=0)  # sigma = u^T W v
    tl.store(sigma_ptr, sigma)
    tl.store(out_ptr + offs, (w / sigma).to(out_ptr.dtype.element_ty), mask=mask)  # W / sigma


@triton.jit
def _sn_fused_bwd_kernel(g_ptr, w_ptr, u_ptr, v_ptr, sigma_ptr, dw_ptr, C, H,
                         BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.arange(0, BLOCK_C)
    cols = tl.arange(0, BLOCK_H)
    rmask = rows < C
    cmask = cols < H
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows, mask=rmask, other=0.0)
    v = tl.load(v_ptr + cols, mask=cmask, other=0.0)
    sigma = tl.load(sigma_ptr)
    gw = tl.sum(tl.sum(g * w, axis=1), axis=0)  # <G, W>
    # dL/dW = G / sigma - (<G, W> / sigma^2) u v^T
    dw = g / sigma - (gw / (sigma * sigma)) * (u[:, None] * v[None, :])
    tl.store(dw_ptr + offs, dw.to(dw_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sn_matvec_kernel(w_ptr, x_ptr, x_copy_ptr, parts_ptr, C, H, n_out, n_in, in_per_split,
                      TRANSPOSE: tl.constexpr, COPY_X: tl.constexpr,
                      BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr):
    # parts[s, o] = sum over the s-th slice of k of  W[o, k] x[k]   (TRANSPOSE: W[k, o] x[k], i.e. W^T x)
    pid_o = tl.program_id(0)
    pid_s = tl.program_id(1)
    o = pid_o * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    omask = o < n_out
    acc = tl.zeros([BLOCK_OUT], dtype=tl.float32)
    k_start = pid_s * in_per_split
    for k0 in range(0, in_per_split, BLOCK_IN):
        k = k_start + k0 + tl.arange(0, BLOCK_IN)
        kmask = k < n_in
        x = tl.load(x_ptr + k, mask=kmask, other=0.0).to(tl.float32)
        if COPY_X:  # the row-block-0 programs together copy x once (float32 clone for backward)
            if pid_o == 0:
                tl.store(x_copy_ptr + k, x, mask=kmask)
        if TRANSPOSE:  # tile W[k, o]: rows k, columns o (contiguous)
            offs = k.to(tl.int64)[:, None] * H + o[None, :]
            w = tl.load(w_ptr + offs, mask=kmask[:, None] & omask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * x[:, None], axis=0)
        else:  # tile W[o, k]: rows o, columns k (contiguous)
            offs = o.to(tl.int64)[:, None] * H + k[None, :]
            w = tl.load(w_ptr + offs, mask=omask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1)
    tl.store(parts_ptr + pid_s.to(tl.int64) * n_out + o, acc, mask=omask)


@triton.jit
def _sum_parts(parts_ptr, n_parts, L, idx, mask):
    # x[idx] = sum_s parts[s, idx]
    x = tl.load(parts_ptr + idx, mask=mask, other=0.0)
    for s in range(1, n_parts):
        x += tl.load(parts_ptr + s * L + idx, mask=mask, other=0.0)
    return x


@triton.jit
def _sn_reduce_kernel(parts_ptr, n_parts, L, eps, out_ptr, buf_ptr, dot_ptr, sigma_ptr,
                      NORMALIZE: tl.constexpr, SIGMA: tl.constexpr, BLOCK: tl.constexpr):
    # One program. x = sum_s parts[s].
    # NORMALIZE: y = normalize(x) through buf's dtype, stored to buf (in place) and out (float32 clone);
    # otherwise y = dot (copied to out). SIGMA: sigma = x^T y.
    if NORMALIZE:
        sq = tl.zeros([BLOCK], dtype=tl.float32)
        for l0 in range(0, L, BLOCK):
            idx = l0 + tl.arange(0, BLOCK)
            x = _sum_parts(parts_ptr, n_parts, L, idx, idx < L)
            sq += x * x
        denom = tl.maximum(tl.sqrt(tl.sum(sq, axis=0)), eps)  # max(||x||, eps)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for l0 in range(0, L, BLOCK):
        idx = l0 + tl.arange(0, BLOCK)
        mask = idx < L
        x = _sum_parts(parts_ptr, n_parts, L, idx, mask)
        if NORMALIZE:
            y = (x / denom).to(buf_ptr.dtype.element_ty)
            tl.store(buf_ptr + idx, y, mask=mask)
            y = y.to(tl.float32)
        else:
            y = tl.load(dot_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + idx, y, mask=mask)
        acc += x * y
    if SIGMA:
        tl.store(sigma_ptr, tl.sum(acc, axis=0))


@triton.jit
def _sn_dot_kernel(g_ptr, w_ptr, parts_ptr, N, tiles_per_prog, BLOCK: tl.constexpr):
    # parts[p] = sum of G * W over program p's contiguous chunk (the pieces of <G, W>)
    start = tl.program_id(0).to(tl.int64) * tiles_per_prog * BLOCK
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for t in range(tiles_per_prog):
        idx = start + t * BLOCK + tl.arange(0, BLOCK)
        mask = idx < N
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        acc += g * w
    tl.store(parts_ptr + tl.program_id(0), tl.sum(acc, axis=0))


@triton.jit
def _sn_rank1_kernel(x_ptr, u_ptr, v_ptr, sigma_ptr, parts_ptr, n_parts, out_ptr, N, H, tiles_per_prog,
                     BACKWARD: tl.constexpr, BLOCK: tl.constexpr, PARTS_BLOCK: tl.constexpr):
    # forward (x = W):  out = W / sigma
    # backward (x = G): out = G / sigma - (<G, W> / sigma^2) u_i v_j,  <G, W> = sum of parts
    sigma = tl.load(sigma_ptr)
    if BACKWARD:
        p = tl.arange(0, PARTS_BLOCK)
        gw = tl.sum(tl.load(parts_ptr + p, mask=p < n_parts, other=0.0), axis=0)
        coef = gw / (sigma * sigma)
    start = tl.program_id(0).to(tl.int64) * tiles_per_prog * BLOCK
    for t in range(tiles_per_prog):
        idx = start + t * BLOCK + tl.arange(0, BLOCK)
        mask = idx < N
        y = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32) / sigma
        if BACKWARD:
            u = tl.load(u_ptr + idx // H, mask=mask, other=0.0)
            v = tl.load(v_ptr + idx % H, mask=mask, other=0.0)
            y -= coef * u * v
        tl.store(out_ptr + idx, y.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
def _launch(kernel, grid, *args, **meta) -> None:
    LAUNCHES[kernel.fn.__name__] += 1
    kernel[grid](*args, **meta)


def _pow2(n: int) -> int:
    """``triton.next_power_of_2`` (a Triton constexpr function, slow on the host) in plain Python."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _fused_blocks(C: int, H: int) -> tuple[int, int]:
    return _pow2(C), _pow2(H)


def fits_one_program(C: int, H: int, max_fused_elements: Optional[int] = None) -> bool:
    """Whether a C x H head takes the fused one-program path (padded tile <= the threshold)."""
    limit = MAX_FUSED_ELEMENTS if max_fused_elements is None else max_fused_elements
    bc, bh = _fused_blocks(C, H)
    return bc * bh <= limit


def _fused_warps(C: int, H: int) -> int:
    bc, bh = _fused_blocks(C, H)
    return 4 if bc * bh <= 2048 else 8 if bc * bh <= 4096 else 16


def _sm_count(device: torch.device) -> Optional[int]:
    """Streaming multiprocessors of a CUDA device; None elsewhere (the interpreter on CPU). The only place
    the launchers ask the device: ``bench.sm90`` replaces it to plan launches for a GPU it does not have."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return None


def _target_programs(device: torch.device) -> int:
    sms = _sm_count(device)
    return 4 * sms if sms else 4  # interpreter: programs run one after another; a few still exercise splits


def _matvec(w: torch.Tensor, x: torch.Tensor, transpose: bool, x_copy: Optional[torch.Tensor] = None
            ) -> torch.Tensor:
    """Split-K partial products ``[S, n_out]`` of ``W x`` (``W^T x`` when ``transpose``)."""
    C, H = w.shape
    n_out, n_in = (H, C) if transpose else (C, H)
    block_out, block_in = (TILE_COLS, TILE_ROWS) if transpose else (TILE_ROWS, TILE_COLS)
    out_blocks, in_tiles = _cdiv(n_out, block_out), _cdiv(n_in, block_in)
    splits = max(1, min(in_tiles, _target_programs(w.device) // out_blocks))
    in_per_split = _cdiv(in_tiles, splits) * block_in
    splits = _cdiv(n_in, in_per_split)
    parts = torch.empty(splits, n_out, device=w.device, dtype=torch.float32)
    _launch(_sn_matvec_kernel, (out_blocks, splits), w, x, x if x_copy is None else x_copy, parts,
            C, H, n_out, n_in, in_per_split, TRANSPOSE=transpose, COPY_X=x_copy is not None,
            BLOCK_OUT=block_out, BLOCK_IN=block_in, num_warps=8)
    return parts


def _reduce(parts: torch.Tensor, eps: float, out: torch.Tensor, *, buf: Optional[torch.Tensor] = None,
            dot: Optional[torch.Tensor] = None, sigma: Optional[torch.Tensor] = None) -> None:
    """Sum the splits; normalise into ``buf`` and ``out`` (when ``buf``), else copy ``dot`` to ``out``;
    write ``sigma = x^T y`` when asked."""
    n_parts, L = parts.shape
    block = min(4096, _pow2(L))
    _launch(_sn_reduce_kernel, (1,), parts, n_parts, L, eps, out, out if buf is None else buf,
            out if dot is None else dot, out if sigma is None else sigma,
            NORMALIZE=buf is not None, SIGMA=sigma is not None, BLOCK=block, num_warps=8)


def _elementwise_grid(N: int, device: torch.device) -> tuple[int, int, int]:
    """(programs, tiles per program, block) of the chunked elementwise kernels."""
    on_cuda = _sm_count(device) is not None
    block = ELEMENTWISE_BLOCK if on_cuda else 16 * ELEMENTWISE_BLOCK
    tiles = _cdiv(N, block)
    cap = MAX_ELEMENTWISE_PROGRAMS if on_cuda else _target_programs(device)
    tiles_per_prog = _cdiv(tiles, min(tiles, cap))
    return _cdiv(tiles, tiles_per_prog), tiles_per_prog, block


def _rank1(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor,
           parts: Optional[torch.Tensor] = None) -> None:
    """``out = x / sigma``, minus ``(sum(parts) / sigma^2) u v^T`` when ``parts`` is given (backward)."""
    N, H = x.numel(), x.shape[1]
    programs, tiles_per_prog, block = _elementwise_grid(N, x.device)
    n_parts = 1 if parts is None else parts.numel()
    _launch(_sn_rank1_kernel, (programs,), x, u, v, sigma, sigma if parts is None else parts, n_parts, out,
            N, H, tiles_per_prog, BACKWARD=parts is not None, BLOCK=block,
            PARTS_BLOCK=_pow2(n_parts), num_warps=4)


def _forward(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n_iters: int, eps: float, fused: bool,
             col_first: bool, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u clone, v clone, sigma) of the row-major matrix ``w``, ``w / sigma`` written into ``out``; u, v
    updated in place when ``n_iters > 0`` (v before u when ``col_first``)."""
    C, H = w.shape
    f32 = dict(device=w.device, dtype=torch.float32)
    u_save, v_save, sigma = torch.empty(C, **f32), torch.empty(H, **f32), torch.empty(1, **f32)
    if fused:
        bc, bh = _fused_blocks(C, H)
        _launch(_sn_fused_fwd_kernel, (1,), w, u, v, out, u_save, v_save, sigma, C, H, n_iters, eps,
                UPDATE=n_iters > 0, COL_FIRST=col_first, BLOCK_C=bc, BLOCK_H=bh, num_warps=_fused_warps(C, H))
        return u_save, v_save, sigma
    if n_iters == 0:  # eval: sigma = u^T (W v) from the stored vectors
        _reduce(_matvec(w, v, transpose=False, x_copy=v_save), eps, u_save, dot=u, sigma=sigma)
    x = u if col_first else v
    for i in range(n_iters):
        last = sigma if i == n_iters - 1 else None
        # the second normalisation of the last iteration also gives sigma: (W v)^T u or (W^T u)^T v
        if col_first:
            _reduce(_matvec(w, x, transpose=True), eps, v_save, buf=v)  # v = normalize(W^T u)
            _reduce(_matvec(w, v_save, transpose=False), eps, u_save, buf=u, sigma=last)  # u = normalize(W v)
            x = u_save
        else:
            _reduce(_matvec(w, x, transpose=False), eps, u_save, buf=u)  # u = normalize(W v)
            _reduce(_matvec(w, u_save, transpose=True), eps, v_save, buf=v, sigma=last)  # v = normalize(W^T u)
            x = v_save
    _rank1(w, u_save, v_save, sigma, out)
    return u_save, v_save, sigma


def _backward(g: torch.Tensor, w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor,
              fused: bool, dw: torch.Tensor) -> None:
    """``dw = G / sigma - (<G, W> / sigma^2) u v^T`` (row-major matrices of one shape)."""
    C, H = w.shape
    if fused:
        bc, bh = _fused_blocks(C, H)
        _launch(_sn_fused_bwd_kernel, (1,), g, w, u, v, sigma, dw, C, H, BLOCK_C=bc, BLOCK_H=bh,
                num_warps=_fused_warps(C, H))
        return
    programs, tiles_per_prog, block = _elementwise_grid(g.numel(), g.device)
    parts = torch.empty(programs, device=g.device, dtype=torch.float32)
    _launch(_sn_dot_kernel, (programs,), g, w, parts, g.numel(), tiles_per_prog, BLOCK=block,
            num_warps=4)
    _rank1(g, u, v, sigma, dw, parts)


# ----------------------------------------------------------------------------------------------------
# Memory layout: the kernels run on the weight's memory as a row-major matrix
# ----------------------------------------------------------------------------------------------------
class _Layout(NamedTuple):
    """How an N-D weight (rows: dim 0, columns: the other dims flattened) lies in memory.

    ``weight.permute(order)`` is contiguous. Not ``transposed``: dim 0 is outermost and memory holds the
    C x H matrix; ``transposed``: dim 0 is innermost (stride 1) and memory holds the H x C matrix W^T.
    ``v_perm``: the memory order of the trailing dims when it differs from their logical order
    (channels_last convolutions), else None.
    """

    order: tuple
    transposed: bool
    v_perm: Optional[tuple]


_ROW_MAJOR_2D = _Layout((0, 1), False, None)


def _layout(w: torch.Tensor) -> Optional[_Layout]:
    """The weight's layout, or None when dim 0 is neither outermost nor innermost or the weight is not
    dense (then the kernels run on a contiguous copy)."""
    n = w.ndim
    if w.is_contiguous():
        return _ROW_MAJOR_2D if n == 2 else _Layout(tuple(range(n)), False, None)
    rest = sorted(range(1, n), key=lambda d: -w.stride(d))  # stable: ties (size-1 dims) keep their order
    for transposed in (False, True):
        order = (*rest, 0) if transposed else (0, *rest)
        if w.permute(order).is_contiguous():  # (strides of size-1 dims do not matter)
            big = [d for d in rest if w.shape[d] != 1]
            v_perm = None if big == sorted(big) else tuple(d - 1 for d in rest)
            return _Layout(order, transposed, v_perm)
    return None


def _matrix(t: torch.Tensor, lay: _Layout) -> torch.Tensor:
    """The row-major matrix view of ``t``'s memory (C x H, or H x C when transposed)."""
    if t.ndim == 2 and lay is _ROW_MAJOR_2D:
        return t
    p = t.permute(lay.order)
    return p.view(-1, t.shape[0]) if lay.transposed else p.view(t.shape[0], -1)


def _v_memory_order(v: torch.Tensor, shape: torch.Size, lay: _Layout) -> torch.Tensor:
    """``v`` (logical order of the trailing dims ``shape``) in their memory order: a copy."""
    return v.view(shape).permute(lay.v_perm).reshape(-1)


def _v_logical_order(dst: torch.Tensor, src: torch.Tensor, shape: torch.Size, lay: _Layout) -> torch.Tensor:
    """Write ``src`` (memory order) into ``dst`` (logical order); returns ``dst``."""
    view = dst.view(shape).permute(lay.v_perm)
    view.copy_(src.view(view.shape))
    return dst


def _dense(weight: torch.Tensor) -> tuple[torch.Tensor, _Layout]:
    lay = _layout(weight)
    if lay is None:
        w = weight.contiguous()
        return w, _layout(w)
    return weight, lay


def _kernel_forward(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n_iters: int, eps: float,
                    fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W / sigma with the weight's strides, u clone, v clone, sigma), computed in the weight's layout."""
    w, lay = _dense(weight)
    trailing = w.shape[1:]
    u_k = u if u.is_contiguous() else u.contiguous()
    v_k = _v_memory_order(v, trailing, lay) if lay.v_perm else v if v.is_contiguous() else v.contiguous()
    out = torch.empty_like(w)  # the layout of torch's `weight / sigma`
    rows, cols = (v_k, u_k) if lay.transposed else (u_k, v_k)
    rows_save, cols_save, sigma = _forward(_matrix(w, lay), rows, cols, n_iters, eps, fused, lay.transposed,
                                           _matrix(out, lay))
    u_save, v_save = (cols_save, rows_save) if lay.transposed else (rows_save, cols_save)
    if n_iters > 0:  # the kernels updated copies: write them back into the buffers
        if u_k is not u:
            u.copy_(u_k)
        if lay.v_perm:
            _v_logical_order(v, v_k, trailing, lay)
        elif v_k is not v:
            v.copy_(v_k)
    if lay.v_perm:
        v_save = _v_logical_order(torch.empty_like(v_save), v_save, trailing, lay)
    if w is not weight:  # dim 0 in the middle of the memory order, or a non-dense weight: one more copy
        out = torch.empty_like(weight).copy_(out)
    return out, u_save, v_save, sigma


def _kernel_backward(grad: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                     sigma: torch.Tensor, fused: bool) -> torch.Tensor:
    w, lay = _dense(weight)
    g = grad if grad.permute(lay.order).is_contiguous() else torch.empty_like(w).copy_(grad)
    v_k = _v_memory_order(v, w.shape[1:], lay) if lay.v_perm else v
    rows, cols = (v_k, u) if lay.transposed else (u, v_k)
    dw = torch.empty_like(w)
    _backward(_matrix(g, lay), _matrix(w, lay), rows, cols, sigma, fused, _matrix(dw, lay))
    return dw


# ----------------------------------------------------------------------------------------------------
# The same maths in differentiable PyTorch operations (u, v held constant), for the transforms
# ----------------------------------------------------------------------------------------------------
def _sigma_torch(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.dot(u, torch.mv(w.reshape(w.shape[0], -1), v))


def _backward_torch(grad: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``G / sigma - (<G, W> / sigma^2) u v^T`` with sigma = u^T W v recomputed, differentiable in G and W
    (double backward), vmap-able (batched gradients); float32 arithmetic, the weight's dtype out."""
    w, g = weight.float(), grad.float()
    sigma = _sigma_torch(w, u, v)
    dw = g / sigma - ((g * w).sum() / (sigma * sigma)) * torch.outer(u, v).view(w.shape)
    return dw.to(weight.dtype)


def _jvp_torch(tangent: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Forward-mode derivative ``dW / sigma - (u^T dW v / sigma^2) W``."""
    w, dw = weight.float(), tangent.float()
    sigma = _sigma_torch(w, u, v)
    return (dw / sigma - (_sigma_torch(dw, u, v) / (sigma * sigma)) * w).to(weight.dtype)


def _kernel_can_read(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can read these tensors' memory: plain tensors, not torch.func wrappers (vmap's
    batched tensors, grad/jvp levels: ops on tensors while such a level is active are re-wrapped, so its
    backward cannot hand the kernels plain memory), autograd's batched gradients or tensor subclasses."""
    functorch = torch._C._functorch
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) and not functorch.is_functorch_wrapped_tensor(t)
               and not functorch.is_legacy_batchedtensor(t) for t in tensors)


class SpectralNormFunction(torch.autograd.Function):
    """``W / sigma`` with the power iteration (in place on u, v) in forward; u, v constant in derivatives.

    ``apply(weight, u, v, n_iters, eps, fused)`` returns ``(W / sigma, u clone, v clone, sigma)``; only the
    first output is differentiable (the clones are float32, the values this forward used). Where each
    part runs:

    * forward: always the kernels. Under torch.func transforms (``grad``, ``vjp``, ``jacrev``, ``jvp``,
      ``jacfwd``, ``functional_call``) they see the unwrapped tensors; under ``vmap`` the :meth:`vmap` rule
      runs them once per batch member (training mode needs u, v batched like the weight, as an ensemble's
      stacked buffers are: torch's parametrization cannot vmap a training forward at all);
    * backward: the kernels for ordinary ``backward()`` / ``autograd.grad``. The same formula in
      differentiable PyTorch operations (u, v constant, sigma recomputed as ``u^T W v``) when the result
      must be differentiable (``create_graph=True`` with a gradient or weight that requires grad: double
      backward, gradgradcheck) or when the gradient is a batched or torch.func-wrapped tensor
      (``is_grads_batched=True``, and every torch.func transform: ``grad``, ``vjp``, ``jacrev``, ``vmap``
      of a backward, ``hessian``): the kernels cannot read such tensors' memory;
    * forward-mode (``jvp``, ``torch.autograd.forward_ad``, ``jacfwd``): PyTorch operations,
      ``dW / sigma - (u^T dW v / sigma^2) W`` (two matrix-vector products and one elementwise pass).
    """

    @staticmethod
    def forward(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n_iters: int, eps: float, fused: bool):
        with device_context(weight):
            out, u_save, v_save, sigma = _kernel_forward(weight, u, v, n_iters, eps, fused)
        if n_iters > 0:  # the buffers changed: let autograd catch any stale saved copy of them
            for buf in (u, v):
                if not buf.is_inference():
                    torch.autograd.graph.increment_version(buf)
        return out, u_save, v_save, sigma

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, fused = inputs[0], inputs[5]
        _, u_save, v_save, sigma = output
        ctx.mark_non_differentiable(u_save, v_save, sigma)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(weight, u_save, v_save, sigma)
        ctx.save_for_forward(weight, u_save, v_save)
        ctx.fused = fused

    @staticmethod
    def backward(ctx, grad, *_):
        if grad is None:
            return None, None, None, None, None, None
        weight, u_save, v_save, sigma = ctx.saved_tensors
        if (_kernel_can_read(grad, weight, u_save, v_save, sigma)
                and not (torch.is_grad_enabled() and (grad.requires_grad or weight.requires_grad))):
            # (a result that must be differentiable, double backward, takes the PyTorch formula)
            with device_context(weight):
                dw = _kernel_backward(grad, weight, u_save, v_save, sigma, ctx.fused)
        else:
            dw = _backward_torch(grad, weight, u_save, v_save)
        return dw, None, None, None, None, None

    @staticmethod
    def jvp(ctx, tangent, *_):
        weight, u_save, v_save = ctx.saved_tensors
        return None if tangent is None else _jvp_torch(tangent, weight, u_save, v_save), None, None, None

    @staticmethod
    def vmap(info, in_dims, weight, u, v, n_iters, eps, fused):
        """One kernel call per batch member. In training (``n_iters > 0``) each member updates its own
        u, v, so a batched weight needs batched buffers (e.g. an ensemble's stacked buffers); torch's
        parametrization raises there too. In eval any of weight, u, v may be batched."""
        wd, ud, vd = in_dims[:3]
        if wd is None and ud is None and vd is None:  # vmap over something else: one call
            return _apply(weight, u, v, n_iters, eps, fused), (None, None, None, None)
        if n_iters > 0 and (ud is None or vd is None):
            raise RuntimeError(
                "spectral_norm under vmap in training mode: the power iteration updates u and v in place, so "
                "they must be batched like the weight (vmap over stacked buffers), or use eval mode")

        def member(t, d, b):
            return t if d is None else t.select(d, b)

        outs = [_apply(member(weight, wd, b), member(u, ud, b), member(v, vd, b), n_iters, eps, fused)
                for b in range(info.batch_size)]
        return tuple(torch.stack(parts) for parts in zip(*outs)), (0, 0, 0, 0)


class _EagerSpectralNormFunction(torch.autograd.Function):
    """:class:`SpectralNormFunction` in the ctx style (same forward, backward and jvp), applied when no
    torch.func transform is active: torch binds the arguments of a Function that defines
    ``setup_context`` with ``inspect.signature`` on every ``apply``, which tripled the host time of a
    forward. Double backward, batched gradients and forward-mode AD work the same through it."""

    @staticmethod
    def forward(ctx, *args):
        output = SpectralNormFunction.forward(*args)
        SpectralNormFunction.setup_context(ctx, args, output)
        return output

    backward = staticmethod(SpectralNormFunction.backward)
    jvp = staticmethod(SpectralNormFunction.jvp)


def _apply(*args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if torch._C._are_functorch_transforms_active():
        return SpectralNormFunction.apply(*args)
    return _EagerSpectralNormFunction.apply(*args)


def spectral_normalize(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n_power_iterations: int,
                       eps: float = 1e-12, *, max_fused_elements: Optional[int] = None) -> torch.Tensor:
    """``W / sigma_max(W)`` by power iteration, torch's parametrization maths in fused Triton kernels.

    Args:
        weight: the C x H matrix, or an N-D weight whose dim 0 are the rows and the other dims, flattened,
            the columns (torch's ``dim=0``); float32, float16 or bfloat16; differentiable (see
            :class:`SpectralNormFunction` for double backward, torch.func transforms and forward mode).
        u, v: the left (C) and right (H) singular-vector estimates, updated in place when
            ``n_power_iterations > 0``; no gradient.
        n_power_iterations: iterations to run (0: eval, sigma from the stored u, v); any integer type.
        eps: floor of the norms in the normalisations (``max(||x||, eps)``; 0 is allowed, as in torch).
        max_fused_elements: padded C x H size up to which one program does everything (default
            ``MAX_FUSED_ELEMENTS``); larger heads take the tiled path.

    Returns:
        ``W / sigma`` in the weight's dtype and with the weight's strides (the kernels read and write the
        weight's memory in place of a contiguous copy when dim 0 is its outermost or innermost dimension:
        contiguous, transposed and channels_last weights; otherwise they run on a contiguous copy and the
        result is copied into the weight's layout).
    """
    if not isinstance(weight, torch.Tensor) or weight.ndim < 2 or weight.numel() == 0:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a non-empty 2-D (or N-D, rows in dim 0) tensor, got {got}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"weight dtype must be one of {SUPPORTED_DTYPES}, got {weight.dtype}")
    C = weight.shape[0]
    H = weight.numel() // C
    for name, vec, n in (("u", u, C), ("v", v, H)):
        if not isinstance(vec, torch.Tensor) or tuple(vec.shape) != (n,):
            got = tuple(vec.shape) if isinstance(vec, torch.Tensor) else type(vec).__name__
            raise ValueError(f"{name} must be a vector of length {n} for a {C}x{H} weight, got {got}")
        if vec.dtype not in SUPPORTED_DTYPES or vec.device != weight.device or vec.requires_grad:
            raise ValueError(f"{name} must be a {SUPPORTED_DTYPES} buffer on {weight.device} without grad, "
                             f"got {vec.dtype} on {vec.device} (requires_grad={vec.requires_grad})")
    try:
        if isinstance(n_power_iterations, bool):
            raise TypeError
        n_iters = operator.index(n_power_iterations)
    except TypeError:
        raise ValueError(f"n_power_iterations must be an integer >= 0, got {n_power_iterations!r}") from None
    if n_iters < 0:
        raise ValueError(f"n_power_iterations must be an integer >= 0, got {n_power_iterations!r}")
    eps = float(eps)
    if math.isnan(eps):
        raise ValueError(f"eps must be a number, got {eps!r}")
    if max_fused_elements is not None and max_fused_elements < 0:
        raise ValueError(f"max_fused_elements must be >= 0, got {max_fused_elements}")
    fused = fits_one_program(C, H, max_fused_elements)
    return _apply(weight, u, v, n_iters, eps, fused)[0]


# How triton.jit built the kernels when this module was imported (r3f_opt._dispatch reads it).
INTERPRETED = type(_normalize).__name__ == "InterpretedFunction"
