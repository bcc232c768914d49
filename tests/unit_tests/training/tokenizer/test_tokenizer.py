"""Tokenizer ids against independent references on real WikiText-2 text."""

import argparse
import json
import shutil

import pytest
import regex

from megatron.training.tokenizer import TokenizerError, build_tokenizer, vocab_size_with_padding
from tests.conftest import shared_path
from tests.reference_tokenizers import ReferenceGPT2BPE


def make_args(**flags):
    defaults = dict(
        tokenizer_type=None,
        vocab_file=None,
        merge_file=None,
        tokenizer_model=None,
        tokenizer_name_or_path=None,
        vocab_size=None,
        make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=1,
    )
    defaults.update(flags)
    return argparse.Namespace(**defaults)


@pytest.fixture(scope="module")
def wikitext_article():
    """The second article of WikiText-2's validation split (articles start at ' = Title = ' lines)."""
    lines = shared_path("data/wikitext-2/valid.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if regex.fullmatch(r" = [^=].* = \n", line)]
    return "".join(lines[starts[1] : starts[2]])


def test_gpt2_bpe_matches_reference_algorithm(gpt2_files, wikitext_article):
    vocab_file, merge_file = gpt2_files
    tokenizer = build_tokenizer(make_args(tokenizer_type="GPT2BPETokenizer", vocab_file=str(vocab_file), merge_file=str(merge_file)))
    reference = ReferenceGPT2BPE(vocab_file, merge_file)
    text = wikitext_article + " <|endoftext|> café 😀 don't  \n\n  "
    ids = tokenizer.tokenize(text)
    assert ids == reference.encode(text)
    assert len(ids) > 500
    assert tokenizer.detokenize(ids) == text
    assert (tokenizer.vocab_size, tokenizer.eod, tokenizer.pad) == (50257, 50256, -1)


def test_gpt2_bpe_matches_transformers(tmp_path, gpt2_files, wikitext_article):
    from transformers import GPT2TokenizerFast

    vocab_file, merge_file = gpt2_files
    tokenizer = build_tokenizer(make_args(tokenizer_type="GPT2BPETokenizer", vocab_file=str(vocab_file), merge_file=str(merge_file)))
    shutil.copy(vocab_file, tmp_path / "vocab.json")
    shutil.copy(merge_file, tmp_path / "merges.txt")
    reference = GPT2TokenizerFast.from_pretrained(str(tmp_path), local_files_only=True)
    assert tokenizer.tokenize(wikitext_article) == reference(wikitext_article).input_ids


def test_llama2_matches_sentencepiece(llama2_model, wikitext_article):
    import sentencepiece

    tokenizer = build_tokenizer(make_args(tokenizer_type="Llama2Tokenizer", tokenizer_model=str(llama2_model)))
    reference = sentencepiece.SentencePieceProcessor(model_file=str(llama2_model))
    assert tokenizer.tokenize("Hello world") == [1, 15043, 3186]
    assert tokenizer.tokenize(wikitext_article) == [1] + reference.encode(wikitext_article)
    assert (tokenizer.vocab_size, tokenizer.eod, tokenizer.bos, tokenizer.pad) == (32000, 2, 1, -1)
    assert tokenizer.detokenize(tokenizer.tokenize("Hello world")) == "Hello world"


def test_sentencepiece_special_tokens_follow_megatron(llama2_model, wikitext_article):
    import sentencepiece

    tokenizer = build_tokenizer(make_args(tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(llama2_model)))
    reference = sentencepiece.SentencePieceProcessor(model_file=str(llama2_model))
    # <CLS> <SEP> <EOD> <MASK> <PAD> are added after the 32000 pieces; <s> and </s> exist already.
    assert (tokenizer.vocab_size, tokenizer.eod, tokenizer.pad, tokenizer.bos) == (32005, 32002, 32004, 1)
    assert tokenizer.tokenize(wikitext_article) == reference.encode(wikitext_article)
    assert tokenizer.tokenize("Hello<EOD>world</s>") == [15043, 32002, 3186, 2]
    assert tokenizer.detokenize([15043, 32002, 3186]) == "Hello <EOD> world"


def save_llama_hf_tokenizer(model_file, directory):
    """A Hugging Face tokenizer directory reproducing the SentencePiece model exactly: BPE with byte fallback
    over the model's pieces and merges, with SentencePiece's dummy-prefix and space-to-'▁' normalisation."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

    vocab, _, merges = SentencePieceExtractor(str(model_file)).extract()
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>").save_pretrained(str(directory))


def test_huggingface_directory_matches_sentencepiece(tmp_path, llama2_model, wikitext_article):
    save_llama_hf_tokenizer(llama2_model, tmp_path / "hf")
    expected = build_tokenizer(
        make_args(tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(llama2_model))
    ).tokenize(wikitext_article)
    for tokenizer_type, flag in [("HuggingFaceTokenizer", "tokenizer_name_or_path"), ("PretrainedFromHF", "tokenizer_model")]:
        tokenizer = build_tokenizer(make_args(tokenizer_type=tokenizer_type, **{flag: str(tmp_path / "hf")}))
        assert tokenizer.tokenize(wikitext_article) == expected
        assert (tokenizer.vocab_size, tokenizer.eod, tokenizer.bos, tokenizer.pad) == (32000, 2, 1, -1)
        assert tokenizer.detokenize(tokenizer.tokenize("Hello world")) == "Hello world"


def test_null_tokenizer():
    tokenizer = build_tokenizer(make_args(tokenizer_type="NullTokenizer", vocab_size=1000))
    assert tokenizer.tokenize("3 14 15") == [3, 14, 15]
    assert tokenizer.detokenize([3, 14]) == "3 14"
    assert (tokenizer.vocab_size, tokenizer.eod) == (1001, 1000)


@pytest.mark.parametrize(
    "vocab, divisible_by, tp, padded", [(50257, 128, 1, 50304), (50257, 128, 2, 50432), (32000, 128, 8, 32768), (256, 128, 1, 256)]
)
def test_padded_vocab_size(vocab, divisible_by, tp, padded):
    assert vocab_size_with_padding(vocab, divisible_by, tp) == padded


def test_build_sets_padded_vocab_size(gpt2_files):
    vocab_file, merge_file = gpt2_files
    args = make_args(
        tokenizer_type="GPT2BPETokenizer", vocab_file=str(vocab_file), merge_file=str(merge_file), tensor_model_parallel_size=2
    )
    build_tokenizer(args)
    assert args.padded_vocab_size == 50432


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(tokenizer_type="GPT3Tokenizer"), "unknown --tokenizer-type 'GPT3Tokenizer'; choose one of"),
        (dict(tokenizer_type="GPT2BPETokenizer", vocab_file="/nonexistent/vocab.json", merge_file="m"), "--vocab-file /nonexistent/vocab.json: no such file"),
        (dict(tokenizer_type="Llama2Tokenizer"), "needs --tokenizer-model"),
        (dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_name_or_path="/nonexistent"), "not a local directory"),
        (dict(tokenizer_type="NullTokenizer"), "needs a positive --vocab-size"),
    ],
)
def test_bad_flags_give_one_clear_message(flags, message):
    with pytest.raises(TokenizerError, match=regex.escape(message)):
        build_tokenizer(make_args(**flags))


def test_corrupt_sentencepiece_model(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="is not a SentencePiece model"):
        build_tokenizer(make_args(tokenizer_type="Llama2Tokenizer", tokenizer_model=str(bad)))
