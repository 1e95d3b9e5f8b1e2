"""Plain loops: LossHook, torch.autocast + torch.amp.GradScaler, TensorBoard logging."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from integ_helpers import OPT_KWARGS, assert_same_training, batches, make_data, make_net, plain_loop
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from bpgrad import BPGrad, MissingLossError
from bpgrad.integrations import LossHook, bpgrad_metrics, log_tensorboard


def hooked_loop(*, accum: int, autocast: torch.dtype | None, scale: float | None,
                epochs: int = 1) -> tuple[torch.nn.Module, BPGrad]:
    net = make_net()
    opt = BPGrad(net.parameters(), **OPT_KWARGS)
    hook = LossHook(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale is not None else None
    data = batches(*make_data())
    for _ in range(epochs):
        for i, (x, y) in enumerate(data):
            ctx = (torch.autocast("cpu", dtype=autocast) if autocast is not None
                   else contextlib.nullcontext())
            with ctx:
                loss = F.cross_entropy(net(x), y) / accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
            hook.add(loss)
            if (i + 1) % accum == 0 or i + 1 == len(data):
                if scaler is not None:
                    scaler.step(opt)  # bare step: the hook hands BPGrad the loss
                    scaler.update()
                else:
                    opt.step()
                opt.zero_grad()
    return net, opt


@pytest.mark.parametrize(("accum", "autocast", "scale"), [
    (1, None, None), (5, None, None), (3, torch.float16, 2.0**12), (4, torch.bfloat16, None),
])
def test_loss_hook_equals_plain_loop(accum: int, autocast: torch.dtype | None,
                                     scale: float | None) -> None:
    net, opt = hooked_loop(accum=accum, autocast=autocast, scale=scale, epochs=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale is not None else None
    ref = plain_loop(epochs=2, accum=accum, autocast=autocast, scaler=scaler)
    assert_same_training(net, opt, ref)
    # The loss BPGrad saw is the unscaled mean micro-batch loss.
    assert float(opt.stats["loss"]) == pytest.approx(ref.losses[-1], rel=1e-6)


def test_grad_scaler_skip_leaves_state_untouched() -> None:
    data = batches(*make_data())[:3]

    def run(poison: bool) -> tuple[torch.nn.Module, BPGrad, list[float]]:
        net = make_net()
        opt = BPGrad(net.parameters(), **OPT_KWARGS)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        seen = []
        for i, (x, y) in enumerate(data):
            loss = F.cross_entropy(net(x), y)
            scaler.scale(loss).backward()
            if i == 1:
                if not poison:
                    opt.zero_grad()
                    continue
                before_state = [{k: v.clone() for k, v in opt.state[p].items()}
                                for p in net.parameters()]
                before_params = [p.detach().clone() for p in net.parameters()]
                next(net.parameters()).grad[0, 0] = float("inf")
            opt.set_loss(loss)
            scaler.step(opt)
            scaler.update()
            seen.append(float(opt.stats["loss"]))
            if i == 1:
                for p, old in zip(net.parameters(), before_params, strict=True):
                    assert torch.equal(p, old)
                for p, old_state in zip(net.parameters(), before_state, strict=True):
                    for key, value in old_state.items():
                        if key == "skipped_steps":
                            continue  # the one thing a skip changes: it is counted
                        assert torch.equal(opt.state[p][key], value), key
                assert float(opt.stats["skipped_steps"]) == 1.0
                assert float(opt.stats["steps"]) == 1.0
                assert scaler.get_scale() == 2.0**7  # the scaler backed off
            opt.zero_grad()
        return net, opt, seen

    net_a, opt_a, seen = run(poison=True)
    net_b, opt_b, _ = run(poison=False)
    # The skipped step changed nothing: training continued as if the batch never happened.
    for p, q in zip(net_a.parameters(), net_b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(opt_a.stats["running_min"], opt_b.stats["running_min"])
    assert float(opt_a.stats["steps"]) == float(opt_b.stats["steps"]) == 2.0
    # BPGrad saw the unscaled loss (scale 256 would show up as a 256x larger value).
    net0 = make_net()
    assert seen[0] == pytest.approx(float(F.cross_entropy(net0(data[0][0]), data[0][1])))


def test_loss_hook_paths() -> None:
    net = make_net()
    opt = BPGrad(net.parameters(), **OPT_KWARGS)
    hook = LossHook(opt)
    x, y = batches(*make_data())[0]

    def backward() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    # nothing added and nothing set: BPGrad's own error
    backward()
    with pytest.raises(MissingLossError):
        opt.step()
    # loss= wins over (and clears) the accumulated sum
    loss = backward()
    hook.add(torch.tensor(123.0))
    opt.step(loss=loss)
    assert float(opt.stats["loss"]) == pytest.approx(float(loss))
    assert hook.pending is None
    # a closure's step sees the sum of what the closure added
    def closure() -> torch.Tensor:
        loss = backward()
        hook.add(loss, 0.5)
        hook.add(loss, 0.5)
        return loss * 1000  # ignored: the hook's sum is what BPGrad gets
    out = opt.step(closure)
    assert float(opt.stats["loss"]) == pytest.approx(float(out))
    assert float(out) < 100
    # positional closure with nothing added: the closure's value is used
    opt.step(lambda: backward())
    assert float(opt.stats["steps"]) == 3.0
    # a pending sum survives a state_dict round trip (mid-window checkpoints)
    hook.add(torch.tensor(0.25))
    hook.add(torch.tensor(0.5, dtype=torch.bfloat16))
    other = LossHook(BPGrad(make_net().parameters(), **OPT_KWARGS))
    other.load_state_dict(hook.state_dict())
    assert other.count == 2 and float(other.pending) == 0.75
    assert other.pending.dtype == torch.float32
    other.remove()
    hook.remove()
    assert hook.pending is None
    backward()
    hook.add(1.0)  # no longer registered: has no effect
    with pytest.raises(MissingLossError):
        opt.step()


def test_tensorboard_one_liner(tmp_path: Path) -> None:
    net = make_net()
    opt = BPGrad(net.parameters(), **OPT_KWARGS)
    writer = SummaryWriter(log_dir=str(tmp_path))
    etas, norms = [], []
    for step, (x, y) in enumerate(batches(*make_data())[:5]):
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step(loss=loss)
        opt.zero_grad()
        log_tensorboard(writer, opt, step)
        etas.append(float(opt.stats["eta"]))
        norms.append(float(opt.stats["grad_norm"]))
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    logged = [e.value for e in events.Scalars("bpgrad/eta")]
    assert logged == pytest.approx(etas, rel=1e-7)  # TensorBoard stores float32
    assert [e.step for e in events.Scalars("bpgrad/eta")] == list(range(5))
    assert [e.value for e in events.Scalars("bpgrad/grad_norm")] == pytest.approx(norms, rel=1e-7)
    assert {"bpgrad/running_min", "bpgrad/loss", "bpgrad/skipped_steps"} <= set(
        events.Tags()["scalars"])
    metrics = bpgrad_metrics(opt)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())


def test_metrics_per_group() -> None:
    net = make_net()
    opt = BPGrad([{"params": net[0].parameters()},
                  {"params": net[2].parameters(), "lr": 0.5}], **OPT_KWARGS)
    x, y = batches(*make_data())[0]
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    opt.step(loss=loss)
    m = bpgrad_metrics(opt)
    assert float(m["bpgrad/eta_group1"]) == pytest.approx(0.5 * float(m["bpgrad/eta_group0"]))


def test_importing_bpgrad_imports_no_framework() -> None:
    import subprocess
    import sys

    code = ("import sys, bpgrad, bpgrad.integrations, bpgrad.integrations.accelerate; "
            "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers', "
            "'accelerate', 'tensorboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
