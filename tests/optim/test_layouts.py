"""Any tensor layout, the same update: views with gaps, transposes, channels-last and gradients
assigned with another layout give, for every kernel, what the loop kernel gives on contiguous
copies (torch's CPU _fused_sgd_ mishandles mismatched strides; BPGrad must not inherit that)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from bpgrad import BPGrad

KERNELS = {
    "default": {},
    "fused": dict(fused=True),
    "foreach": dict(foreach=True),
    "loop": dict(foreach=False, fused=False),
}


def gapped() -> torch.Tensor:  # torch's own construction in its optimizer tests
    return torch.randn(10, 5, 2, dtype=torch.float64)[..., 0]


def transposed() -> torch.Tensor:
    return torch.randn(5, 10, dtype=torch.float64).t()


def channels_last() -> torch.Tensor:
    return torch.randn(3, 4, 5, 2, dtype=torch.float64).to(memory_format=torch.channels_last)


def strided_slice() -> torch.Tensor:
    return torch.randn(10, 10, dtype=torch.float64)[:, ::2]


LAYOUTS: dict[str, Callable[[], torch.Tensor]] = {
    "gapped view": gapped, "transposed": transposed, "channels-last": channels_last,
    "slice [:, ::2]": strided_slice,
}


def train(params: list[torch.nn.Parameter], kernel: dict, steps: int = 10,
          grad_layout: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    gen = torch.Generator().manual_seed(1)
    opt = BPGrad(params, lipschitz=20.0, weight_decay=1e-3, **kernel)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(((p.reshape(-1) * torch.randn(p.numel(), generator=gen,
                                                  dtype=torch.float64)).sum() - 1.0).square()
                   for p in params)
        loss.backward()
        if grad_layout is not None:
            for p in params:
                p.grad = grad_layout(p.grad)
        opt.step(loss=loss)
    return float(loss.detach())


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_kernel_on_every_layout_equals_the_loop_kernel_on_contiguous_copies(
        layout: str, kernel: str) -> None:
    torch.manual_seed(0)
    odd = [torch.nn.Parameter(LAYOUTS[layout]()), torch.nn.Parameter(torch.randn(
        4, dtype=torch.float64))]
    assert not all(p.is_contiguous() for p in odd[:1])
    plain = [torch.nn.Parameter(p.detach().contiguous().clone()) for p in odd]
    train(odd, KERNELS[kernel])
    train(plain, KERNELS["loop"])
    for a, b in zip(odd, plain, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_gradients_assigned_with_another_layout(kernel: str) -> None:
    torch.manual_seed(0)
    odd = [torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64))]
    plain = [torch.nn.Parameter(odd[0].detach().clone())]

    def transpose_layout(g: torch.Tensor) -> torch.Tensor:
        return g.t().contiguous().t()  # same values, column-major strides

    train(odd, KERNELS[kernel], grad_layout=transpose_layout)
    train(plain, KERNELS["loop"])
    torch.testing.assert_close(odd[0].detach(), plain[0].detach(), rtol=1e-12, atol=1e-12)


def test_the_issue_case_no_longer_diverges() -> None:
    # Ten default steps on (w x + b)^2 with non-contiguous w, b: the same loss as contiguous.
    def run(contiguous: bool) -> float:
        torch.manual_seed(0)
        w = torch.randn(10, 5, 2)[..., 0]
        b = torch.randn(10, 2)[:, 0]
        if contiguous:
            w, b = w.contiguous(), b.contiguous()
        w, b = torch.nn.Parameter(w), torch.nn.Parameter(b)
        x = torch.randn(5)
        opt = BPGrad([w, b], lipschitz=20.0)
        for _ in range(10):
            opt.zero_grad()
            loss = (w.mv(x) + b).pow(2).sum()
            loss.backward()
            opt.step(loss=loss)
        return float((w.mv(x) + b).pow(2).sum())

    torch.testing.assert_close(run(False), run(True), rtol=1e-5, atol=1e-7)
