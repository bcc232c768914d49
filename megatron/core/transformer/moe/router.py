"""TopKRouter: scores every expert for every token, keeps the top k, and attaches the load-balancing losses."""

from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.tensor_parallel.layers import parameter_device
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    MoEProcessGroups,
    all_reduce_sum,
    apply_random_logits,
    apply_router_token_dropping,
    compute_routing_scores_for_aux_loss,
    group_size,
    num_layers_with_aux_losses,
    save_to_aux_losses_tracker,
    switch_load_balancing_loss_func,
    topk_routing_with_score_function,
    z_loss_func,
)
from megatron.core.transformer.transformer_config import TransformerConfig

ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
AUX_LOSS_NAMES = {
    "aux_loss": "load_balancing_loss",
    "seq_aux_loss": "seq_load_balancing_loss",
    "global_aux_loss": "global_load_balancing_loss",
}


class TopKRouter(MegatronModule):
    """Gating weight [E, H]; forward(x [s, b, H]) returns dense probabilities [s*b, E] and the routing map.

    With `moe_router_enable_expert_bias` it holds `expert_bias` (persistent, always fp32; used for selection only)
    and counts the tokens each expert received in `local_tokens_per_expert` until the bias update reads them.
    """

    def __init__(self, config: TransformerConfig, pg_collection: Optional[MoEProcessGroups] = None):
        super().__init__(config)
        self.pg_collection = pg_collection or MoEProcessGroups()
        self.num_experts = config.num_moe_experts
        self.topk = config.moe_router_topk
        self.routing_type = config.moe_router_load_balancing_type
        self.score_function = config.moe_router_score_function
        self.layer_number = None
        device = parameter_device(config)
        self.weight = torch.nn.Parameter(torch.empty((self.num_experts, config.hidden_size), device=device))
        self.bias = torch.nn.Parameter(torch.empty(self.num_experts, device=device)) if config.add_bias_linear else None
        self.reset_parameters()
        self.enable_expert_bias = config.moe_router_enable_expert_bias
        if self.enable_expert_bias:
            self.register_buffer("local_tokens_per_expert", torch.zeros(self.num_experts, device=device), False)
            self.register_buffer("expert_bias", torch.zeros(self.num_experts, device=device))
        else:
            self.local_tokens_per_expert = self.expert_bias = None
        if self.get_aux_loss_coeff("global_aux_loss") > 0:
            self.register_buffer("global_tokens_per_expert", torch.zeros(self.num_experts, device=device), False)
            self.register_buffer("ga_steps", torch.zeros((), device=device), False)

    def reset_parameters(self):
        """Initialise in fp32 (as Megatron does, so every precision starts from the same draw), then cast."""
        for param in (self.weight, self.bias):
            if param is None:
                continue
            if self.config.perform_initialization:
                self.config.init_method(param.data)
            param.data = param.data.to(self.config.params_dtype)
            # Replicated over tensor-parallel ranks that each route their own sequence shard under SP.
            param.sequence_parallel = self.config.sequence_parallel

    def set_layer_number(self, layer_number: int):
        self.layer_number = layer_number

    def get_aux_loss_coeff(self, aux_loss_type: str) -> float:
        """The coefficient of one balancing loss (0 when that type is not selected)."""
        types, coeffs = self.routing_type, self.config.moe_aux_loss_coeff
        if isinstance(types, str):
            return coeffs if types == aux_loss_type else 0.0
        return coeffs[types.index(aux_loss_type)] if aux_loss_type in types else 0.0

    def is_aux_loss_enabled(self) -> bool:
        return any(self.get_aux_loss_coeff(name) > 0 for name in AUX_LOSS_NAMES)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Router logits, computed in `moe_router_dtype` when it is set."""
        dtype = ROUTER_DTYPES.get(self.config.moe_router_dtype, input.dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(input.to(dtype), self.weight.to(dtype), bias)

    def apply_input_jitter(self, input: torch.Tensor) -> torch.Tensor:
        """--moe-input-jitter-eps: in training, scale each input element by a uniform draw from [1 - eps, 1 + eps]."""
        eps = self.config.moe_input_jitter_eps
        if eps is None or not self.training:
            return input
        noise = torch.empty_like(input).uniform_(1.0 - eps, 1.0 + eps)
        return input * noise

    def forward(self, input: torch.Tensor):
        self._keep_expert_bias_fp32()
        logits = self.gating(self.apply_input_jitter(input))
        if self.config.moe_router_force_load_balancing:
            logits = apply_random_logits(logits)
        return self.routing(logits)

    def routing(self, logits: torch.Tensor):
        """logits [s, b, E] -> (probs [s*b, E], routing_map [s*b, E]), attaching the aux losses in training."""
        seq_length, batch_size = logits.shape[:2]
        logits = self.apply_z_loss(logits.reshape(-1, self.num_experts))
        config = self.config
        probs, routing_map = topk_routing_with_score_function(
            logits,
            self.topk,
            use_pre_softmax=config.moe_router_pre_softmax,
            num_groups=config.moe_router_num_groups,
            group_topk=config.moe_router_group_topk,
            scaling_factor=config.moe_router_topk_scaling_factor,
            score_function=self.score_function,
            expert_bias=self.expert_bias,
        )
        if config.moe_expert_capacity_factor is not None:
            probs, routing_map = apply_router_token_dropping(
                probs,
                routing_map,
                self.topk,
                config.moe_expert_capacity_factor,
                config.moe_token_drop_policy,
                config.moe_pad_expert_input_to_capacity,
            )
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            aux_map, aux_scores = compute_routing_scores_for_aux_loss(logits, self.topk, self.score_function)
            probs = self._apply_aux_loss(probs, aux_scores, aux_map)
            probs = self._apply_seq_aux_loss(probs, aux_scores, aux_map, seq_length, batch_size)
            probs = self._apply_global_aux_loss(probs, aux_scores, aux_map)
        if self.enable_expert_bias and torch.is_grad_enabled():
            # Counted only in forwards that train (not in evaluation or no-grad recomputation).
            with torch.no_grad():
                self.local_tokens_per_expert += routing_map.sum(dim=0)
        return probs, routing_map

    @staticmethod
    def _token_counts(routing_map, reduce_group):
        """(tokens per expert, total tokens) over the ranks of `reduce_group`, which route different tokens."""
        tokens_per_expert = all_reduce_sum(routing_map.sum(dim=0).float(), reduce_group)
        return tokens_per_expert, routing_map.shape[0] * group_size(reduce_group)

    def _apply_aux_loss(self, probs, scores, routing_map):
        coeff = self.get_aux_loss_coeff("aux_loss")
        if coeff == 0:
            return probs
        group = self.pg_collection.tp_cp
        tokens_per_expert, total = self._token_counts(routing_map, group)
        loss = switch_load_balancing_loss_func(scores, tokens_per_expert, total, self.topk, self.num_experts, coeff)
        return self.attach_and_log_load_balancing_loss(probs, coeff, loss, "aux_loss", group)

    def _apply_seq_aux_loss(self, probs, scores, routing_map, seq_length, batch_size):
        """Per-sequence balancing: the batch is folded into the expert dimension, then the sum is averaged."""
        coeff = self.get_aux_loss_coeff("seq_aux_loss")
        if coeff == 0:
            return probs
        group = self.pg_collection.tp_cp
        scores = scores.reshape(seq_length, -1)
        tokens_per_expert, total = self._token_counts(routing_map.reshape(seq_length, -1), group)
        loss = switch_load_balancing_loss_func(scores, tokens_per_expert, total, self.topk, self.num_experts, coeff)
        return self.attach_and_log_load_balancing_loss(probs, coeff, loss / batch_size, "seq_aux_loss", group)

    def _apply_global_aux_loss(self, probs, scores, routing_map):
        """Balancing over the whole global batch: expert counts accumulate over micro-batches and data parallel."""
        coeff = self.get_aux_loss_coeff("global_aux_loss")
        if coeff == 0:
            return probs
        group = self.pg_collection.tp_dp_cp
        tokens_per_expert, total = self._token_counts(routing_map, group)
        with torch.no_grad():
            self.global_tokens_per_expert += tokens_per_expert
            self.ga_steps += 1
        average_tokens_per_expert = self.global_tokens_per_expert / self.ga_steps
        loss = switch_load_balancing_loss_func(
            scores, average_tokens_per_expert, total, self.topk, self.num_experts, coeff
        )
        return self.attach_and_log_load_balancing_loss(probs, coeff, loss, "global_aux_loss", group)

    def reset_global_aux_loss_tracker(self):
        """Start a new global batch for the global aux loss."""
        if self.get_aux_loss_coeff("global_aux_loss") > 0:
            self.global_tokens_per_expert.zero_()
            self.ga_steps.zero_()

    def attach_and_log_load_balancing_loss(self, activation, coeff, loss, aux_loss_type, reduce_group):
        save_to_aux_losses_tracker(
            AUX_LOSS_NAMES[aux_loss_type], loss / coeff, self.layer_number, num_layers_with_aux_losses(self.config), reduce_group
        )
        return MoEAuxLossAutoScaler.apply(activation, loss)

    def apply_z_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Attach the z-loss (divided over tensor x context parallel ranks, which each see part of the tokens)."""
        coeff = self.config.moe_z_loss_coeff
        if coeff is None or not self.training or not torch.is_grad_enabled():
            return logits
        coeff = coeff / group_size(self.pg_collection.tp_cp)
        z_loss = z_loss_func(logits, coeff)
        save_to_aux_losses_tracker("z_loss", z_loss / coeff, self.layer_number, num_layers_with_aux_losses(self.config))
        return MoEAuxLossAutoScaler.apply(logits, z_loss)

    def _keep_expert_bias_fp32(self):
        """Mixed-precision wrappers cast every buffer; the bias must stay fp32 to keep small updates."""
        if self.expert_bias is not None and self.expert_bias.dtype != torch.float32:
            self.expert_bias.data = self.expert_bias.data.float()

    def _load_from_state_dict(self, *args, **kwargs):
        self._keep_expert_bias_fp32()
        return super()._load_from_state_dict(*args, **kwargs)

    def _save_to_state_dict(self, *args, **kwargs):
        self._keep_expert_bias_fp32()
        return super()._save_to_state_dict(*args, **kwargs)
