"""Sign with straight-through gradients, the binarizer every binary layer builds on.

Forward is exact and shared with the deployed kernels: ``+1 where u >= 0, else -1`` (never 0).
Backward treats the sign as a function of ``u / window``, so the gradient window follows the scale of
the values being binarized (a 1-bit LSQ): with ``window = alpha`` the layer ``alpha * sign(u)`` gets the
gradients ``1{|u| <= alpha}`` for ``u`` and ``sign(u) - u / alpha * 1{|u| <= alpha}`` for ``alpha``.
"""

from __future__ import annotations

from typing import Literal

import torch

SteKind = Literal["clipped", "approx"]


def sign_pm1(u: torch.Tensor) -> torch.Tensor:
    """The binarization of the forward pass: +1 for u >= 0, -1 otherwise (NaN included).

    Written as ``2 * (u >= 0) - 1``: on CPU ``torch.where`` with scalar branches took 5x as long.
    """
    return (u >= 0).to(u.dtype).mul_(2).sub_(1)


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, window: torch.Tensor, kind: str) -> torch.Tensor:
        ctx.save_for_backward(u, window)
        ctx.kind = kind
        return sign_pm1(u)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # With v = u / window: d sign(v)/du = dv / window and d/dwindow = -dv * u / window^2, where dv is
        # clipped: 1 inside |v| <= 1; approx (ApproxSign, Bi-Real Net): 2 - 2|v| inside [-1, 1].
        # One full-size buffer, reused in place: the activations' sign was a quarter of a training step on CPU.
        u, window = ctx.saved_tensors
        if ctx.kind == "clipped":
            g = u.abs().le_(window.abs()).mul_(grad)  # the window's 0/1 mask, then the clipped gradient
        else:
            g = u.div(window).abs_().mul_(-2).add_(2).clamp_min_(0).mul_(grad)
        grad_window = None
        if ctx.needs_input_grad[1]:
            grad_window = _sum_to_shape(g * u, window.shape).div_(window * window).neg_()
        grad_u = g.div_(window) if ctx.needs_input_grad[0] else None
        return grad_u, grad_window, None


def sign_ste(u: torch.Tensor, window: torch.Tensor | float = 1.0, kind: SteKind = "clipped") -> torch.Tensor:
    """``sign_pm1(u)`` whose gradient is that of ``sign(u / window)`` with the chosen STE."""
    if not isinstance(window, torch.Tensor):
        window = torch.tensor(float(window), dtype=u.dtype, device=u.device)
    return _SignSTE.apply(u, window, kind)


def _sum_to_shape(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast gradient back to the shape of the tensor it was broadcast from (one reduction)."""
    lead = t.dim() - len(shape)
    dims = tuple(range(lead)) + tuple(lead + d for d, size in enumerate(shape) if size == 1 and t.shape[lead + d] != 1)
    return t.sum(dim=dims, keepdim=True).reshape(shape) if dims else t
