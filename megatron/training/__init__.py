"""The application layer; Megatron-LM's entry-script names are importable from here."""

import importlib

from megatron.training.global_vars import get_args, get_signal_handler, get_tensorboard_writer, get_timers, get_tokenizer, get_wandb_writer
from megatron.training.utils import print_rank_0, print_rank_last, is_last_rank

# initialize_megatron and pretrain pull in the whole training stack (models, optimizer, checkpoint formats):
# imported on first use, so that tools which only need a tokenizer (preprocess_data.py) start in a second.
_LAZY = {"initialize_megatron": "megatron.training.initialize", "pretrain": "megatron.training.training"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
