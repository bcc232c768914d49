"""Expert parallelism on gloo: EP=2 with either dispatcher gives every rank the output, input gradient and router
gradient of one process holding all experts, and each expert the sum of the ranks' single-process gradients."""

import torch

from megatron.core.transformer.moe.moe_utils import MoEProcessGroups, all_reduce_sum, update_routers_expert_bias
from tests.unit_tests.core.transformer.moe.conftest import moe_config, moe_layer

# (dispatcher, grouped GEMM, extra config fields, expert bias): sigmoid routing with bias, aux and z losses on.
SCENARIOS = [
    ("alltoall", False, {}, [0.0, 0.0, 0.0, 0.0]),
    ("allgather", True, {}, [0.0, 0.0, 0.0, 0.0]),
    # Every token picks experts 0 and 1 (rank 0's): rank 1 receives nothing (zero splits).
    ("alltoall", False, {}, [9.0, 9.0, 0.0, 0.0]),
    ("allgather", False, {}, [9.0, 9.0, 0.0, 0.0]),
    ("alltoall", True, dict(moe_expert_capacity_factor=0.75, moe_pad_expert_input_to_capacity=True), [0.0] * 4),
    ("alltoall", False, dict(moe_expert_capacity_factor=0.5, moe_token_drop_policy="position"), [0.0] * 4),
]


def _config(dispatcher, grouped, fields, ep):
    return moe_config(
        moe_token_dispatcher_type=dispatcher, moe_grouped_gemm=grouped, expert_model_parallel_size=ep,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01, moe_z_loss_coeff=1e-3,
        moe_shared_expert_intermediate_size=8, **fields,
    )


def _copy_from_reference(layer, reference, rank):
    state = reference.state_dict()
    mine = {}
    for name in layer.state_dict():
        if name.startswith("experts.local_experts."):
            _, _, index, rest = name.split(".", 3)
            global_index = rank * layer.num_local_experts + int(index)
            mine[name] = state[f"experts.local_experts.{global_index}.{rest}"]
        else:
            mine[name] = state[name]
    layer.load_state_dict(mine)


def _ep2_equals_one_process(rank):
    ep_group = torch.distributed.new_group([0, 1])
    for dispatcher, grouped, fields, bias in SCENARIOS:
        reference = moe_layer(_config(dispatcher, grouped, fields, ep=1))
        reference.router.expert_bias.copy_(torch.tensor(bias))
        layer = moe_layer(_config(dispatcher, grouped, fields, ep=2), pg_collection=MoEProcessGroups(ep=ep_group))
        _copy_from_reference(layer, reference, rank)
        assert layer.local_expert_indices == [2 * rank, 2 * rank + 1]

        torch.manual_seed(10 + rank)  # each rank routes different tokens
        x = torch.randn(5, 2, 16)
        weights = torch.randn(5, 2, 16)
        results = []
        for model in (reference, layer):
            our_input = x.clone().requires_grad_()
            output, _ = model(our_input)
            (output * weights).sum().backward()
            results.append((output, our_input.grad))
        (ref_out, ref_grad), (ep_out, ep_grad) = results
        scenario = f"{dispatcher} grouped={grouped} {fields} bias={bias} rank {rank}"
        torch.testing.assert_close(ep_out, ref_out, atol=1e-6, rtol=1e-6, msg=scenario)
        torch.testing.assert_close(ep_grad, ref_grad, atol=1e-6, rtol=1e-6, msg=scenario)
        # An expert's gradient sums what every rank's tokens contributed; the rest are per rank.
        ref_grads = {
            name: all_reduce_sum(param.grad, ep_group) if name.startswith("experts.") else param.grad
            for name, param in reference.named_parameters()
        }
        for name, param in layer.named_parameters():
            if name.startswith("experts."):
                _, _, index, rest = name.split(".", 3)
                expected = ref_grads[f"experts.local_experts.{2 * rank + int(index)}.{rest}"]
            else:
                expected = ref_grads[name]
            torch.testing.assert_close(param.grad, expected, atol=1e-5, rtol=1e-5, msg=f"{scenario} {name}")
        if bias[0] > 0:
            assert layer.router.local_tokens_per_expert[2:].eq(0).all()

        # The bias update sums the counts over the (data-parallel) ranks: the same new bias everywhere.
        counts = all_reduce_sum(reference.router.local_tokens_per_expert, ep_group)
        assert torch.equal(layer.router.local_tokens_per_expert, reference.router.local_tokens_per_expert)
        update_routers_expert_bias([layer.router], group=ep_group)
        expected_bias = torch.tensor(bias) + 1e-3 * torch.sign(counts.mean() - counts)
        torch.testing.assert_close(layer.router.expert_bias, expected_bias, rtol=0, atol=1e-7)


def test_expert_parallel_dispatchers_equal_one_process(run_on_gloo):
    run_on_gloo(2, _ep2_equals_one_process)
