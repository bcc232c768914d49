"""Optimizer factory and wrappers: parameter groups, Adam/SGD against torch, clipping, fp16 loss scaling, bf16
master weights, checkpoint round trips. Single process (no process groups: one replica)."""

import copy

import pytest
import torch

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_param_groups


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.norm = torch.nn.LayerNorm(3)
        self.head = torch.nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return self.head(self.norm(self.linear(x)))


def _set_lr_and_wd(optimizer, lr, weight_decay):
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)


def test_biases_and_norm_weights_are_not_decayed():
    net = TinyNet()
    groups = get_param_groups([net])
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["wd_mult"] == 1.0 and groups[1]["wd_mult"] == 0.0
    assert decayed == {id(net.linear.weight), id(net.head.weight)}

    optimizer = get_megatron_optimizer(OptimizerConfig(lr=0.1, weight_decay=0.5, clip_grad=0.0), [net])
    _set_lr_and_wd(optimizer, 0.1, 0.5)
    before = copy.deepcopy(net.state_dict())
    for param in net.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    # AdamW with a zero gradient only applies the decoupled decay: p <- p * (1 - lr * wd).
    torch.testing.assert_close(net.linear.weight, before["linear.weight"] * 0.95, rtol=0, atol=0)
    torch.testing.assert_close(net.head.weight, before["head.weight"] * 0.95, rtol=0, atol=0)
    for name in ("linear.bias", "norm.weight", "norm.bias"):
        torch.testing.assert_close(net.state_dict()[name], before[name], rtol=0, atol=0)


def test_adam_on_cpu_is_torchs_fused_kernel():
    """~6x faster than the foreach kernel on CPU; the test below holds its numbers to torch's plain AdamW."""
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=0.05), [TinyNet()])
    assert isinstance(optimizer.optimizer, torch.optim.AdamW) and optimizer.optimizer.defaults["fused"] is True


@pytest.mark.parametrize("optimizer_name", ["adam", "sgd"])
def test_fp32_steps_equal_torch_with_clipping(optimizer_name):
    torch.manual_seed(0)
    net = TinyNet()
    reference = copy.deepcopy(net)
    config = OptimizerConfig(optimizer=optimizer_name, lr=0.05, weight_decay=0.1, clip_grad=0.5, adam_beta2=0.95)
    optimizer = get_megatron_optimizer(config, [net])
    _set_lr_and_wd(optimizer, 0.05, 0.1)
    decay = [reference.linear.weight, reference.head.weight]
    no_decay = [reference.linear.bias, reference.norm.weight, reference.norm.bias]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    if optimizer_name == "adam":
        torch_optimizer = torch.optim.AdamW(groups, lr=0.05, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    else:
        torch_optimizer = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    for step in range(4):
        x = torch.randn(5, 4) * (10.0 if step == 0 else 1.0)
        net(x).square().sum().backward()
        reference(x).square().sum().backward()
        expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5).item()
        torch_optimizer.step()
        torch_optimizer.zero_grad()
        succeeded, grad_norm, _ = optimizer.step()
        optimizer.zero_grad()
        assert succeeded and grad_norm == pytest.approx(expected_norm, rel=1e-6)
        for ours, theirs in zip(net.parameters(), reference.parameters()):
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def _half_net(dtype):
    torch.manual_seed(0)
    net = TinyNet()
    for param in net.parameters():
        param.data = param.data.to(dtype)
    return net


def test_fp16_overflow_skips_the_step_and_backs_off_the_scale():
    net = _half_net(torch.float16)
    config = OptimizerConfig(lr=0.01, fp16=True, initial_loss_scale=2.0**16, hysteresis=2, loss_scale_window=2, clip_grad=0.0)
    optimizer = get_megatron_optimizer(config, [net])
    _set_lr_and_wd(optimizer, 0.01, 0.0)
    before = copy.deepcopy(net.state_dict())

    def backward(overflow):
        loss = net(torch.ones(1, 4, dtype=torch.float16)).float().sum()
        optimizer.scale_loss(loss).backward()
        if overflow:
            net.linear.weight.grad[0, 0] = float("inf")

    scales = []
    for overflow in (True, True, True, False, False, False):
        backward(overflow)
        succeeded, grad_norm, _ = optimizer.step()
        optimizer.zero_grad()
        assert succeeded is (not overflow) and (grad_norm is None) is overflow
        scales.append(optimizer.get_loss_scale())
        if overflow:
            for name, value in net.state_dict().items():
                torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    # hysteresis 2: the first overflow only spends hysteresis, then each one halves; 2 clean steps double.
    assert scales == [2.0**16, 2.0**15, 2.0**14, 2.0**14, 2.0**15, 2.0**15]
    assert not torch.equal(net.linear.weight, before["linear.weight"])


