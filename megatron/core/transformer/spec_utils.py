"""ModuleSpec and build_module: a model's structure written as data, so variants (local kernels,
Transformer Engine kernels, extra norms) are new specs rather than new classes."""

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Union


@dataclass
class ModuleSpec:
    """What to build: `module` (a class or function), extra constructor `params`, and `submodules`
    (a dataclass of further specs) handed to the constructor as `submodules=`."""

    module: Union[type, Callable]
    params: Dict[str, Any] = field(default_factory=dict)
    submodules: Any = None


def build_module(spec_or_module, *args, **kwargs):
    """Instantiate a spec (or a bare class) with the given arguments plus the spec's params and submodules."""
    if not isinstance(spec_or_module, ModuleSpec):
        return spec_or_module(*args, **kwargs)
    spec = spec_or_module
    if spec.submodules is not None:
        kwargs["submodules"] = spec.submodules
    return spec.module(*args, **spec.params, **kwargs)
