"""The routed experts of one rank: `num_local_experts` MLPs of width moe_ffn_hidden_size.

Both classes store `local_experts.{i}.linear_fc1/linear_fc2` (Megatron's SequentialMLP names, also what its local
spec writes with --moe-grouped-gemm), so checkpoints and the HF converter see one layout; `i` is the local index,
global expert `ep_rank * num_local_experts + i`.
"""

from typing import List, Optional, Sequence

import torch

from megatron.core.transformer.mlp import MLP, MLPSubmodules, apply_mlp_activation
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEProcessGroups, group_rank
from megatron.core.transformer.pipeline_layout import layout_independent_init
from megatron.core.transformer.transformer_config import TransformerConfig


def _split_sizes(tokens_per_expert) -> List[int]:
    return tokens_per_expert.tolist() if isinstance(tokens_per_expert, torch.Tensor) else list(tokens_per_expert)


def _weighted(output: torch.Tensor, bias: Optional[torch.Tensor], probs: torch.Tensor) -> torch.Tensor:
    """p * (output + bias): the routing weight scales the whole expert output (Megatron scales fc2's input and
    its bias, the same product)."""
    if bias is not None:
        output = output + bias
    return (output * probs.unsqueeze(-1)).to(output.dtype)


class SequentialMLP(MegatronModule):
    """Runs each local expert on its contiguous block of tokens."""

    def __init__(
        self,
        num_local_experts: int,
        config: TransformerConfig,
        submodules: MLPSubmodules,
        pg_collection: Optional[MoEProcessGroups] = None,
    ):
        super().__init__(config)
        self.num_local_experts = num_local_experts
        first = group_rank(pg_collection.ep if pg_collection is not None else None) * num_local_experts
        self.local_experts = torch.nn.ModuleList(
            self._build_expert(config, submodules, first + index) for index in range(num_local_experts)
        )
        for param in self.parameters():
            # Expert weights differ across expert-parallel ranks: reduce their gradients over expert-data-parallel
            # ranks only (Megatron's DDP reads `allreduce`).
            param.allreduce = False

    @staticmethod
    def _build_expert(config: TransformerConfig, submodules: MLPSubmodules, global_index: int) -> MLP:
        """Expert `global_index`, drawn (with --use-cpu-initialization) from a stream of its own, so it has the
        same weights at every expert-parallel size. The offset keeps clear of the other modules' positions."""
        with layout_independent_init(config, (config.num_layers + 2) * (global_index + 1)):
            return MLP(config, submodules, ffn_hidden_size=config.moe_ffn_hidden_size, is_expert=True)

    def forward(self, permuted_local_hidden_states, tokens_per_expert: Sequence[int], permuted_probs):
        """Tokens grouped by local expert (`tokens_per_expert` rows each) -> weighted outputs, same order;
        returns (output, None) like the dense MLP (biases are already added)."""
        sizes = _split_sizes(tokens_per_expert)
        outputs = [
            _weighted(*expert(tokens), probs)
            for expert, tokens, probs in zip(
                self.local_experts,
                torch.split(permuted_local_hidden_states, sizes),
                torch.split(permuted_probs, sizes),
            )
        ]
        return torch.cat(outputs, dim=0), None


def _grouped_mm_fits(tokens: torch.Tensor, *widths: int) -> bool:
    """torch._grouped_mm exists here, takes this device and dtype (on GPUs: bf16 on Hopper or newer) and its
    16-byte stride rule holds for these row widths."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if tokens.is_cuda and (tokens.dtype != torch.bfloat16 or torch.cuda.get_device_capability(tokens.device)[0] < 9):
        return False
    return all(width * tokens.element_size() % 16 == 0 for width in widths)


def _per_token(per_expert: Optional[torch.Tensor], sizes: List[int]) -> Optional[torch.Tensor]:
    """Row g of `per_expert` repeated for each of expert g's tokens."""
    if per_expert is None:
        return None
    return torch.repeat_interleave(per_expert, torch.tensor(sizes, device=per_expert.device), dim=0)


def _grouped_linear(tokens, weights, offsets):
    """Row block g of `tokens` times weights[g]^T, for all g in one grouped GEMM."""
    output = torch._grouped_mm(tokens, weights.transpose(1, 2), offs=offsets)
    if output.requires_grad:
        output.register_hook(torch.Tensor.contiguous)  # its backward rejects broadcast (stride-0) gradients
    return output


class GroupedGemmMLP(SequentialMLP):
    """--moe-grouped-gemm: all local experts in one grouped GEMM per projection (torch._grouped_mm over the
    stacked weights), falling back to SequentialMLP's loop where torch lacks it or the widths break its 16-byte
    alignment rule. Same parameters and results as SequentialMLP."""

    def forward(self, permuted_local_hidden_states, tokens_per_expert: Sequence[int], permuted_probs):
        sizes = _split_sizes(tokens_per_expert)
        fc1, fc2 = self.local_experts[0].linear_fc1, self.local_experts[0].linear_fc2
        widths = (*fc1.weight.shape, fc2.weight.shape[1])  # this rank's slice under expert tensor parallelism
        if sum(sizes) == 0 or not _grouped_mm_fits(permuted_local_hidden_states, *widths):
            return super().forward(permuted_local_hidden_states, sizes, permuted_probs)
        offsets = torch.tensor(sizes, device=permuted_local_hidden_states.device).cumsum(0).to(torch.int32)
        fc1_weight, fc1_bias = self._stacked("linear_fc1")
        fc2_weight, fc2_bias = self._stacked("linear_fc2")
        intermediate = _grouped_linear(permuted_local_hidden_states, fc1_weight, offsets)
        activated = apply_mlp_activation(intermediate, _per_token(fc1_bias, sizes), self.config)
        output = _grouped_linear(activated, fc2_weight, offsets)
        return _weighted(output, _per_token(fc2_bias, sizes), permuted_probs), None

    def _stacked(self, projection: str):
        """(weights [L, out, in], biases [L, out] or None) of one projection over the local experts."""
        layers = [getattr(expert, projection) for expert in self.local_experts]
        weight = torch.stack([layer.weight for layer in layers])
        return weight, (None if layers[0].bias is None else torch.stack([layer.bias for layer in layers]))
