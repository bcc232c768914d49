"""Tokenizers behind one interface, selected by Megatron-LM's `--tokenizer-type`.

Each exposes `vocab_size`, `eod`, `bos`, `pad`, `tokenize(text)` and `detokenize(ids)`. A special token a
tokenizer does not have is -1 (Megatron's convention), so comparisons like `labels == pad` need no guard.
Token ids equal Megatron-LM's for the same tokenizer files, which keeps preprocessed datasets identical.
"""

import json
import os
from abc import ABC, abstractmethod
from typing import Dict, List, Sequence
from megatron.core.errors import UserError

NO_TOKEN = -1


class TokenizerError(UserError, ValueError):
    """A tokenizer that cannot be built from the given flags or files."""


class MegatronTokenizer(ABC):
    """The interface every tokenizer implements."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (before padding for the model)."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """End-of-document id, appended by --append-eod and used to reset positions and masks."""

    @property
    def bos(self) -> int:
        return NO_TOKEN

    @property
    def pad(self) -> int:
        return NO_TOKEN

    @abstractmethod
    def tokenize(self, text: str) -> List[int]:
        """Token ids of `text`."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of `ids`."""


def require_file(path, flag: str, tokenizer_type: str) -> str:
    if path is None:
        raise TokenizerError(f"--tokenizer-type {tokenizer_type} needs {flag}")
    if not os.path.isfile(path):
        raise TokenizerError(f"{flag} {path}: no such file (needed by --tokenizer-type {tokenizer_type})")
    return path


class GPT2BPETokenizer(MegatronTokenizer):
    """GPT-2 byte-level BPE from vocab.json + merges.txt, run by Hugging Face's Rust `tokenizers`.

    `<|endoftext|>` inside text is encoded as plain characters, exactly as Megatron-LM's GPT-2 tokenizer does.
    """

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        with open(vocab_file, encoding="utf-8") as stream:
            try:
                vocab: Dict[str, int] = json.load(stream)
            except json.JSONDecodeError as error:
                raise TokenizerError(f"--vocab-file {vocab_file} is not a GPT-2 vocab.json: {error}") from None
        merges = _read_bpe_merges(merge_file)
        self._tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        self._tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tokenizer.decoder = decoders.ByteLevel()
        self._vocab_size = len(vocab)
        if "<|endoftext|>" not in vocab:
            raise TokenizerError(f"--vocab-file {vocab_file} has no <|endoftext|> token")
        self._eod = vocab["<|endoftext|>"]

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def bos(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> List[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)


def _read_bpe_merges(merge_file: str):
    """Merge pairs from merges.txt, skipping its '#version' header."""
    merges = []
    with open(merge_file, encoding="utf-8") as stream:
        for line_number, line in enumerate(stream, start=1):
            line = line.rstrip("\n")
            if not line or line.startswith("#version"):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise TokenizerError(f"--merge-file {merge_file}:{line_number}: expected two tokens, got {line!r}")
            merges.append((parts[0], parts[1]))
    return merges


def _load_sentencepiece(model_file: str):
    import sentencepiece

    try:
        return sentencepiece.SentencePieceProcessor(model_file=model_file)
    except (OSError, RuntimeError) as error:
        raise TokenizerError(f"--tokenizer-model {model_file} is not a SentencePiece model: {error}") from None


class SentencePieceTokenizer(MegatronTokenizer):
    """A SentencePiece model with Megatron-LM's added special tokens.

    As in Megatron-LM, <CLS>, <SEP>, <EOD>, <MASK> (and <PAD>/<BOS>/<EOS> when the model lacks them) get ids
    after the model's pieces, and their literal text inside the input is encoded as that one id.
    """

    def __init__(self, model_file: str, vocab_extra_ids: int = 0) -> None:
        self._model = _load_sentencepiece(model_file)
        self._vocab = {self._model.id_to_piece(i): i for i in range(self._model.get_piece_size())}
        self._special_tokens: Dict[str, int] = {}
        self._cls = self._add_special_token("<CLS>")
        self._sep = self._add_special_token("<SEP>")
        self._eod = self._add_special_token("<EOD>")
        self._mask = self._add_special_token("<MASK>")
        self._pad = self._add_special_token(self._piece_or(self._model.pad_id(), "<PAD>"))
        self._bos = self._add_special_token(self._piece_or(self._model.bos_id(), "<BOS>"))
        self._eos = self._add_special_token(self._piece_or(self._model.eos_id(), "<EOS>"))
        for extra in range(vocab_extra_ids):
            self._add_special_token(f"<extra_id_{extra}>")
        self._special_by_id = {token_id: token for token, token_id in self._special_tokens.items()}

    def _piece_or(self, piece_id: int, fallback: str) -> str:
        return self._model.id_to_piece(piece_id) if 0 <= piece_id < self._model.get_piece_size() else fallback

    def _add_special_token(self, token: str) -> int:
        if token not in self._vocab:
            self._vocab[token] = len(self._vocab)
        self._special_tokens[token] = self._vocab[token]
        return self._vocab[token]

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def bos(self) -> int:
        return self._bos

    @property
    def pad(self) -> int:
        return self._pad

    def tokenize(self, text: str) -> List[int]:
        ids: List[int] = []
        start = 0
        while True:
            found = [(text.find(token, start), order, token) for order, token in enumerate(self._special_tokens)]
            found = [hit for hit in found if hit[0] >= 0]
            if not found:
                break
            position, _, token = min(found)
            ids.extend(self._model.encode_as_ids(text[start:position]))
            ids.append(self._special_tokens[token])
            start = position + len(token)
        ids.extend(self._model.encode_as_ids(text[start:]))
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        text = ""
        segment_start = 0
        ids = list(ids)
        for position, token_id in enumerate(ids):
            if token_id in self._special_by_id:
                text += self._model.decode_ids(ids[segment_start:position]) + " "
                text += self._special_by_id[token_id] + " "
                segment_start = position + 1
        return text + self._model.decode_ids(ids[segment_start:])


class Llama2Tokenizer(MegatronTokenizer):
    """The Llama 2 SentencePiece tokenizer: BOS before every text, EOS as end of document."""

    def __init__(self, model_file: str) -> None:
        self._model = _load_sentencepiece(model_file)

    @property
    def vocab_size(self) -> int:
        return self._model.get_piece_size()

    @property
    def eod(self) -> int:
        return self._model.eos_id()

    @property
    def bos(self) -> int:
        return self._model.bos_id()

    @property
    def pad(self) -> int:
        return self._model.pad_id()

    def tokenize(self, text: str, bos: bool = True, eos: bool = False) -> List[int]:
        ids = self._model.encode(text)
        return ([self.bos] if bos else []) + ids + ([self.eod] if eos else [])

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._model.decode_ids(list(ids))


class HuggingFaceTokenizer(MegatronTokenizer):
    """Any tokenizer `transformers.AutoTokenizer` loads from a local directory, offline."""

    def __init__(self, name_or_path: str, trust_remote_code: bool = False) -> None:
        if not os.path.isdir(name_or_path):
            raise TokenizerError(
                f"Hugging Face tokenizer {name_or_path!r} is not a local directory; downloads are disabled, "
                "so pass a directory holding tokenizer.json / tokenizer_config.json"
            )
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(
                name_or_path, local_files_only=True, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as error:
            raise TokenizerError(f"cannot load a Hugging Face tokenizer from {name_or_path}: {error}") from None

    @property
    def vocab_size(self) -> int:
        return len(self._tokenizer)

    @property
    def eod(self) -> int:
        return _id_or_none(self._tokenizer.eos_token_id)

    @property
    def bos(self) -> int:
        return _id_or_none(self._tokenizer.bos_token_id)

    @property
    def pad(self) -> int:
        return _id_or_none(self._tokenizer.pad_token_id)

    def tokenize(self, text: str) -> List[int]:
        return self._tokenizer(text).input_ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids))


