"""The pure functions of an MoE layer: routing, load-balancing losses, token permutation, expert capacity, the
expert-bias update and the collectives the dispatchers need (Megatron-core's names and semantics)."""

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed

from megatron.core import parallel_state
from megatron.core.utils import all_gather_single


@dataclass
class MoEProcessGroups:
    """The process groups an MoE layer talks over; None means this process alone (no collective).

    `ep`: the expert-parallel peers, each holding num_experts / EP experts. `etp`: the expert-tensor-parallel
    peers, each holding a slice of every local expert. `tp_ep`: the all-gather dispatcher's domain (expert tensor
    x expert parallel; the same ranks as `ep` without expert tensor parallelism, the default).
    `tp_cp`: where the aux losses count tokens and the z-loss is divided. `tp_dp_cp`: where the expert-bias and
    global-aux-loss token counts are summed.
    """

    ep: Optional[torch.distributed.ProcessGroup] = None
    etp: Optional[torch.distributed.ProcessGroup] = None
    tp_ep: Optional[torch.distributed.ProcessGroup] = None
    tp_cp: Optional[torch.distributed.ProcessGroup] = None
    tp_dp_cp: Optional[torch.distributed.ProcessGroup] = None

    def __post_init__(self):
        if self.tp_ep is None:
            self.tp_ep = self.ep

    @classmethod
    def from_parallel_state(cls) -> "MoEProcessGroups":
        """The groups parallel_state built (none before it is initialised: one process)."""
        if not parallel_state.model_parallel_is_initialized():
            return cls()
        return cls(
            ep=parallel_state.get_expert_model_parallel_group(),
            etp=parallel_state.get_expert_tensor_parallel_group(),
            tp_ep=parallel_state.get_expert_tensor_and_model_parallel_group(),
            tp_cp=parallel_state.get_tensor_and_context_parallel_group(),
            tp_dp_cp=parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True),
        )


def group_size(group: Optional[torch.distributed.ProcessGroup]) -> int:
    return 1 if group is None else torch.distributed.get_world_size(group=group)


def group_rank(group: Optional[torch.distributed.ProcessGroup]) -> int:
    return 0 if group is None else torch.distributed.get_rank(group=group)


def all_reduce_sum(tensor: torch.Tensor, group: Optional[torch.distributed.ProcessGroup]) -> torch.Tensor:
    """The sum of `tensor` over `group`, as a new tensor (no autograd: for token counts)."""
    total = tensor.clone()
    if group_size(group) > 1:
        torch.distributed.all_reduce(total, group=group)
    return total


def all_gather_rows(tensor: torch.Tensor, group: Optional[torch.distributed.ProcessGroup]) -> torch.Tensor:
    """Every rank's `tensor` stacked along dim 0 in rank order (no autograd: for counts and routing maps)."""
    size = group_size(group)
    if size == 1:
        return tensor
    as_int = tensor.dtype == torch.bool  # gloo has no bool collectives
    source = (tensor.to(torch.uint8) if as_int else tensor).contiguous()
    output = source.new_empty((size * source.shape[0],) + tuple(source.shape[1:]))
    all_gather_single(output, source, group=group)
    return output.bool() if as_int else output


def _all_to_all(input_: torch.Tensor, output_splits: List[int], input_splits: List[int], group) -> torch.Tensor:
    input_ = input_.contiguous()
    output = input_.new_empty((sum(output_splits),) + tuple(input_.shape[1:]))
    torch.distributed.all_to_all_single(output, input_, output_splits, input_splits, group=group)
    return output


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all whose gradient is the all-to-all with the splits swapped."""

    @staticmethod
    def forward(ctx, group, input_, output_splits, input_splits):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        return _all_to_all(input_, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_output):
        return None, _all_to_all(grad_output, ctx.input_splits, ctx.output_splits, ctx.group), None, None


def all_to_all(group, input_: torch.Tensor, output_split_sizes: List[int], input_split_sizes: List[int]):
    """Send rows `input_split_sizes[j]` to rank j and receive `output_split_sizes[j]` rows from it (autograd)."""
    if group_size(group) == 1:
        return input_
    return _AllToAll.apply(group, input_, list(output_split_sizes), list(input_split_sizes))


def gather_rows_uneven(group, rows: torch.Tensor, sizes: List[int]) -> torch.Tensor:
    """Every rank's `rows` (sizes[j] rows from rank j) concatenated in rank order (autograd: each rank's
    gradient is the sum of every rank's gradient of its rows). An all-to-all that sends each rank a copy."""
    if group_size(group) == 1:
        return rows
    copies = rows.repeat((len(sizes),) + (1,) * (rows.dim() - 1))
    return all_to_all(group, copies, sizes, [rows.shape[0]] * len(sizes))