def test_fp16_unscaled_gradients_match_fp32():
    torch.manual_seed(0)
    net = _half_net(torch.float16)
    config = OptimizerConfig(optimizer="sgd", sgd_momentum=0.0, lr=1.0, fp16=True, loss_scale=1024.0, weight_decay=0.0, clip_grad=0.0)
    optimizer = get_megatron_optimizer(config, [net])
    _set_lr_and_wd(optimizer, 1.0, 0.0)
    masters = [param.detach().float().clone() for param in optimizer.model_params]
    net(torch.ones(2, 4, dtype=torch.float16)).float().sum().mul(1024.0).backward()
    grads = [param.grad.float() / 1024.0 for param in optimizer.model_params]
    optimizer.step()
    for master, grad, main in zip(masters, grads, optimizer.main_params):
        torch.testing.assert_close(main, master - grad, rtol=0, atol=1e-6)


def test_bf16_master_weights_keep_updates_below_bf16_resolution():
    net = _half_net(torch.bfloat16)
    with torch.no_grad():
        net.head.weight.fill_(1.0)
    config = OptimizerConfig(optimizer="sgd", sgd_momentum=0.0, lr=1e-4, bf16=True, weight_decay=0.0, clip_grad=0.0)
    optimizer = get_megatron_optimizer(config, [net])
    _set_lr_and_wd(optimizer, 1e-4, 0.0)
    head_master = optimizer.get_parameters()[[id(p) for p in optimizer.model_params].index(id(net.head.weight))]
    assert head_master.dtype == torch.float32 and net.head.weight.dtype == torch.bfloat16
    for _ in range(30):
        net.head.weight.grad = torch.ones_like(net.head.weight)
        optimizer.step()
        optimizer.zero_grad()
    # 30 updates of 1e-4 each: lost in bf16 (spacing 2^-7 near 1), kept by the fp32 master.
    torch.testing.assert_close(head_master, torch.full_like(head_master, 1.0 - 30e-4), rtol=0, atol=1e-6)
    assert torch.equal(net.head.weight, head_master.to(torch.bfloat16))


def test_mixed_precision_state_dict_round_trip_continues_identically():
    def run(steps, optimizer, net, seed):
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            loss = net(torch.randn(3, 4, generator=generator).to(torch.float16)).float().square().sum()
            optimizer.scale_loss(loss).backward()
            optimizer.step()
            optimizer.zero_grad()

    def build():
        net = _half_net(torch.float16)
        config = OptimizerConfig(lr=0.01, fp16=True, initial_loss_scale=2.0**20, loss_scale_window=3)
        optimizer = get_megatron_optimizer(config, [net])
        _set_lr_and_wd(optimizer, 0.01, 0.01)
        return net, optimizer

    net, optimizer = build()
    run(3, optimizer, net, seed=1)
    saved_model, saved_optimizer = copy.deepcopy(net.state_dict()), copy.deepcopy(optimizer.state_dict())
    run(3, optimizer, net, seed=2)

    resumed_net, resumed_optimizer = build()
    resumed_net.load_state_dict(saved_model)
    resumed_optimizer.load_state_dict(saved_optimizer)
    assert resumed_optimizer.get_loss_scale() == saved_optimizer["grad_scaler"]["scale"]
    run(3, resumed_optimizer, resumed_net, seed=2)
    for name, value in net.state_dict().items():
        assert torch.equal(value, resumed_net.state_dict()[name]), name
    assert resumed_optimizer.get_loss_scale() == optimizer.get_loss_scale()
