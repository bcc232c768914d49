"""The pipelined schedules (1F1B and interleaved) on 2 gloo ranks: a toy layer stack split over the stages
(and virtual stages) gets the unsplit model's gradients and losses, in training and forward-only runs."""

import types

import pytest
import torch
import torch.multiprocessing as mp

from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.schedules import (
    forward_backward_pipelining_with_interleaving,
    forward_backward_pipelining_without_interleaving,
)
from megatron.core.transformer.pipeline_layout import layer_offset_and_count
from tests.conftest import free_port, gloo_worker

HIDDEN, SEQ, MICRO_BATCH, NUM_LAYERS = 4, 3, 2, 4


def _all_layers():
    """Every layer of the unsplit model, identical on every rank."""
    torch.manual_seed(0)
    return [torch.nn.Linear(HIDDEN, HIDDEN) for _ in range(NUM_LAYERS)]


def _microbatches(count):
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(SEQ, MICRO_BATCH, HIDDEN, generator=generator), torch.randn(SEQ, MICRO_BATCH, HIDDEN, generator=generator))
        for _ in range(count)
    ]


def _stage_loss(hidden, target):
    """(sum of squared errors, element count) of the last stage's output."""
    return ((hidden - target) ** 2).sum(), torch.tensor(hidden.numel())


class ToyChunk(torch.nn.Module):
    """Some consecutive layers of the stack; the first chunk reads the inputs, the last one the targets."""

    def __init__(self, layers, vp_stage):
        super().__init__()
        self.config = types.SimpleNamespace(
            hidden_size=HIDDEN, sequence_parallel=False, params_dtype=torch.float32, pipeline_dtype=None
        )
        self.layers = torch.nn.ModuleList(layers)
        self.vp_stage = vp_stage
        self.input_tensor = None

    def set_input_tensor(self, input_tensor):
        self.input_tensor = input_tensor

    def forward(self, inputs):
        hidden = inputs if parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=self.vp_stage) else self.input_tensor
        for layer in self.layers:
            hidden = torch.tanh(layer(hidden))
        return hidden


def _forward_step(data_iterator, model):
    inputs = target = None
    if parallel_state.is_pipeline_first_stage(ignore_virtual=False) or parallel_state.is_pipeline_last_stage(ignore_virtual=False):
        inputs, target = next(data_iterator)
    output = model(inputs)

    def loss_func(hidden):
        total, count = _stage_loss(hidden, target)
        return total, count, {"loss": torch.stack([total.detach(), count.float()])}

    return output, loss_func


def _reference(layers, microbatches):
    """Per-micro-batch losses and the layers' gradients of the unsplit model (loss averaged over micro batches)."""
    losses = []
    for inputs, target in microbatches:
        hidden = inputs
        for layer in layers:
            hidden = torch.tanh(layer(hidden))
        total, count = _stage_loss(hidden, target)
        (total / count / len(microbatches)).backward()
        losses.append(total.detach() / count)
    return losses, [layer.weight.grad.clone() for layer in layers]


def _check_schedule(rank, virtual_size, num_microbatches, forward_only):
    pipeline_size = parallel_state.get_pipeline_model_parallel_world_size()
    pipeline_rank = parallel_state.get_pipeline_model_parallel_rank()
    layers = _all_layers()
    microbatches = _microbatches(num_microbatches)
    chunks, owned = [], []
    for vp_stage in range(virtual_size or 1):
        offset, count = layer_offset_and_count(NUM_LAYERS, pipeline_size, pipeline_rank, virtual_size, vp_stage if virtual_size else None)
        chunk_layers = [torch.nn.Linear(HIDDEN, HIDDEN) for _ in range(count)]
        for mine, original in zip(chunk_layers, layers[offset:offset + count]):
            mine.load_state_dict(original.state_dict())
        chunks.append(ToyChunk(chunk_layers, vp_stage if virtual_size else None))
        owned.extend(range(offset, offset + count))

    schedule = get_forward_backward_func()
    expected = forward_backward_pipelining_with_interleaving if virtual_size else forward_backward_pipelining_without_interleaving
    assert schedule is expected
    reports = schedule(
        forward_step_func=_forward_step,
        data_iterator=iter(microbatches),
        model=chunks,
        num_microbatches=num_microbatches,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=forward_only,
    )
    expected_losses, expected_grads = _reference(layers, microbatches)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        losses = [report["loss"][0] / report["loss"][1] for report in reports]
        torch.testing.assert_close(torch.stack(losses), torch.stack(expected_losses))
    else:
        assert reports == []
    chunk_grads = [layer.weight.grad for chunk in chunks for layer in chunk.layers]
    if forward_only:
        assert all(grad is None for grad in chunk_grads)
    else:
        for index, grad in zip(owned, chunk_grads):
            torch.testing.assert_close(grad, expected_grads[index], rtol=1e-5, atol=1e-7)


CASES = {
    "1f1b": (None, 4, False),
    "1f1b_microbatches_equal_stages": (None, 2, False),
    "1f1b_forward_only": (None, 3, True),
    "interleaved": (2, 4, False),
    "interleaved_all_warmup": (2, 2, False),
    "interleaved_forward_only": (2, 4, True),
}


def _check_all_cases(rank):
    """Every case in one pair of processes (process start-up dominates the test's time)."""
    for name, (virtual_size, num_microbatches, forward_only) in CASES.items():
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(1, 2, virtual_size)
        try:
            _check_schedule(rank, virtual_size, num_microbatches, forward_only)
        except AssertionError as error:
            raise AssertionError(f"case {name}: {error}") from error
    chunk = ToyChunk([torch.nn.Linear(HIDDEN, HIDDEN)], None)
    with pytest.raises(ValueError, match="1 micro batches per step for 2 pipeline stages"):
        forward_backward_pipelining_without_interleaving(
            forward_step_func=_forward_step, data_iterator=iter([]), model=[chunk], num_microbatches=1,
            seq_length=SEQ, micro_batch_size=MICRO_BATCH,
        )


def test_pipelined_schedules_match_unsplit_model_and_refuse_too_few_microbatches():
    layout = dict(pipeline_model_parallel_size=2)
    mp.spawn(gloo_worker, args=(2, free_port(), layout, _check_all_cases, ()), nprocs=2, join=True)
