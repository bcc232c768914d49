"""Gradient-accumulation fusion: linear layers add their weight gradients straight into DistributedDataParallel's
main_grad buffers. Same gradients as the hook path, no `.grad` for the fused weights, and with overlapped
reduction every bucket starts only once all of its gradients are complete."""

import pytest
import torch

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBuffer
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    linear_with_grad_accumulation_and_async_allreduce,
)
from tests.unit_tests.core.models.test_gpt_model import make_model, tokens


def _ddp(model, **ddp_flags):
    return DistributedDataParallel(model.config, DistributedDataParallelConfig(**ddp_flags), model)


def _main_grads_after_two_micro_batches(fusion, legacy=False, ddp_flags=None, **model_fields):
    """(main_grads, names of the parameters that received a `.grad`, the wrapped model)."""
    module = make_model(legacy, gradient_accumulation_fusion=fusion, **model_fields)
    names = {param: name for name, param in module.named_parameters()}
    with_dot_grad = set()

    def note_dot_grad(param):
        if param.grad is not None:
            with_dot_grad.add(names[param])

    for param in module.parameters():  # before DistributedDataParallel's hook, which moves `.grad` away
        param.register_post_accumulate_grad_hook(note_dot_grad)
    model = _ddp(module, **(ddp_flags or {}))
    ids = tokens(length=13, batch=4)
    positions = torch.arange(12).expand(2, -1)  # multi-token prediction shifts them
    model.zero_grad_buffer()
    with model.no_sync():
        model(ids[:2, :-1], positions, None, labels=ids[:2, 1:]).mean().backward()
    model(ids[2:, :-1], positions, None, labels=ids[2:, 1:]).mean().backward()
    model.finish_grad_sync()
    return {names[p]: p.main_grad.clone() for p in module.parameters()}, with_dot_grad, model


@pytest.mark.parametrize("legacy", [False, True], ids=["mcore", "legacy"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fused_main_grads_equal_the_hook_path_and_skip_dot_grad(legacy, tied):
    fields = dict(share_embeddings_and_output_weights=tied, add_bias_linear=True)
    expected, with_dot_grad_unfused, _ = _main_grads_after_two_micro_batches(False, legacy, **fields)
    actual, with_dot_grad_fused, model = _main_grads_after_two_micro_batches(True, legacy, **fields)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    own_linear_weights = {
        f"{name}.weight" for name, module in model.module.named_modules()
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and module.weight is not None
    }
    assert len(own_linear_weights) >= 7  # 3 layers x 2 projections + the output layer (or the legacy copy)
    assert with_dot_grad_unfused == set(expected)
    assert with_dot_grad_fused == set(expected) - own_linear_weights
    assert all(p.grad is None for p in model.module.parameters())


@pytest.mark.parametrize("legacy", [False, True], ids=["mcore", "legacy"])
def test_recomputed_layers_fuse_the_same_gradients(legacy):
    """Activation recomputation hands backward the recomputed saved tensors, plain tensors without main_grad."""
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    expected, _, _ = _main_grads_after_two_micro_batches(False, legacy)
    actual, with_dot_grad, model = _main_grads_after_two_micro_batches(True, legacy, **recompute)
    assert not any(".linear_fc1." in name or ".dense_h_to_4h." in name for name in with_dot_grad)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_low_precision_weights_add_the_same_product_into_fp32_main_grads():
    fields = dict(params_dtype=torch.bfloat16, bf16=True)
    ddp_flags = dict(grad_reduce_in_fp32=True)
    expected, _, _ = _main_grads_after_two_micro_batches(False, ddp_flags=ddp_flags, **fields)
    actual, _, _ = _main_grads_after_two_micro_batches(True, ddp_flags=ddp_flags, **fields)
    for name in expected:
        assert actual[name].dtype == torch.float32
        assert torch.equal(actual[name], expected[name]), name


@pytest.mark.parametrize("model_fields", [dict(share_embeddings_and_output_weights=True), dict(mtp_num_layers=1)],
                         ids=["tied", "mtp"])
def test_overlapped_buckets_start_only_when_complete(monkeypatch, model_fields):
    """Small buckets reduce as soon as their last gradient reports; at data-parallel size 1 the reduction is the
    identity, so what a bucket holds when it starts must already be its final gradient."""
    expected, _, _ = _main_grads_after_two_micro_batches(False, **model_fields)
    at_start = []
    start = _ParamAndGradBuffer.start_bucket_sync

    def record(buffer, bucket, async_op):
        if not bucket.communication_issued:
            at_start.append((bucket, bucket.grad_data.clone(), async_op))
        return start(buffer, bucket, async_op)

    monkeypatch.setattr(_ParamAndGradBuffer, "start_bucket_sync", record)
    flags = dict(overlap_grad_reduce=True, bucket_size=2000)
    actual, _, model = _main_grads_after_two_micro_batches(True, ddp_flags=flags, **model_fields)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    (buffer,) = model.buffers
    assert len(buffer.buckets) > 3 and len(at_start) == len(buffer.buckets)
    assert sum(async_op for _, _, async_op in at_start) >= len(buffer.buckets) - 1  # started during backward
    for bucket, grads, _ in at_start:
        assert torch.equal(grads, bucket.grad_data)


def test_a_weight_used_twice_reports_once_with_both_parts(monkeypatch):
    started = []
    start = _ParamAndGradBuffer.start_bucket_sync
    monkeypatch.setattr(_ParamAndGradBuffer, "start_bucket_sync",
                        lambda buffer, bucket, async_op: (started.append(bucket.grad_data.clone()), start(buffer, bucket, async_op)))
    config = ModelParallelConfig(gradient_accumulation_fusion=True)
    torch.manual_seed(0)
    layer = ColumnParallelLinear(4, 3, config=config, init_method=torch.nn.init.normal_, bias=False)
    model = DistributedDataParallel(config, DistributedDataParallelConfig(overlap_grad_reduce=True), layer)
    x, y = torch.randn(5, 4), torch.randn(2, 4)
    model.zero_grad_buffer()
    (model(x)[0].sum() + model(y)[0].square().sum()).backward()
    weight = layer.weight.detach().requires_grad_()
    (x @ weight.t()).sum().add((y @ weight.t()).square().sum()).backward()
    assert len(started) == 1
    torch.testing.assert_close(started[0].view(3, 4), weight.grad)
    torch.testing.assert_close(layer.weight.main_grad, weight.grad)
    # A second backward pass without zero_grad_buffer() would add to a bucket already reduced.
    with pytest.raises(RuntimeError, match="reported complete twice in one step"):
        model(x)[0].sum().backward()


def test_megatron_linear_function_fuses_into_main_grad():
    weight = torch.nn.Parameter(torch.randn(3, 4))
    weight.main_grad = torch.ones(3, 4)
    x = torch.randn(2, 5, 4, requires_grad=True)
    out = linear_with_grad_accumulation_and_async_allreduce(x, weight, None, True, False, False)
    out.square().sum().backward()
    reference = weight.detach().requires_grad_()
    torch.nn.functional.linear(x.detach(), reference).square().sum().backward()
    assert weight.grad is None
    torch.testing.assert_close(weight.main_grad, 1 + reference.grad)
    with pytest.raises(NotImplementedError, match="deferred"):
        linear_with_grad_accumulation_and_async_allreduce(x, weight, None, True, False, False, [], 0)
