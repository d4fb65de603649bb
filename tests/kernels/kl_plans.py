"""Forcing the symmetric-KL launcher's tiling paths in tests (small shapes, under the interpreter).

``sym_kl._plan`` is what the launcher asks for its plan; these wrap it and replace fields, so everything
not forced stays the launcher's own decision. ``kernel_launches`` (by kernel name) proves which path ran.
"""
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
