"""The application layer; Megatron-LM's entry-script names are importable from here.

They are imported on first use (PEP 562): initialize_megatron and pretrain pull in the whole training stack
(models, optimizer, checkpoint formats) and the others torch, while tools that need only a tokenizer
(tools/preprocess_data.py) should start in a fraction of a second."""

import importlib

_LAZY = {
    "get_args": "megatron.training.global_vars",
    "get_signal_handler": "megatron.training.global_vars",
    "get_tensorboard_writer": "megatron.training.global_vars",
    "get_timers": "megatron.training.global_vars",
    "get_tokenizer": "megatron.training.global_vars",
    "get_wandb_writer": "megatron.training.global_vars",
    "print_rank_0": "megatron.training.utils",
    "print_rank_last": "megatron.training.utils",
    "is_last_rank": "megatron.training.utils",
    "initialize_megatron": "megatron.training.initialize",
    "pretrain": "megatron.training.training",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
