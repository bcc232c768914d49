"""MoELayer against transformers' Mixtral and Qwen3-MoE blocks, grouped GEMM against the loop, token dropping,
the load-balancing losses and the expert-bias update, on one process."""

import pytest
import torch
import torch.nn.functional as F

from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    apply_router_token_dropping,
    clear_aux_losses_tracker,
    compute_routing_scores_for_aux_loss,
    get_moe_layer_wise_logging_tracker,
    get_updated_expert_bias,
    switch_load_balancing_loss_func,
    update_routers_expert_bias,
)
from megatron.core.transformer.moe.router import TopKRouter
from tests.unit_tests.core.transformer.moe.conftest import moe_config, moe_layer

transformers = pytest.importorskip("transformers")


def _hf_block(family: str, norm_topk_prob: bool = True):
    """A tiny HF sparse-MoE block (8 experts of width 32 on hidden 64, top-2) with random weights."""
    torch.manual_seed(1)
    if family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        config = transformers.MixtralConfig(
            hidden_size=64, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
            num_attention_heads=4, num_key_value_heads=2,
        )
        block = MixtralSparseMoeBlock(config)
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        config = transformers.Qwen3MoeConfig(
            hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=norm_topk_prob, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        )
        block = Qwen3MoeSparseMoeBlock(config)
    config._experts_implementation = "eager"  # the per-expert loop, as inside a full HF model
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.3)
    return block


def _copy_hf_weights(layer, block):
    with torch.no_grad():
        layer.router.weight.copy_(block.gate.weight)
        for index, expert in enumerate(layer.experts.local_experts):
            expert.linear_fc1.weight.copy_(block.experts.gate_up_proj[index])  # rows [gate; up]
            expert.linear_fc2.weight.copy_(block.experts.down_proj[index])


