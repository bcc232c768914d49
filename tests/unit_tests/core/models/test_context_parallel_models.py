"""Models under context parallelism (2 gloo ranks): a GPT model with rotary embeddings (one CP algorithm per
layer) and an MLA block with YaRN, each fed this rank's load-balanced chunks, give the rows of the one-rank
output at those positions, and their weight gradients summed over the CP ranks equal the one-rank ones.
Generation with a key/value cache is refused under CP."""

import pytest
import torch

from megatron.core import parallel_state
from megatron.core.inference_params import InferenceParams
from megatron.core.transformer.context_parallel_attention import CP_COMM_TYPES, load_balanced_indices
from tests.unit_tests.core.models.test_gpt_model import VOCAB, make_model, tokens
from tests.unit_tests.core.transformer.mla_helpers import BATCH, HIDDEN, mla_attention, mla_config

SEQUENCE = 16


def _weight_grads(module):
    return {name: param.grad.clone() for name, param in module.named_parameters() if param.grad is not None}


def _assert_grads_close(grads, expected, where):
    """Within fp32 rounding of each tensor's largest gradient (the CP sums run in another order)."""
    for name, grad in expected.items():
        atol = 1e-5 * grad.abs().max().item()
        torch.testing.assert_close(grads[name], grad, atol=atol, rtol=1e-5, msg=lambda m: f"{where} {name}: {m}")


def _summed_over_context_parallel(grads):
    for grad in grads.values():
        torch.distributed.all_reduce(grad, group=parallel_state.get_context_parallel_group())
    return grads


def _set_context_parallel_size(size):
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(context_parallel_size=size)


def _check_gpt(local):
    """Per-token losses of a 3-layer rope GPT (p2p, all_gather, a2a layers) on this rank's tokens."""
    ids = tokens(SEQUENCE)
    labels = torch.roll(ids, -1, dims=1)
    positions = torch.arange(SEQUENCE).expand_as(ids)
    weights = torch.rand(ids.shape, generator=torch.Generator().manual_seed(5))

    _set_context_parallel_size(1)
    reference = make_model(cp_comm_type=list(CP_COMM_TYPES))
    expected = reference(ids, positions, None, labels=labels)
    (expected * weights).sum().backward()

    _set_context_parallel_size(2)
    model = make_model(cp_comm_type=list(CP_COMM_TYPES), context_parallel_size=2)
    model.load_state_dict(reference.state_dict())
    losses = model(ids[:, local], positions[:, local], None, labels=labels[:, local])
    (losses * weights[:, local]).sum().backward()
    torch.testing.assert_close(losses, expected[:, local].detach(), atol=1e-5, rtol=1e-5)
    _assert_grads_close(_summed_over_context_parallel(_weight_grads(model)), _weight_grads(reference), "GPT")
    with pytest.raises(ValueError, match="generation with a key/value cache runs without context parallelism"):
        model(ids[:, local], positions[:, local], None, inference_params=InferenceParams(2, SEQUENCE))


def _check_mla(local, comm_type):
    """An MLA block (YaRN rotary, v head dim unlike the q/k one) on this rank's tokens."""
    generator = torch.Generator().manual_seed(7)
    hidden_states = torch.randn(SEQUENCE, BATCH, HIDDEN, generator=generator)
    weights = torch.randn(SEQUENCE, BATCH, HIDDEN, generator=generator)

    _set_context_parallel_size(1)
    torch.manual_seed(11)
    reference = mla_attention(mla_config())
    expected = reference(hidden_states)[0]
    (expected * weights).sum().backward()

    _set_context_parallel_size(2)
    block = mla_attention(mla_config(context_parallel_size=2, cp_comm_type=comm_type))
    block.load_state_dict(reference.state_dict())
    output = block(hidden_states[local])[0]
    (output * weights[local]).sum().backward()
    torch.testing.assert_close(output, expected[local].detach(), atol=1e-5, rtol=1e-5, msg=lambda m: f"{comm_type}: {m}")
    _assert_grads_close(_summed_over_context_parallel(_weight_grads(block)), _weight_grads(reference), comm_type)


def _context_parallel_matches_one_rank(rank):
    torch.set_num_threads(1)
    local = load_balanced_indices(SEQUENCE, rank, 2)
    _check_gpt(local)
    for comm_type in CP_COMM_TYPES:
        _check_mla(local, comm_type)


def test_context_parallel_models_match_one_rank(run_on_gloo):
    run_on_gloo(2, _context_parallel_matches_one_rank, context_parallel_size=2)
