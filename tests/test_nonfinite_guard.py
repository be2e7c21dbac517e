"""The non-finite-step guard: one fused check and one host sync per step, fp16 grad-scaler skips accounted,
a DeepSpeed optimizer refused. (Its end-to-end runs, one process and two, are in test_faults/test_distributed.)"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from dpo_lean import faults, train
from dpo_lean.errors import DpoLeanError


def _params(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(3, 4, generator=g)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(3, 4, generator=g)
    return params


@pytest.fixture
def host_reads(monkeypatch):
    """Every read of a tensor's value into Python (a host sync on a GPU), by method name."""
    reads = []
    for name in ("__bool__", "item", "tolist", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            reads.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def test_a_step_is_checked_with_one_host_read_for_all_gradients(host_reads):
    params = _params()
    optimizer = torch.optim.SGD(params, lr=0.1)
    guard = faults.NonFiniteGuard(skip=True)
    guard.wrap(optimizer, lambda: 1)
    guard.observe(torch.arange(4), torch.ones(4))
    before = [p.detach().clone() for p in params]
    optimizer.step()
    assert host_reads == ["item"]  # 50 gradients and the losses: one fused check, one sync
    assert all(not torch.equal(p, b) for p, b in zip(params, before))  # the step was applied


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_non_finite_gradient_element_skips_the_step(bad, capsys):
    params = _params()
    params[17].grad[2, 1] = bad
    optimizer = torch.optim.SGD(params, lr=0.1)
    guard = faults.NonFiniteGuard(skip=True)
    guard.wrap(optimizer, lambda: 5)
    guard.observe(torch.tensor([3, 9]), torch.ones(2))
    before = [p.detach().clone() for p in params]
    optimizer.step()
    assert guard.skipped == 1 and all(torch.equal(p, b) for p, b in zip(params, before))
    assert "step 5: non-finite loss or gradients; step skipped (rows [3, 9])" in capsys.readouterr().err


def test_a_non_finite_loss_with_finite_gradients_stops_by_default():
    params = _params(3)
    optimizer = torch.optim.SGD(params, lr=0.1)
    guard = faults.NonFiniteGuard(skip=False)
    guard.wrap(optimizer, lambda: 2)
    guard.observe(torch.tensor([0, 1]), torch.tensor([0.7, 0.6]))
    guard.observe(torch.tensor([4, 5]), torch.tensor([0.7, float("nan")]))  # the second micro-batch of the step
    with pytest.raises(faults.NonFiniteStep) as err:
        optimizer.step()
    assert err.value.step == 2 and err.value.rows == [0, 1, 4, 5]


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)


def _scaled_step(accelerator, guard, params, grad_value):
    """One optimizer step through accelerate's AcceleratedOptimizer with a grad scaler, as Trainer runs fp16."""
    from accelerate.optimizer import AcceleratedOptimizer

    optimizer = torch.optim.SGD(params, lr=0.1)
    guard.wrap(optimizer, lambda: 1)
    scaler = torch.amp.GradScaler("cpu")
    wrapped = AcceleratedOptimizer(optimizer, device_placement=False, scaler=scaler)
    accelerator._optimizers = [wrapped]
    for p in params:
        p.grad = None
    scaler.scale(sum(p.sum() for p in params)).backward()
    params[0].grad[0, 0] = grad_value
    wrapped.step()
    guard.on_optimizer_step(None, SimpleNamespace(global_step=6), None)


def test_a_step_the_fp16_grad_scaler_skips_is_counted_and_reported(accelerator, capsys):
    params = _params(4)
    guard = faults.NonFiniteGuard(skip=False)
    guard.accelerator = accelerator
    guard.observe(torch.tensor([11, 12]), torch.ones(2))
    before = [p.detach().clone() for p in params]
    _scaled_step(accelerator, guard, params, float("inf"))  # overflow: the scaler skips, the guard never runs
    assert accelerator.optimizer_step_was_skipped and guard.scaler_skipped == 1 and guard.skipped == 0
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    err = capsys.readouterr().err
    assert "step 7: fp16 gradients overflowed" in err and "rows [11, 12]" in err
    guard.observe(torch.tensor([13]), torch.ones(1))  # the next step starts with its own rows only
    _scaled_step(accelerator, guard, params, 1.0)
    assert not accelerator.optimizer_step_was_skipped and guard.scaler_skipped == 1
    assert guard.rows() == []  # reset after the step
    assert not all(torch.equal(p, b) for p, b in zip(params, before))


def test_a_scaler_skipped_step_with_a_non_finite_loss_is_a_non_finite_step(accelerator):
    params = _params(2)
    guard = faults.NonFiniteGuard(skip=False)
    guard.accelerator = accelerator
    guard.observe(torch.tensor([21]), torch.tensor([float("nan")]))
    with pytest.raises(faults.NonFiniteStep) as err:
        _scaled_step(accelerator, guard, params, float("nan"))
    assert err.value.rows == [21]


@pytest.mark.parametrize("inline", [False, True])
def test_a_deepspeed_config_with_its_own_optimizer_is_refused(tiny_config, tmp_path, inline):
    ds = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}, "zero_optimization": {"stage": 2}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    config = tiny_config(deepspeed=json.dumps(ds) if inline else str(path))
    with pytest.raises(DpoLeanError) as err:
        train.training_arguments(config, has_eval=False)
    message = str(err.value)
    assert "config key 'deepspeed'" in message and "optimizer" in message and "\n" not in message


@pytest.mark.cuda
def test_cuda_guard_synchronises_once_per_step():
    """On a GPU: the guard's check of 50 gradient tensors makes one device-to-host sync (sync debug mode warns)."""
    import warnings

    params = [torch.nn.Parameter(p.detach().cuda()) for p in _params()]
    for p, q in zip(params, _params()):
        p.grad = q.grad.cuda()
    optimizer = torch.optim.SGD(params, lr=0.1, foreach=True)
    guard = faults.NonFiniteGuard(skip=True)
    guard.wrap(optimizer, lambda: 1)
    guard.observe(torch.arange(4, device="cuda"), torch.ones(4, device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len([w for w in caught if "synchroniz" in str(w.message)]) == 1


@pytest.mark.cuda
def test_cuda_fp16_step_the_grad_scaler_skips_is_counted(tiny_config, tmp_path, monkeypatch):
    """On a GPU in fp16: a loss scaled up 1e10 at step 3 overflows the scaled fp16 gradients; the grad scaler skips
    the step, and training counts it (grad_scaler_steps_skipped) instead of stopping or losing count."""
    from test_faults import _poison_step  # the patch test_faults' NaN tests run on any CPU

    _poison_step(monkeypatch, 3, 1e10)
    config = tiny_config(bf16=False, fp16=True, max_steps=6, logging_steps=1, save_strategy="no", val_size=0,
                         per_device_train_batch_size=2, output_dir=str(tmp_path / "out"))
    train.run_train(config)
    summary = json.loads((config.metrics_dir / "summary.json").read_text())
    assert summary["grad_scaler_steps_skipped"] >= 1 and summary["nonfinite_steps_skipped"] == 0
    assert summary["global_step"] == 6
