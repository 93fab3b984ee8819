"""The straight-through sign: exact forward, and the gradients its docstring states for both STE kinds."""

import pytest
import torch

from srbinarize.layers.ste import sign_ste


@pytest.mark.parametrize("kind", ["clipped", "approx"])
@pytest.mark.parametrize("window_shape", [(), (1, 3, 1, 1), (3, 1, 1)])
def test_sign_ste_gradients_match_the_formula(kind, window_shape):
    torch.manual_seed(len(window_shape))
    u = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    u[0, 0, 0, :2] = torch.tensor([0.0, -0.0])
    u = u.requires_grad_()
    window = (0.5 + torch.rand(window_shape, dtype=torch.float64)).requires_grad_()
    upstream = torch.randn(u.shape, dtype=torch.float64)
    out = sign_ste(u, window, kind)
    assert torch.equal(out, torch.where(u >= 0, 1.0, -1.0).to(out.dtype))  # +1 at 0 and -0, never 0
    out.backward(upstream)

    v = (u / window).detach()
    dv = (v.abs() <= 1).double() if kind == "clipped" else (2 - 2 * v.abs()).clamp_min(0)
    g = upstream * dv
    expected_u = g / window.detach()
    expected_window = (-(g * u.detach()) / window.detach() ** 2).sum_to_size(window.shape)
    torch.testing.assert_close(u.grad, expected_u, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(window.grad, expected_window, rtol=1e-10, atol=1e-12)


def test_sign_ste_float_window_and_no_window_gradient():
    u = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    sign_ste(u, 1.0).sum().backward()
    assert u.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # 1 inside the window |u| <= 1, 0 outside
