"""NullConditioningCache: a backbone's null condition is computed once and reused while
the weights it reads are unchanged, never reused where gradients must reach them, and
its kept tensors stay usable with autograd."""

from __future__ import annotations

import torch
from torch import nn

from mdmrl.interfaces import NullConditioningCache
from mdmrl.trajectory import Conditioning


class Tower(nn.Module):
    """A stand-in text tower: the null condition is a function of its weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(4, 3)
        self.cache = NullConditioningCache()
        self.calls = 0

    def encode(self, b: int) -> Conditioning:
        self.calls += 1
        h = self.proj(torch.ones(b, 2, 4))
        return Conditioning(hidden=h, pooled=h.mean(1), attention_mask=torch.ones(b, 2, dtype=torch.bool))

    def null(self, b: int, extra=None) -> Conditioning:
        return self.cache.get(b, self.parameters(), lambda: self.encode(b), extra=extra)


def test_reused_while_the_key_is_the_same():
    t = Tower()
    with torch.no_grad():
        first = t.null(3)
        assert t.null(3) is first and t.calls == 1
        assert t.null(2).hidden.shape[0] == 2 and t.calls == 2  # another batch size
        t.null(2, extra="bf16")
        assert t.calls == 3  # another extra key
        t.null(2, extra="bf16")
        assert t.calls == 3


def test_an_optimizer_step_computes_it_again():
    t = Tower()
    with torch.no_grad():
        before = t.null(2)
    opt = torch.optim.SGD(t.parameters(), lr=0.5)
    t.proj(torch.ones(1, 4)).sum().backward()
    opt.step()
    with torch.no_grad():
        after = t.null(2)
        assert after is not before and t.calls == 2
        assert torch.equal(after.hidden, t.encode(2).hidden)
        assert not torch.equal(after.hidden, before.hidden)


def test_never_reused_where_gradients_must_flow():
    t = Tower()
    with torch.no_grad():
        t.null(2)
    a, b = t.null(2), t.null(2)  # gradients on, weights that require grad
    assert a is not b and t.calls == 3
    assert a.hidden.grad_fn is not None
    a.hidden.sum().backward()
    assert t.proj.weight.grad is not None and bool(t.proj.weight.grad.abs().sum() > 0)


def test_frozen_weights_are_reused_with_gradients_on():
    t = Tower().requires_grad_(False)
    a, b = t.null(2), t.null(2)
    assert a is b and t.calls == 1 and a.hidden.grad_fn is None


def test_kept_in_inference_mode_then_used_with_autograd():
    """The sampler runs in inference mode; the kept tensors must still be ordinary ones
    for a later forward with gradients on (as the aMUSEd and Meissonic replays use it)."""
    t = Tower().requires_grad_(False)
    with torch.inference_mode():
        kept = t.null(2)
    assert not kept.hidden.is_inference() and kept.hidden.grad_fn is None
    w = torch.ones(3, requires_grad=True)
    (t.null(2).hidden * w).sum().backward()
    assert t.calls == 1 and w.grad is not None
