"""Forcing the symmetric-KL launcher's tiling paths in tests (small shapes, under the interpreter).

``sym_kl._plan`` is what the launcher asks for its plan; these wrap it and replace fields, so everything
not forced stays the launcher's own decision. ``kernel_launches`` (by kernel name) proves which path ran.
"""
import torch
import triton

from r3f_opt.kernels import sym_kl


def force_plan(monkeypatch, **fields):
    """Replace these fields of every plan (see ``sym_kl.Plan``)."""
    real = sym_kl._plan

    def forced(n_rows, vocab, a, b):
        return real(n_rows, vocab, a, b)._replace(**fields)

    monkeypatch.setattr(sym_kl, "_plan", forced)


def small_tiles(monkeypatch, block=16, chunk=32, aligned=None):
    """Columns path with tiny tiles (4 lanes of 4 columns: many loop iterations) and rows split over
    programs of ``chunk`` columns (the merge kernel). ``aligned``: force the aligned body + edges path
    (ALIGN 4) or the strided one; None keeps the launcher's choice (aligned for contiguous inputs)."""
    real = sym_kl._plan

    def forced(n_rows, vocab, a, b):
        p = real(n_rows, vocab, a, b)
        on = (p.rows == 0 and p.align > 1) or (p.rows > 0 and a.is_contiguous() and b.is_contiguous())
        on = on if aligned is None else aligned
        return p._replace(rows=0, lanes=block // 4, vec=4, chunk=chunk, bwd_block=block, align=4 if on else 1)

    monkeypatch.setattr(sym_kl, "_plan", forced)


def rows_path(monkeypatch, rows=4):
    """The rows path (``rows`` whole rows per program) whatever V is."""
    real = sym_kl._plan

    def forced(n_rows, vocab, a, b):
        return real(n_rows, vocab, a, b)._replace(rows=rows, bv=triton.next_power_of_2(vocab))

    monkeypatch.setattr(sym_kl, "_plan", forced)


def lane_vs_row_rows(dtype=torch.float32):
    """Rows of 40 columns for ``small_tiles(monkeypatch, 16, ...)`` (4 lanes x 4 columns): lane 0 reads columns
    0-3, 16-19 and 32-35, all near -150; the row's maximum 0 is column 5, in lane 1. Each row has -inf on one
    side only where the other side's probability is positive against lane 0's maximum but underflows against
    the row's. Rows: 0: -inf in p (contributes 0); 1: in q; 2: both sides, different columns; 3: one in lane 0
    (0) and one in lane 1 facing N(0, 1) (+inf); 4: the control, -inf facing -10 (+inf); 5: like 4, for a
    row mask."""
    neg_inf = float("-inf")
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(6, 40, generator=g), torch.randn(6, 40, generator=g)
    lane0 = [0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35]
    for x in (a, b):
        x[:, lane0] = -150.0 + torch.rand(6, len(lane0), generator=g)
        x[:, 5] = 0.0
    a[0, 17] = neg_inf
    b[1, 33] = neg_inf
    a[2, 2], b[2, 18] = neg_inf, neg_inf
    a[3, 17], b[3, 7] = neg_inf, neg_inf
    a[4, 17], b[4, 17] = neg_inf, -10.0
    a[5, 17], b[5, 17] = neg_inf, -10.0
    return a.to(dtype), b.to(dtype)
