"""The application layer; Megatron-LM's entry-script names are importable from here."""

from megatron.training.global_vars import get_args, get_signal_handler, get_tensorboard_writer, get_timers, get_tokenizer, get_wandb_writer
from megatron.training.initialize import initialize_megatron
from megatron.training.training import pretrain
from megatron.training.utils import print_rank_0, print_rank_last, is_last_rank
