"""Routing, balancing losses, permutation and token dropping equal the published megatron-core 0.16.1 on random
inputs (exactly: the same operations in the same order)."""

import pytest
import torch

from megatron.core.transformer.moe import moe_utils

# (name, keyword arguments of topk_routing_with_score_function besides logits / expert_bias)
ROUTING_CASES = [
    ("softmax", dict(topk=2)),
    ("softmax_pre", dict(topk=2, use_pre_softmax=True)),
    ("softmax_top1_scaled", dict(topk=1, scaling_factor=2.5)),
    ("softmax_groups", dict(topk=4, num_groups=4, group_topk=2)),
    ("softmax_pre_groups", dict(topk=2, use_pre_softmax=True, num_groups=2, group_topk=1)),
    ("sigmoid", dict(topk=3, score_function="sigmoid")),
    ("sigmoid_top1", dict(topk=1, score_function="sigmoid")),
    ("sigmoid_bias", dict(topk=4, score_function="sigmoid", bias=True)),
    ("sigmoid_bias_groups_scaled", dict(topk=4, score_function="sigmoid", bias=True, num_groups=4, group_topk=2,
                                        scaling_factor=2.5)),
]

REFERENCE_SCRIPT = """
import sys, torch
from megatron.core.transformer.moe import moe_utils as m
inputs = torch.load(sys.argv[1], weights_only=True)
cases = inputs.pop("cases")
logits, bias = inputs["logits"], inputs["expert_bias"]
out = {}
for name, kwargs in cases.items():
    kwargs = dict(kwargs)
    expert_bias = bias if kwargs.pop("bias", False) else None
    out["route_" + name] = m.topk_routing_with_score_function(logits, expert_bias=expert_bias, **kwargs)
for function in ("softmax", "sigmoid"):
    out["aux_scores_" + function] = m.compute_routing_scores_for_aux_loss(logits, 3, function)
out["aux_loss"] = m.switch_load_balancing_loss_func(inputs["probs"], inputs["counts"], 64, 2, 8, 0.01)
out["z_loss"] = m.z_loss_func(logits, 1e-3)
routing_map = out["route_softmax"][1]
permuted, permuted_probs, indices = m.permute(inputs["tokens"], routing_map, probs=out["route_softmax"][0])
out["permute"] = (permuted, permuted_probs, indices)
out["unpermute"] = m.unpermute(permuted * 3, indices, inputs["tokens"].shape)
sizes, order = torch.tensor([3, 0, 4, 3]), torch.tensor([2, 0, 3, 1])
out["sort_chunks"] = m.sort_chunks_by_idxs(inputs["tokens"][:10], sizes, order)
out["drop"] = m.apply_router_token_dropping(*out["route_softmax"], 2, 0.5, "probs")
out["drop_pad"] = m.apply_router_token_dropping(*out["route_softmax"], 2, 0.5, "probs", pad_to_capacity=True)
out["capacity"] = torch.tensor([m.get_capacity(64, 8, 1.3), m.get_capacity(10, 8, 0.1, min_capacity=4)])
torch.save(out, sys.argv[2])
"""


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    return {
        "logits": torch.randn(64, 8),
        "expert_bias": torch.randn(8) * 0.1,
        "probs": torch.rand(64, 8),
        "counts": torch.randint(0, 20, (8,)).float(),
        "tokens": torch.randn(64, 6),
        "cases": dict(ROUTING_CASES),
    }


@pytest.fixture(scope="module")
def reference(inputs, run_reference_megatron, tmp_path_factory):
    folder = tmp_path_factory.mktemp("moe_reference")
    torch.save(inputs, folder / "inputs.pt")
    script = REFERENCE_SCRIPT.replace("sys.argv[1]", repr(str(folder / "inputs.pt")))
    run_reference_megatron(script.replace("sys.argv[2]", repr(str(folder / "outputs.pt"))))
    return torch.load(folder / "outputs.pt", weights_only=True)


def _assert_equal(ours, theirs):
    if isinstance(theirs, (tuple, list)):
        assert len(ours) == len(theirs)
        for mine, reference in zip(ours, theirs):
            _assert_equal(mine, reference)
    else:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("name,kwargs", ROUTING_CASES, ids=[case[0] for case in ROUTING_CASES])
def test_topk_routing_matches_megatron_core(inputs, reference, name, kwargs):
    kwargs = dict(kwargs)
    expert_bias = inputs["expert_bias"] if kwargs.pop("bias", False) else None
    ours = moe_utils.topk_routing_with_score_function(inputs["logits"], expert_bias=expert_bias, **kwargs)
    _assert_equal(ours, reference["route_" + name])
    assert ours[1].sum(dim=1).eq(kwargs["topk"]).all()


def test_losses_match_megatron_core(inputs, reference):
    logits = inputs["logits"]
    for function in ("softmax", "sigmoid"):
        ours = moe_utils.compute_routing_scores_for_aux_loss(logits, 3, function)
        _assert_equal(ours, reference["aux_scores_" + function])
    aux = moe_utils.switch_load_balancing_loss_func(inputs["probs"], inputs["counts"], 64, 2, 8, 0.01)
    _assert_equal(aux, reference["aux_loss"])
    _assert_equal(moe_utils.z_loss_func(logits, 1e-3), reference["z_loss"])


def test_permutation_and_dropping_match_megatron_core(inputs, reference):
    probs, routing_map = reference["route_softmax"]
    tokens = inputs["tokens"]
    permuted, permuted_probs, indices = moe_utils.permute(tokens, routing_map, probs)
    _assert_equal((permuted, permuted_probs, indices), reference["permute"])
    _assert_equal(moe_utils.unpermute(permuted * 3, indices, tokens.shape), reference["unpermute"])
    _assert_equal(moe_utils.sort_chunks_by_idxs(tokens[:10], [3, 0, 4, 3], [2, 0, 3, 1]), reference["sort_chunks"])
    _assert_equal(moe_utils.apply_router_token_dropping(probs, routing_map, 2, 0.5, "probs"), reference["drop"])
    ours_padded = moe_utils.apply_router_token_dropping(probs, routing_map, 2, 0.5, "probs", pad_to_capacity=True)
    theirs_padded = reference["drop_pad"]
    # Padding rows (probability 0) may be any unrouted tokens; the count per expert and the probs must agree.
    assert torch.equal(ours_padded[1].sum(0), theirs_padded[1].sum(0))
    _assert_equal(ours_padded[0], theirs_padded[0])
    capacities = [moe_utils.get_capacity(64, 8, 1.3), moe_utils.get_capacity(10, 8, 0.1, min_capacity=4)]
    assert capacities == reference["capacity"].tolist()


def test_forced_load_balancing_routes_on_random_logits_and_passes_gradients():
    from megatron.core.transformer.moe.moe_utils import apply_random_logits

    rng_state = torch.get_rng_state()
    logits = torch.full((4096, 8), 5.0, requires_grad=True)
    logits.data[:, 0] = 100.0  # a real router would send every token to expert 0
    random_logits = apply_random_logits(logits)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the training RNG stream is untouched
    counts = random_logits.topk(2, dim=-1).indices.flatten().bincount(minlength=8)
    assert counts.min() > 0.8 * counts.float().mean()
    (random_logits * torch.arange(8.0)).sum().backward()
    assert torch.equal(logits.grad, torch.arange(8.0).expand(4096, -1))
