"""OptimizerConfig: everything the optimizer factory needs, independent of argparse."""

from dataclasses import dataclass

import torch


@dataclass
class OptimizerConfig:
    """Optimizer, precision and loss-scaling settings (Megatron core's field names)."""

    optimizer: str = "adam"
    lr: float = None
    min_lr: float = None
    weight_decay: float = 0.01

    fp16: bool = False
    bf16: bool = False
    params_dtype: torch.dtype = torch.float32

    loss_scale: float = None
    """A fixed fp16 loss scale; None selects dynamic scaling."""
    initial_loss_scale: float = 2**32
    min_loss_scale: float = 1.0
    loss_scale_window: float = 1000
    hysteresis: int = 2

    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-08
    sgd_momentum: float = 0.9

    use_distributed_optimizer: bool = False
    """Shard fp32 master weights and optimizer state over data-parallel ranks (DistributedOptimizer)."""
    overlap_param_gather: bool = False
    """With the distributed optimizer: gather updated weights during the next forward pass, bucket by bucket."""

    clip_grad: float = 1.0
    log_num_zeros_in_grad: bool = False

    def __post_init__(self):
        if self.fp16 and self.bf16:
            raise ValueError("OptimizerConfig: fp16 and bf16 are mutually exclusive")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"OptimizerConfig: unknown optimizer {self.optimizer!r}; choose adam or sgd")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ValueError("OptimizerConfig: overlap_param_gather needs use_distributed_optimizer")
