"""The modular library (config dataclasses in, modules out); Megatron-core's top-level names.

They are imported on first use (PEP 562), so tools that need only a light part of core (the dataset writer in
tools/preprocess_data.py) do not pay for importing torch."""

import importlib

_TOP_LEVEL_NAMES = {
    "parallel_state": ("megatron.core.parallel_state", None),
    "mpu": ("megatron.core.parallel_state", None),  # parallel_state's legacy name, which Megatron-LM's scripts use
    "tensor_parallel": ("megatron.core.tensor_parallel", None),
    "utils": ("megatron.core.utils", None),
    "DistributedDataParallel": ("megatron.core.distributed", "DistributedDataParallel"),
    "InferenceParams": ("megatron.core.inference_params", "InferenceParams"),
    "ModelParallelConfig": ("megatron.core.model_parallel_config", "ModelParallelConfig"),
}

__all__ = ["parallel_state", "mpu", "DistributedDataParallel", "InferenceParams", "ModelParallelConfig"]


def __getattr__(name: str):
    if name not in _TOP_LEVEL_NAMES:
        raise AttributeError(f"module 'megatron.core' has no attribute {name!r}")
    module_name, attribute = _TOP_LEVEL_NAMES[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value
