"""Process-wide singletons of a training run: the parsed args, tokenizer, writers and signal handler.

Set once by `set_global_variables` during initialisation; `get_*` raise a clear error when read too early.
"""

from megatron.core.num_microbatches_calculator import (
    destroy_num_microbatches_calculator,
    init_num_microbatches_calculator,
)
from megatron.training import tokenizer
from megatron.training.dist_signal_handler import DistributedSignalHandler
from megatron.training.timers import Timers

_GLOBAL_ARGS = None
_GLOBAL_TOKENIZER = None
_GLOBAL_TENSORBOARD_WRITER = None
_GLOBAL_WANDB_WRITER = None
_GLOBAL_SIGNAL_HANDLER = None
_GLOBAL_TIMERS = None


def _ensure_set(value, name: str):
    if value is None:
        raise RuntimeError(f"{name} is not initialised; call megatron.training.initialize.initialize_megatron first")
    return value


def get_args():
    return _ensure_set(_GLOBAL_ARGS, "args")


def set_args(args) -> None:
    global _GLOBAL_ARGS
    _GLOBAL_ARGS = args


def get_tokenizer():
    return _ensure_set(_GLOBAL_TOKENIZER, "tokenizer")


def get_timers() -> Timers:
    """The run's named timers (Megatron-LM's get_timers), created with the args' --timing-log-level."""
    return _ensure_set(_GLOBAL_TIMERS, "timers")


def get_tensorboard_writer():
    """The TensorBoard SummaryWriter on the logging rank, else None."""
    return _GLOBAL_TENSORBOARD_WRITER


def get_wandb_writer():
    """The wandb module (after wandb.init) on the logging rank, else None."""
    return _GLOBAL_WANDB_WRITER


def get_signal_handler():
    return _ensure_set(_GLOBAL_SIGNAL_HANDLER, "signal handler (--exit-signal-handler)")


def set_global_variables(args, build_tokenizer: bool = True) -> None:
    """Install args, the micro-batch calculator, the tokenizer and (with --exit-signal-handler) the handler."""
    global _GLOBAL_TOKENIZER, _GLOBAL_SIGNAL_HANDLER, _GLOBAL_TIMERS
    set_args(args)
    _GLOBAL_TIMERS = Timers(args.timing_log_level, args.timing_log_option)
    destroy_num_microbatches_calculator()
    init_num_microbatches_calculator(
        args.rank,
        args.rampup_batch_size,
        args.global_batch_size,
        args.micro_batch_size,
        args.data_parallel_size,
        args.decrease_batch_size_if_needed,
    )
    if build_tokenizer and args.tokenizer_type is not None:
        _GLOBAL_TOKENIZER = tokenizer.build_tokenizer(args)
    if args.exit_signal_handler:
        _GLOBAL_SIGNAL_HANDLER = DistributedSignalHandler().__enter__()


def set_logging_writers(tensorboard_writer, wandb_writer) -> None:
    global _GLOBAL_TENSORBOARD_WRITER, _GLOBAL_WANDB_WRITER
    _GLOBAL_TENSORBOARD_WRITER = tensorboard_writer
    _GLOBAL_WANDB_WRITER = wandb_writer


def destroy_global_vars() -> None:
    """Forget every singleton (tests run several trainings in one process)."""
    global _GLOBAL_ARGS, _GLOBAL_TOKENIZER, _GLOBAL_TENSORBOARD_WRITER, _GLOBAL_WANDB_WRITER, _GLOBAL_SIGNAL_HANDLER
    global _GLOBAL_TIMERS
    if _GLOBAL_TENSORBOARD_WRITER is not None:
        _GLOBAL_TENSORBOARD_WRITER.close()
    if _GLOBAL_SIGNAL_HANDLER is not None:
        _GLOBAL_SIGNAL_HANDLER.release()
    _GLOBAL_ARGS = _GLOBAL_TOKENIZER = _GLOBAL_TENSORBOARD_WRITER = _GLOBAL_WANDB_WRITER = None
    _GLOBAL_SIGNAL_HANDLER = _GLOBAL_TIMERS = None
    destroy_num_microbatches_calculator()
