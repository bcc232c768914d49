"""ModuleSpec and build_module: a model's structure written as data, so variants (local kernels,
Transformer Engine kernels, extra norms) are new specs rather than new classes."""

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Sequence, Union

from megatron.core.errors import UserError


class SpecImportError(UserError, ImportError):
    """--spec names a module or attribute that cannot be imported."""


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


def import_module(module_path: Sequence[str]):
    """The object `name` of module `base_path`, from `(base_path, name)` (the two words of --spec)."""
    if len(module_path) != 2:
        raise SpecImportError(f"--spec takes a module and a name (e.g. my_specs my_layer_spec), got {list(module_path)}")
    base_path, name = module_path
    try:
        module = importlib.import_module(base_path)
    except ImportError as error:
        raise SpecImportError(f"--spec: cannot import module {base_path!r} ({error}); is it on PYTHONPATH?") from None
    if not hasattr(module, name):
        raise SpecImportError(f"--spec: module {base_path!r} has no attribute {name!r}")
    return getattr(module, name)
