"""Megatron-LM's experimental --yaml-cfg: a sectioned YAML file (language_model, model_parallel, ...).

arguments.parse_args applies the keys that name flags and keeps each section as args.<section>; this module
turns the sections into a TransformerConfig the way Megatron-LM's scripts ask for it.
"""

from types import SimpleNamespace

from megatron.training.arguments import ArgumentsError
from megatron.training.model_config import core_transformer_config_from_args

_ACTIVATIONS = {"gelu": False, "swiglu": True}


def core_transformer_config_from_yaml(args, transfomer_key: str = "language_model"):
    """The TransformerConfig of `args.<transfomer_key>` (the language_model section) together with the
    model_parallel section, over the parsed flags (set section values win; parameter name as in Megatron-LM)."""
    section = getattr(args, transfomer_key, None)
    if section is None:
        raise ArgumentsError(f"--yaml-cfg has no {transfomer_key!r} section; add one with the model's settings")
    settings = dict(vars(args))
    for overrides in (getattr(args, "model_parallel", SimpleNamespace()), section):
        settings.update({key: value for key, value in vars(overrides).items() if value is not None})
    activation = settings.pop("activation_func", None)
    if activation is not None:
        if activation not in _ACTIVATIONS:
            raise ArgumentsError(
                f"--yaml-cfg {transfomer_key}.activation_func {activation!r} is not supported; use gelu or swiglu"
            )
        settings["swiglu"] = _ACTIVATIONS[activation]
    if settings.get("layernorm_epsilon") is not None:
        settings["norm_epsilon"] = settings["layernorm_epsilon"]
    return core_transformer_config_from_args(SimpleNamespace(**settings))
