"""The tokenizer flags, in a module of their own so that tools/preprocess_data.py can parse them without
importing torch (megatron.training.arguments re-exports them for training)."""


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
