"""Plain float64 reference for symmetric_kl (the reference implementation's kl_div formula) and a checker."""
import torch
import torch.nn.functional as F

from helpers import TOLERANCES
from r3f_opt import symmetric_kl


def reference_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(P||Q) + KL(Q||P) per row in float64, as the reference writes it: kl_div(log_softmax, softmax)."""
    a, b = a.double(), b.double()
    kl_pq = F.kl_div(F.log_softmax(b, -1), F.softmax(a, -1), reduction="none")
    kl_qp = F.kl_div(F.log_softmax(a, -1), F.softmax(b, -1), reduction="none")
    return (kl_pq + kl_qp).sum(-1)


def reference(a, b, mask=None, reduction="batchmean"):
    if mask is None:
        rows = reference_rows(a, b)
    else:  # only the counted rows enter the graph (masked rows may be all -inf)
        rows = torch.zeros(mask.shape, dtype=torch.float64).masked_scatter(mask, reference_rows(a[mask], b[mask]))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "batchmean":  # a 1-D input is one row
        return rows.sum() / (a.shape[0] if a.dim() > 1 else 1)
    n = mask.sum() if mask is not None else rows.numel()
    return rows.sum() / max(int(n), 1)


def check(a, b, mask=None, reduction="batchmean", upstream=None, rtol=TOLERANCES[torch.float32]["rtol"],
          atol=TOLERANCES[torch.float32]["atol"]):
    """Loss and both gradients of symmetric_kl vs the float64 reference through autograd.

    The loss is float32 whatever the inputs; gradients come back in each input's dtype, so they are
    compared at that dtype's rounding (``helpers.TOLERANCES``).
    """
    a1, b1 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    a2, b2 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    got = symmetric_kl(a1, b1, mask=mask, reduction=reduction)
    want = reference(a2, b2, mask=mask, reduction=reduction)
    expected_dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    assert got.dtype == expected_dtype
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)
    g = torch.randn_like(want) if upstream is None else upstream
    (got * g.to(got.dtype)).sum().backward()
    (want * g).sum().backward()
    assert a1.grad.dtype == a.dtype and b1.grad.dtype == b.dtype
    for got_grad, want_grad in ((a1.grad, a2.grad), (b1.grad, b2.grad)):
        t = TOLERANCES[got_grad.dtype] if got_grad.dtype in (torch.float16, torch.bfloat16) else dict(rtol=rtol, atol=atol)
        torch.testing.assert_close(got_grad.double(), want_grad, **t)
    return got