@pytest.mark.parametrize(
    "family,norm_topk_prob,dispatcher,grouped",
    [
        ("mixtral", True, "allgather", False),
        ("mixtral", True, "alltoall", True),
        ("qwen3_moe", True, "alltoall", False),
        ("qwen3_moe", False, "allgather", True),
    ],
)
def test_matches_transformers_sparse_moe_block(family, norm_topk_prob, dispatcher, grouped):
    """Outputs and gradients (input, router, experts) equal HF's under the flags of MOE_MLA_CP.md 6.5."""
    block = _hf_block(family, norm_topk_prob)
    config = moe_config(
        hidden_size=64, num_moe_experts=8, moe_ffn_hidden_size=32, moe_router_pre_softmax=not norm_topk_prob,
        moe_token_dispatcher_type=dispatcher, moe_grouped_gemm=grouped,
    )
    layer = moe_layer(config)
    _copy_hf_weights(layer, block)
    torch.manual_seed(2)
    hf_input = torch.randn(2, 5, 64, requires_grad=True)  # [b, s, h]
    weights = torch.randn(2, 5, 64)
    hf_output = block(hf_input)
    (hf_output * weights).sum().backward()

    our_input = hf_input.detach().transpose(0, 1).clone().requires_grad_()  # [s, b, h]
    output, bias = layer(our_input)
    (output * weights.transpose(0, 1)).sum().backward()

    assert bias is None
    torch.testing.assert_close(output.transpose(0, 1), hf_output, atol=1e-5, rtol=0)
    torch.testing.assert_close(our_input.grad.transpose(0, 1), hf_input.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.router.weight.grad, block.gate.weight.grad, atol=1e-5, rtol=0)
    for index, expert in enumerate(layer.experts.local_experts):
        hf_fc1_grad, hf_fc2_grad = block.experts.gate_up_proj.grad[index], block.experts.down_proj.grad[index]
        torch.testing.assert_close(expert.linear_fc1.weight.grad, hf_fc1_grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(expert.linear_fc2.weight.grad, hf_fc2_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "fields", [{}, {"add_bias_linear": True}, {"gated_linear_unit": False, "activation_func": F.gelu}]
)
def test_grouped_gemm_equals_sequential_experts(fields):
    """Same keys, outputs and gradients; widths 16 / 16 / 8 fit torch._grouped_mm, so its path runs."""
    torch.manual_seed(3)
    x = torch.randn(6, 2, 16)
    results = []
    for grouped in (False, True):
        layer = moe_layer(moe_config(moe_grouped_gemm=grouped, **fields))
        our_input = x.clone().requires_grad_()
        output, _ = layer(our_input)
        output.square().sum().backward()
        grads = {name: param.grad for name, param in layer.named_parameters()}
        results.append((output, our_input.grad, grads))
    (seq_out, seq_in_grad, seq_grads), (grp_out, grp_in_grad, grp_grads) = results
    assert seq_grads.keys() == grp_grads.keys()
    torch.testing.assert_close(grp_out, seq_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grp_in_grad, seq_in_grad, atol=1e-6, rtol=1e-6)
    for name in seq_grads:
        torch.testing.assert_close(grp_grads[name], seq_grads[name], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("ffn_hidden_size,grouped_calls", [(8, 2), (3, 0)])
def test_grouped_gemm_runs_torch_grouped_mm_where_the_widths_fit(monkeypatch, ffn_hidden_size, grouped_calls):
    """One grouped GEMM per projection; a width of 3 fp32 values breaks its 16-byte rule: the loop runs instead."""
    calls = []
    original = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(3, 2, 16)
    grouped, _ = moe_layer(moe_config(moe_grouped_gemm=True, moe_ffn_hidden_size=ffn_hidden_size))(x)
    sequential, _ = moe_layer(moe_config(moe_ffn_hidden_size=ffn_hidden_size))(x)
    assert len(calls) == grouped_calls
    torch.testing.assert_close(grouped, sequential, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("policy,kept", [("probs", [1, 3]), ("position", [0, 1])])
def test_capacity_keeps_the_right_tokens(policy, kept):
    """4 tokens all routed to expert 0, top-1 of 2 experts, capacity factor 1: capacity 2."""
    probs = torch.tensor([[0.6, 0.0], [0.9, 0.0], [0.7, 0.0], [0.8, 0.0]])
    routing_map = probs > 0
    final_probs, final_map = apply_router_token_dropping(probs, routing_map, 1, 1.0, policy)
    expected = torch.zeros_like(routing_map)
    expected[kept, 0] = True
    assert torch.equal(final_map, expected)
    assert torch.equal(final_probs, probs * expected)
    padded_probs, padded_map = apply_router_token_dropping(probs, routing_map, 1, 1.0, policy, pad_to_capacity=True)
    assert padded_map.sum(dim=0).tolist() == [2, 2] and torch.equal(padded_probs, final_probs)


def test_dropped_tokens_get_only_the_shared_expert_output():
    """Dropped token copies contribute nothing; padding rows (probability 0) change nothing."""
    x = torch.randn(8, 1, 16)
    fields = dict(moe_router_topk=1, moe_shared_expert_intermediate_size=8)
    dropless = moe_layer(moe_config(**fields))
    _, routing_map = dropless.router(x)
    outputs, layers = {}, {}
    for pad in (False, True):
        config = moe_config(moe_expert_capacity_factor=0.5, moe_pad_expert_input_to_capacity=pad, **fields)
        layers[pad] = moe_layer(config)
        outputs[pad], _ = layers[pad](x)
    _, kept_map = layers[False].router(x)
    assert kept_map.sum() < routing_map.sum()  # capacity 1 per expert drops some tokens
    dropped = ~kept_map.any(dim=1)
    shared = layers[False].shared_experts(x).view(8, 16)
    torch.testing.assert_close(outputs[False].view(8, 16)[dropped], shared[dropped])
    torch.testing.assert_close(outputs[True], outputs[False])


def test_expert_bias_update_is_the_hand_computation():
    counts = torch.tensor([[3.0, 1.0, 2.0, 2.0], [0.0, 0.0, 4.0, 4.0]])
    bias = torch.tensor([[0.5, 0.0, 0.0, -0.5], [0.0, 0.0, 0.0, 0.0]])
    updated = get_updated_expert_bias(counts, bias, 0.1)
    expected = torch.tensor([[0.4, 0.1, 0.0, -0.5], [0.1, 0.1, -0.1, -0.1]])
    torch.testing.assert_close(updated, expected, rtol=0, atol=1e-7)


def test_routers_count_tokens_and_update_their_bias_once_per_batch():
    config = moe_config(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                        moe_router_bias_update_rate=0.25)
    router = TopKRouter(config)
    x = torch.randn(5, 2, 16)
    _, routing_map = router(x)
    _, routing_map_2 = router(x)
    with torch.no_grad():
        router(x)  # evaluation / recompute forwards do not count
    counts = (routing_map.sum(0) + routing_map_2.sum(0)).float()
    assert torch.equal(router.local_tokens_per_expert, counts)
    assert "expert_bias" in router.state_dict() and "local_tokens_per_expert" not in router.state_dict()
    update_routers_expert_bias([router])
    torch.testing.assert_close(router.expert_bias, 0.25 * torch.sign(counts.mean() - counts))
    assert not router.local_tokens_per_expert.any()


def test_expert_bias_selects_but_does_not_weight():
    config = moe_config(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)
    router = TopKRouter(config)
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 5.0]))
    x = torch.randn(4, 1, 16)
    probs, routing_map = router(x)
    assert routing_map[:, 2:].all() and not routing_map[:, :2].any()
    scores = torch.sigmoid(router.gating(x).view(4, 4))[:, 2:]
    torch.testing.assert_close(probs[:, 2:], scores / scores.sum(-1, keepdim=True))


