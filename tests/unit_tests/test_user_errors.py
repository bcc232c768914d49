"""Every error class the project raises for bad input derives from the one UserError base, so pretrain and
the tools report each of them as one line (and none escapes as a traceback)."""

import importlib
import inspect
import pkgutil

import megatron
from megatron.core.errors import UserError

# Errors that mean a bug in the calling code rather than bad input (Megatron asserts there): tracebacks on purpose.
PROGRAMMING_ERRORS = {"megatron.core.parallel_state.GroupNotInitializedError"}
TOOL_MODULES = ("tools.preprocess_data", "tools.generate", "tools.checkpoint.convert", "tools.checkpoint.hf_families")


def _project_modules():
    for module in pkgutil.walk_packages(megatron.__path__, "megatron."):
        if module.name.startswith("megatron.core.datasets.helpers_cpp"):
            continue
        yield importlib.import_module(module.name)
    for name in TOOL_MODULES:
        yield importlib.import_module(name)


def test_every_project_error_class_is_a_user_error():
    errors = {
        f"{cls.__module__}.{cls.__name__}": cls
        for module in _project_modules()
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, Exception) and cls.__module__ == module.__name__
    }
    assert len(errors) >= 15, sorted(errors)
    assert {name for name, cls in errors.items() if not issubclass(cls, UserError)} == PROGRAMMING_ERRORS