def _id_or_none(token_id) -> int:
    return NO_TOKEN if token_id is None else token_id


class NullTokenizer(MegatronTokenizer):
    """Text is space-separated ids already; the end-of-document id is `vocab_size` (one past the last id)."""

    def __init__(self, vocab_size: int) -> None:
        if vocab_size is None or vocab_size <= 0:
            raise TokenizerError("--tokenizer-type NullTokenizer needs a positive --vocab-size")
        self._vocab_size_without_eod = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size_without_eod + 1

    @property
    def eod(self) -> int:
        return self._vocab_size_without_eod

    def tokenize(self, text: str) -> List[int]:
        return [int(token) for token in text.split()]

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(token_id) for token_id in ids)


def vocab_size_with_padding(
    orig_vocab_size: int, make_vocab_size_divisible_by: int, tensor_model_parallel_size: int = 1
) -> int:
    """The embedding rows the model allocates: the vocabulary rounded up so every tensor-parallel shard
    holds a multiple of `make_vocab_size_divisible_by` rows (the one place this is computed)."""
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-orig_vocab_size // multiple) * multiple


def _vocab_size_with_padding(orig_vocab_size: int, args, logging_enabled: bool = True) -> int:
    """Megatron-LM's name and signature for vocab_size_with_padding, reading the sizes from `args`."""
    padded = vocab_size_with_padding(
        orig_vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size
    )
    if logging_enabled and getattr(args, "rank", 0) == 0:
        print(
            f" > padded vocab (size: {orig_vocab_size}) with {padded - orig_vocab_size} dummy tokens "
            f"(new size: {padded})",
            flush=True,
        )
    return padded