def test_aux_loss_autoscaler_injects_the_scaled_loss_gradient():
    x = torch.ones(3, requires_grad=True)
    w = torch.tensor(2.0, requires_grad=True)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(0.5))
    try:
        MoEAuxLossAutoScaler.apply(x * 1.0, w * w).sum().backward()
    finally:
        MoEAuxLossAutoScaler.main_loss_backward_scale = None
    assert torch.equal(x.grad, torch.ones(3)) and w.grad.item() == 0.5 * 2 * 2.0


LOGGED_NAMES = {
    "aux_loss": "load_balancing_loss",
    "seq_aux_loss": "seq_load_balancing_loss",
    "global_aux_loss": "global_load_balancing_loss",
}


def _logged_loss(loss_type, *micro_batches):
    """The unscaled balancing loss the tracker holds after training forwards and backwards, and the router."""
    clear_aux_losses_tracker()
    torch.manual_seed(4)
    router = TopKRouter(moe_config(moe_router_load_balancing_type=loss_type, moe_aux_loss_coeff=0.1))
    router.set_layer_number(1)
    for inputs in micro_batches:
        probs, _ = router(inputs)
        probs.sum().backward()
    return get_moe_layer_wise_logging_tracker()[LOGGED_NAMES[loss_type]]["values"][0].item(), router


def test_seq_aux_loss_is_the_mean_of_per_sequence_aux_losses():
    """With one sequence seq_aux_loss equals aux_loss; with two it is their per-sequence average."""
    torch.manual_seed(5)
    x = torch.randn(6, 2, 16)
    per_sequence = [_logged_loss("aux_loss", x[:, i : i + 1])[0] for i in range(2)]
    assert _logged_loss("seq_aux_loss", x[:, :1])[0] == pytest.approx(per_sequence[0], rel=1e-6)
    assert _logged_loss("seq_aux_loss", x)[0] == pytest.approx(sum(per_sequence) / 2, rel=1e-6)
    _, with_loss = _logged_loss("aux_loss", x)
    torch.manual_seed(4)
    plain = TopKRouter(moe_config())
    plain(x)[0].sum().backward()
    assert not torch.allclose(with_loss.weight.grad, plain.weight.grad)  # the loss reaches the router weight


def test_global_aux_loss_counts_tokens_over_the_global_batch():
    """First micro-batch: the aux loss; later ones use the counts averaged over the micro-batches so far."""
    torch.manual_seed(6)
    x1, x2 = torch.randn(6, 2, 16), torch.randn(6, 2, 16)
    first, counting_router = _logged_loss("aux_loss", x1)
    assert _logged_loss("global_aux_loss", x1)[0] == pytest.approx(first, rel=1e-6)
    two_batches, router = _logged_loss("global_aux_loss", x1, x2)
    logits = counting_router.gating(x2).view(-1, 4)
    routing_map, scores = compute_routing_scores_for_aux_loss(logits, 2, "softmax")
    counts_1 = compute_routing_scores_for_aux_loss(counting_router.gating(x1).view(-1, 4), 2, "softmax")[0].sum(0)
    average_counts = (counts_1 + routing_map.sum(0)) / 2
    second = switch_load_balancing_loss_func(scores, average_counts, 12, 2, 4, 1.0).item()
    assert two_batches == pytest.approx(first + second, rel=1e-6)
    assert router.ga_steps.item() == 2
    router.reset_global_aux_loss_tracker()
    assert router.ga_steps.item() == 0 and not router.global_tokens_per_expert.any()


def test_input_jitter_scales_the_router_input_in_training_only():
    """--moe-input-jitter-eps: the router sees x * U(1 - eps, 1 + eps) while training; evaluation is exact."""
    router = moe_layer(moe_config(moe_input_jitter_eps=0.1)).router
    seen = []
    router.gating = lambda input: seen.append(input) or torch.zeros(input.shape[:-1] + (4,))
    hidden = torch.randn(6, 2, 16)
    router.train()
    router(hidden)
    ratio = seen[-1] / hidden
    assert not torch.equal(seen[-1], hidden) and ratio.min() >= 0.9 - 1e-6 and ratio.max() <= 1.1 + 1e-6
    router.eval()
    router(hidden)
    assert torch.equal(seen[-1], hidden)