def reduce_scatter_rows_uneven(group, rows: torch.Tensor, sizes: List[int]) -> torch.Tensor:
    """The inverse of gather_rows_uneven: `rows` in blocks of sizes[j]; rank j gets block j summed over ranks."""
    if group_size(group) == 1:
        return rows
    mine = sizes[group_rank(group)]
    received = all_to_all(group, rows, [mine] * len(sizes), sizes)
    return received.reshape((len(sizes), mine) + tuple(rows.shape[1:])).sum(dim=0)


class _RandomLogits(torch.autograd.Function):
    """Standard-normal logits from a generator of their own (seeded 42, so the training RNG is untouched);
    the gradient passes straight through to the real logits."""

    generators: dict = {}

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        generator = _RandomLogits.generators.get(logits.device)
        if generator is None:
            generator = _RandomLogits.generators[logits.device] = torch.Generator(logits.device).manual_seed(42)
        return torch.randn(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output


def apply_random_logits(logits: torch.Tensor) -> torch.Tensor:
    """--moe-router-force-load-balancing: random routing logits for benchmarks (Megatron's RandomSTE)."""
    return _RandomLogits.apply(logits)


def group_limited_topk(
    scores: torch.Tensor, topk: int, num_tokens: int, num_experts: int, num_groups: int, group_topk: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k restricted to the `group_topk` best of `num_groups` expert groups, a group scoring the sum of its
    top-(topk // group_topk) scores (device- or node-limited routing of DeepSeek-V2/V3)."""
    per_group = scores.view(num_tokens, num_groups, -1)
    group_scores = per_group.topk(topk // group_topk, dim=-1).values.sum(dim=-1)
    chosen_groups = group_scores.topk(group_topk, dim=-1, sorted=False).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, chosen_groups, True)
    expert_mask = group_mask.unsqueeze(-1).expand(-1, -1, num_experts // num_groups).reshape(num_tokens, -1)
    return scores.masked_fill(~expert_mask, float("-inf")).topk(topk, dim=-1)


def topk_routing_with_score_function(
    logits: torch.Tensor,
    topk: int,
    use_pre_softmax: bool = False,
    num_groups: Optional[int] = None,
    group_topk: Optional[int] = None,
    scaling_factor: Optional[float] = None,
    score_function: str = "softmax",
    expert_bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense routing probabilities [T, E] (zero off the selection) and the boolean routing map [T, E].

    softmax: top-k of the logits, softmax over those k (pre-softmax: softmax over all E, then top-k, no
    renormalisation). sigmoid: experts are selected on sigmoid + expert_bias but weighted by the unbiased sigmoid,
    renormalised over the k when k > 1. Finally the weights are multiplied by `scaling_factor`.
    """
    num_tokens, num_experts = logits.shape

    def select(scores):
        if group_topk:
            return group_limited_topk(scores, topk, num_tokens, num_experts, num_groups, group_topk)
        return torch.topk(scores, k=topk, dim=1)

    if score_function == "softmax":
        if use_pre_softmax:
            probs, top_indices = select(torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits))
        else:
            top_logits, top_indices = select(logits)
            probs = torch.softmax(top_logits, dim=-1, dtype=torch.float32).type_as(logits)
    elif score_function == "sigmoid":
        scores = torch.sigmoid(logits.float()).type_as(logits)
        if expert_bias is None:
            probs, top_indices = select(scores)
        else:
            _, top_indices = select(scores + expert_bias)
            probs = scores.gather(1, top_indices)
        if topk > 1:
            probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        raise ValueError(f"unknown MoE router score function {score_function!r}")
    if scaling_factor:
        probs = probs * scaling_factor
    routing_probs = torch.zeros_like(logits).scatter(1, top_indices, probs)
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top_indices, True)
    return routing_probs, routing_map


def compute_routing_scores_for_aux_loss(
    logits: torch.Tensor, topk: int, score_function: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(routing map, scores) the aux losses see: scores over all E (softmax, or sigmoid normalised over E) and
    their plain top-k, without expert bias or group limits."""
    if score_function == "softmax":
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    elif score_function == "sigmoid":
        scores = torch.sigmoid(logits)
        scores = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        raise ValueError(f"unknown MoE router score function {score_function!r}")
    top_indices = torch.topk(scores, k=topk, dim=1).indices
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top_indices, True)
    return routing_map, scores


def switch_load_balancing_loss_func(
    probs: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    total_num_tokens: int,
    topk: int,
    num_experts: int,
    moe_aux_loss_coeff: float,
) -> torch.Tensor:
    """GShard/Switch balancing loss c * E * sum_e f_e * P_e with f_e = n_e / (k T) and P_e = sum_t p_te / T
    (`probs` are this rank's tokens, `tokens_per_expert` and T may be counted over more ranks)."""
    scale = num_experts * moe_aux_loss_coeff / (topk * total_num_tokens * total_num_tokens)
    return torch.sum(probs.sum(dim=0) * tokens_per_expert) * scale


def z_loss_func(logits: torch.Tensor, z_loss_coeff: float) -> torch.Tensor:
    """ST-MoE router z-loss: c * mean over tokens of logsumexp(logits)^2, which keeps the logits small."""
    return torch.mean(torch.square(torch.logsumexp(logits, dim=-1))) * z_loss_coeff


class MoEAuxLossAutoScaler(torch.autograd.Function):
    """Identity on `output` whose backward also sends `main_loss_backward_scale` as the gradient of `aux_loss`,
    so a loss that is not part of the model output still trains the router. The schedule sets the scale to the
    main loss's (loss scale / micro-batches)."""

    main_loss_backward_scale: Optional[torch.Tensor] = None

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        scale = MoEAuxLossAutoScaler.main_loss_backward_scale
        aux_loss_grad = torch.ones_like(aux_loss) if scale is None else torch.ones_like(aux_loss) * scale
        return grad_output, aux_loss_grad

    @staticmethod
    def set_loss_scale(scale: torch.Tensor) -> None:
        MoEAuxLossAutoScaler.main_loss_backward_scale = scale.detach().clone()


def save_to_aux_losses_tracker(
    name: str, loss: torch.Tensor, layer_number: Optional[int], num_layers: int, reduce_group=None
) -> None:
    """Add an (unscaled) auxiliary loss of layer `layer_number` (1-based) to what the training log reports."""
    if layer_number is None:
        return
    entry = get_moe_layer_wise_logging_tracker().setdefault(name, {})
    if "values" not in entry or entry["values"].numel() != num_layers:  # new, or left by another model
        entry["values"] = torch.zeros(num_layers, device=loss.device)
    entry["values"][layer_number - 1] += loss.detach().float()
    entry["reduce_group"] = reduce_group


def num_layers_with_aux_losses(config) -> int:
    """The aux-loss tracker's length: the decoder layers, then the multi-token prediction depths (numbered
    num_layers + k, as Megatron numbers them)."""
    return config.num_layers + (config.mtp_num_layers or 0)


def clear_aux_losses_tracker() -> None:
    for entry in get_moe_layer_wise_logging_tracker().values():
        if "values" in entry:
            entry["values"].zero_()


def get_moe_layer_wise_logging_tracker() -> dict:
    """{loss name: {"values": per-layer sums since the last clear, "reduce_group": where to average them}}."""
    return parallel_state.get_moe_layer_wise_logging_tracker()


def get_capacity(
    num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: Optional[int] = None
) -> int:
    """Tokens one expert may take: ceil(num_tokens / num_experts * capacity_factor), at least `min_capacity`."""
    capacity = math.ceil(num_tokens / num_experts * capacity_factor)
    return capacity if min_capacity is None else max(capacity, min_capacity)


def apply_router_token_dropping(
    routing_probs: torch.Tensor,
    routing_map: torch.Tensor,
    router_topk: int,
    capacity_factor: float,
    drop_policy: str = "probs",
    pad_to_capacity: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep at most `capacity` tokens per expert: those with the highest probabilities ("probs") or the earliest
    ("position"). With `pad_to_capacity` every expert gets exactly `capacity` rows (min(capacity, T)), the padding
    being tokens that were not routed to it, with probability zero."""
    num_tokens, num_experts = routing_probs.shape
    capacity = get_capacity(num_tokens * router_topk, num_experts, capacity_factor)
    if capacity >= num_tokens:
        capacity_mask = torch.ones_like(routing_map)
    else:
        # Routed tokens rank above unrouted ones (padding), each group ordered by the policy.
        position = torch.arange(num_tokens, 0, -1, device=routing_map.device, dtype=torch.float64).unsqueeze(1)
        if drop_policy == "probs":
            priority = routing_probs.detach().double()
        elif drop_policy == "position":
            priority = position.expand(-1, num_experts)
        else:
            raise ValueError(f"unknown MoE token drop policy {drop_policy!r}")
        key = torch.where(routing_map, priority + 2 * num_tokens + 1, position)
        kept = key.topk(capacity, dim=0).indices
        capacity_mask = torch.zeros_like(routing_map).scatter(0, kept, True)
    final_map = capacity_mask if pad_to_capacity else routing_map & capacity_mask
    return routing_probs * final_map, final_map


def permute(
    tokens: torch.Tensor, routing_map: torch.Tensor, probs: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """One copy of each token per expert it is routed to, ordered expert-major and by token within an expert.

    Returns (copies, their probabilities or None, the source token of each copy for `unpermute`)."""
    num_tokens = tokens.shape[0]
    expert_major_map = routing_map.T
    token_ids = torch.arange(num_tokens, device=routing_map.device).expand(routing_map.shape[1], -1)
    sorted_indices = token_ids.masked_select(expert_major_map)
    permuted_probs = None if probs is None else probs.T.masked_select(expert_major_map)
    return tokens.index_select(0, sorted_indices), permuted_probs, sorted_indices


def unpermute(permuted_tokens: torch.Tensor, sorted_indices: torch.Tensor, restore_shape: torch.Size) -> torch.Tensor:
    """Sum the copies back into token order (the inverse of `permute`; weights are applied by the experts)."""
    output = torch.zeros(restore_shape, dtype=permuted_tokens.dtype, device=permuted_tokens.device)
    return output.index_add(0, sorted_indices, permuted_tokens)


def sort_chunks_by_idxs(
    input: torch.Tensor, split_sizes: Sequence[int], sorted_idxs: Sequence[int], probs: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Cut `input` (and `probs`) into chunks of `split_sizes` and concatenate them in the order `sorted_idxs`."""

    def reorder(tensor):
        chunks = torch.split(tensor, list(split_sizes), dim=0)
        return torch.cat([chunks[index] for index in sorted_idxs], dim=0)

    return reorder(input), (None if probs is None else reorder(probs))


def get_updated_expert_bias(
    tokens_per_expert: torch.Tensor,
    expert_bias: torch.Tensor,
    expert_bias_update_rate: float,
    group: Optional[torch.distributed.ProcessGroup] = None,
) -> torch.Tensor:
    """Aux-loss-free balancing (DeepSeek-V3): bias_e + u * sign(mean(n) - n_e), the counts n summed over `group`
    (tensor x data x context parallel) first; works on one router [E] or a stack of routers [L, E]."""
    with torch.no_grad():
        counts = all_reduce_sum(tokens_per_expert.float(), group)
        average = counts.mean(dim=-1, keepdim=True)
        return expert_bias + torch.sign(average - counts) * expert_bias_update_rate


def update_routers_expert_bias(routers, group: Optional[torch.distributed.ProcessGroup] = None) -> None:
    """The once-per-global-batch expert-bias step (after the gradient reduction, before the optimizer): every
    training router with an expert bias moves it by get_updated_expert_bias and restarts its token counts."""
    routers = [router for router in routers if router.enable_expert_bias and router.training]
    if not routers:
        return
    counts = torch.stack([router.local_tokens_per_expert for router in routers])
    biases = torch.stack([router.expert_bias for router in routers])
    rate = routers[0].config.moe_router_bias_update_rate
    with torch.no_grad():
        for router, bias in zip(routers, get_updated_expert_bias(counts, biases, rate, group)):
            router.expert_bias.copy_(bias)
            router.local_tokens_per_expert.zero_()
