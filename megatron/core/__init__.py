"""The modular library (config dataclasses in, modules out); Megatron-core's top-level names."""

import megatron.core.tensor_parallel
import megatron.core.utils
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel
from megatron.core.inference_params import InferenceParams
from megatron.core.model_parallel_config import ModelParallelConfig

# parallel_state's legacy name, which Megatron-LM's scripts use.
mpu = parallel_state

__all__ = ["parallel_state", "mpu", "DistributedDataParallel", "InferenceParams", "ModelParallelConfig"]
