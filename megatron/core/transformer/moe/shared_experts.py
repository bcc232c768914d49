"""SharedExpertMLP: experts every token uses, run as one dense MLP beside the routed experts."""

import torch
import torch.nn.functional as F

from megatron.core.tensor_parallel.layers import parameter_device
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig


class SharedExpertMLP(MLP):
    """A dense MLP of width moe_shared_expert_intermediate_size (all shared experts side by side), optionally
    scaled per token by sigmoid(x . gate_weight) (Qwen2-MoE's shared-expert gate)."""

    def __init__(self, config: TransformerConfig, submodules: MLPSubmodules, gate: bool = False):
        super().__init__(config, submodules, ffn_hidden_size=config.moe_shared_expert_intermediate_size)
        self.use_shared_expert_gate = gate
        if gate:
            self.gate_weight = torch.nn.Parameter(torch.empty((1, config.hidden_size), device=parameter_device(config)))
            if config.perform_initialization:
                config.init_method(self.gate_weight.data)
            self.gate_weight.data = self.gate_weight.data.to(config.params_dtype)
            self.gate_weight.sequence_parallel = config.sequence_parallel
        else:
            self.gate_weight = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        output, bias = super().forward(hidden_states)
        if bias is not None:
            output = output + bias
        if self.use_shared_expert_gate:
            output = output * torch.sigmoid(F.linear(hidden_states, self.gate_weight))
        return output
