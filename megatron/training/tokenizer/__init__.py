"""`build_tokenizer(args)`: the tokenizer named by --tokenizer-type, and the model's padded vocabulary."""

from megatron.training.tokenizer.tokenizer import (
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
    Llama2Tokenizer,
    MegatronTokenizer,
    NullTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    require_file,
    vocab_size_with_padding,
)

TOKENIZER_TYPES = (
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "Llama2Tokenizer",
    "HuggingFaceTokenizer",
    "PretrainedFromHF",
    "NullTokenizer",
)


def build_tokenizer(args) -> MegatronTokenizer:
    """Build the tokenizer from parsed flags; also sets `args.padded_vocab_size` when it is unset."""
    tokenizer_type = getattr(args, "tokenizer_type", None)
    if tokenizer_type == "GPT2BPETokenizer":
        tokenizer = GPT2BPETokenizer(
            require_file(args.vocab_file, "--vocab-file", tokenizer_type),
            require_file(args.merge_file, "--merge-file", tokenizer_type),
        )
    elif tokenizer_type == "SentencePieceTokenizer":
        tokenizer = SentencePieceTokenizer(
            require_file(args.tokenizer_model, "--tokenizer-model", tokenizer_type),
            vocab_extra_ids=getattr(args, "vocab_extra_ids", 0),
        )
    elif tokenizer_type == "Llama2Tokenizer":
        tokenizer = Llama2Tokenizer(require_file(args.tokenizer_model, "--tokenizer-model", tokenizer_type))
    elif tokenizer_type in ("HuggingFaceTokenizer", "PretrainedFromHF"):
        directory = getattr(args, "tokenizer_name_or_path", None) or args.tokenizer_model
        if directory is None:
            raise TokenizerError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-name-or-path DIR")
        tokenizer = HuggingFaceTokenizer(directory, trust_remote_code=getattr(args, "trust_remote_code", False))
    elif tokenizer_type == "NullTokenizer":
        tokenizer = NullTokenizer(args.vocab_size)
    else:
        raise TokenizerError(
            f"unknown --tokenizer-type {tokenizer_type!r}; choose one of: {', '.join(TOKENIZER_TYPES)}"
        )

    if getattr(args, "padded_vocab_size", None) is None:
        args.padded_vocab_size = vocab_size_with_padding(
            tokenizer.vocab_size,
            getattr(args, "make_vocab_size_divisible_by", 128),
            getattr(args, "tensor_model_parallel_size", 1),
        )
    return tokenizer


__all__ = [
    "GPT2BPETokenizer",
    "HuggingFaceTokenizer",
    "Llama2Tokenizer",
    "MegatronTokenizer",
    "NullTokenizer",
    "SentencePieceTokenizer",
    "TOKENIZER_TYPES",
    "TokenizerError",
    "build_tokenizer",
    "vocab_size_with_padding",
]
