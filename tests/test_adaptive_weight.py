"""adaptive_weight: ‖∇_W main‖ / (‖∇_W aux‖ + 1e-4), clamped to [0, 1e8], detached, times scale."""

from __future__ import annotations

import pytest
import torch

from rectok_fast.nn import adaptive_weight
from rectok_fast.nn.adaptive import ADAPTIVE_EPS, ADAPTIVE_MAX


def _tiny_model():
    torch.manual_seed(0)
    enc = torch.nn.Linear(6, 8)
    dec = torch.nn.Linear(8, 4)  # dec.weight is the "last layer"
    x = torch.randn(5, 6)
    y = torch.randn(5, 4)
    out = dec(torch.tanh(enc(x)))
    main = (out - y).abs().mean()  # reconstruction
    aux = -out.sigmoid().log().mean()  # a GAN-generator-like term
    return dec, enc, main, aux


def _hand_written(main, aux, w, scale):
    """The same computation with .backward() and .grad, no shared code."""
    w.grad = None
    main.backward(retain_graph=True)
    gm = w.grad.detach().clone()
    w.grad = None
    aux.backward(retain_graph=True)
    ga = w.grad.detach().clone()
    w.grad = None
    r = gm.double().pow(2).sum().sqrt() / (ga.double().pow(2).sum().sqrt() + 1e-4)
    return (min(max(r.item(), 0.0), 1e8)) * scale


@pytest.mark.parametrize("scale", [1.0, 0.1, 2.5])
def test_matches_hand_written_autograd(scale):
    dec, enc, main, aux = _tiny_model()
    got = adaptive_weight(main, aux, dec.weight, scale)
    want = _hand_written(main, aux, dec.weight, scale)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert not got.requires_grad
    assert abs(got.item() - want) <= 1e-6 * abs(want)
    assert got.item() > 0


def test_does_not_touch_grads_and_keeps_graph():
    dec, enc, main, aux = _tiny_model()
    w = adaptive_weight(main, aux, dec.weight)
    assert dec.weight.grad is None and enc.weight.grad is None
    (main + w * aux).backward()  # the graphs are still alive
    assert enc.weight.grad is not None
    # the weight is a constant of the total: d total / d W = d main + w · d aux
    dec2, _, main2, aux2 = _tiny_model()
    gm = torch.autograd.grad(main2, dec2.weight, retain_graph=True)[0]
    ga = torch.autograd.grad(aux2, dec2.weight)[0]
    torch.testing.assert_close(dec.weight.grad, gm + w * ga)


def test_analytic_ratio_and_clamp_bounds():
    W = torch.zeros(3, 4, requires_grad=True)
    a = torch.arange(12.0).view(3, 4)
    b = torch.full((3, 4), 0.5)
    got = adaptive_weight((W * a).sum(), (W * b).sum(), W)
    torch.testing.assert_close(got, a.norm() / (b.norm() + ADAPTIVE_EPS))
    # aux with zero gradient: ratio |a| / 1e-4 (below the cap) and the 1e8 cap
    zero_aux = (W * 0.0).sum()
    torch.testing.assert_close(adaptive_weight((W * a).sum(), zero_aux, W), a.norm() / ADAPTIVE_EPS)
    big = adaptive_weight((W * 1e5).sum(), (W * 0.0).sum(), W, 3.0)
    assert big.item() == pytest.approx(ADAPTIVE_MAX * 3.0)
    # main with zero gradient: the lower bound 0
    assert adaptive_weight((W * 0.0).sum(), (W * b).sum(), W).item() == 0.0


def test_low_precision_last_layer_accumulates_in_fp32():
    W = torch.zeros(64, 64, dtype=torch.bfloat16, requires_grad=True)
    a = torch.randn(64, 64).bfloat16()
    b = torch.randn(64, 64).bfloat16()
    got = adaptive_weight((W * a).sum(), (W * b).sum(), W)
    assert got.dtype == torch.float32
    want = a.float().norm() / (b.float().norm() + ADAPTIVE_EPS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_errors():
    W = torch.zeros(2, 2, requires_grad=True)
    loss = (W * 2).sum()
    with pytest.raises(TypeError, match="`main_loss`"):
        adaptive_weight(1.0, loss, W)
    with pytest.raises(ValueError, match="`aux_loss`"):
        adaptive_weight(loss, W * 2, W)  # not 0-dim
    with pytest.raises(ValueError, match="`aux_loss`"):
        adaptive_weight(loss, torch.tensor(1.0), W)  # no grad
    with pytest.raises(ValueError, match="`last_layer`"):
        adaptive_weight(loss, loss, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="`aux_loss` does not depend"):
        other = torch.zeros(1, requires_grad=True)
        adaptive_weight(loss, (other * 3).sum(), W)
    with pytest.raises(TypeError, match="`scale`"):
        adaptive_weight(loss, loss, W, scale="1")


def test_host_read_free():
    """Once per step in a GAN/VF trainer: no device value is read back to the host."""
    from test_no_sync import no_host_reads

    dec, enc, main, aux = _tiny_model()
    with no_host_reads() as seen:
        adaptive_weight(main, aux, dec.weight, 0.5)
    assert seen == []
