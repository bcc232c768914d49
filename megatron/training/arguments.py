"""Every command-line flag of the training scripts, with Megatron-LM's names and defaults.

Flags are grouped by concern, one `_add_*_args` function per group; `parse_args` assembles them.
"""

import argparse


def parse_args(extra_args_provider=None, ignore_unknown_args=False, args_list=None):
    """Parse the training flags (from `args_list`, or sys.argv when None)."""
    parser = build_parser(extra_args_provider)
    if ignore_unknown_args:
        args, _ = parser.parse_known_args(args_list)
    else:
        args = parser.parse_args(args_list)
    return args


def build_parser(extra_args_provider=None):
    """The parser with every flag group; `extra_args_provider(parser)` may add a script's own flags."""
    parser = argparse.ArgumentParser(description="Megatron-style arguments", allow_abbrev=False)
    for add_group in ARGUMENT_GROUPS:
        parser = add_group(parser)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    return parser


def add_tokenizer_args(parser):
    """Tokenizer flags, shared by training and tools/preprocess_data.py."""
    group = parser.add_argument_group(title="tokenizer")
    group.add_argument(
        "--tokenizer-type",
        type=str,
        default=None,
        help="GPT2BPETokenizer, SentencePieceTokenizer, Llama2Tokenizer, HuggingFaceTokenizer "
        "(alias PretrainedFromHF) or NullTokenizer.",
    )
    group.add_argument("--vocab-file", type=str, default=None, help="GPT-2 BPE vocab.json.")
    group.add_argument("--merge-file", type=str, default=None, help="GPT-2 BPE merges.txt.")
    group.add_argument(
        "--tokenizer-model",
        type=str,
        default=None,
        help="SentencePiece model file, or a Hugging Face tokenizer directory.",
    )
    group.add_argument(
        "--tokenizer-name-or-path",
        type=str,
        default=None,
        help="Local Hugging Face tokenizer directory (loaded offline).",
    )
    group.add_argument("--vocab-size", type=int, default=None, help="Vocabulary size of the NullTokenizer.")
    group.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="Pad the model's vocabulary to a multiple of this value times the tensor-parallel size.",
    )
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Allow a local Hugging Face tokenizer directory to run its own code.",
    )
    return parser


ARGUMENT_GROUPS = [
    add_tokenizer_args,
]
