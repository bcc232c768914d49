"""Generate text from a Megatron checkpoint (either stack, any saved TP/PP layout) in one process.

    python tools/generate.py --load CKPT --prompt-ids 1,2,3 --max-new-tokens 20
    python tools/generate.py --load CKPT --prompt "Hello" --tokenizer-type GPT2BPETokenizer \
        --vocab-file vocab.json --merge-file merges.txt --top-k 40 --temperature 0.8

The model shape comes from the checkpoint's saved args; model flags given here override them. Decoding is
greedy unless --temperature, --top-k > 1 or --top-p asks for sampling. A key/value cache makes each new
token cost one position.
"""

import argparse
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from gpt_builders import gpt_builder  # noqa: E402
from megatron.core.inference_params import InferenceParams  # noqa: E402
from megatron.training.arguments import (  # noqa: E402
    ModelArgumentsError,
    add_tokenizer_args,
    model_flag_parser,
    validate_model_args,
)
from megatron.training.model_config import core_transformer_config_from_args  # noqa: E402
from megatron.training.tokenizer import build_tokenizer  # noqa: E402
from tools.checkpoint.checkpoint_files import fit_vocabulary, read_megatron_checkpoint, relayout_args  # noqa: E402
from megatron.core.errors import UserError  # noqa: E402
from megatron.legacy.model.checkpoint_names import mcore_to_legacy_names  # noqa: E402



class GenerationError(UserError, ValueError):
    """Bad generation flags; printed as one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        parents=[_model_flag_parser()],
    )
    group = parser.add_argument_group(title="generation")
    group.add_argument("--load", required=True, help="Megatron checkpoint directory (as written by --save).")
    prompt = group.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", type=str, help="Prompt text (needs the tokenizer flags).")
    prompt.add_argument("--prompt-ids", type=str, help="Prompt as comma-separated token ids.")
    group.add_argument("--max-new-tokens", type=int, default=32, help="Tokens to generate.")
    group.add_argument("--temperature", type=float, default=None, help="Sample with this temperature.")
    group.add_argument("--top-k", type=int, default=0, help="Sample from the k most likely tokens (1 = greedy).")
    group.add_argument("--top-p", type=float, default=0.0, help="Sample from the smallest set with this probability.")
    group.add_argument("--seed", type=int, default=1234, help="Random seed for sampling.")
    group.add_argument("--device", choices=["cpu", "cuda"], default=None, help="Default: cuda when available.")
    return parser


def _model_flag_parser() -> argparse.ArgumentParser:
    return model_flag_parser(add_tokenizer_args)


def _explicit_model_flags(argv) -> dict:
    """The model/tokenizer flags the user actually typed (they override the checkpoint's saved args)."""
    parser = _model_flag_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given, _ = parser.parse_known_args(argv)
    return vars(given)


def _with_tokenizer_defaults(args) -> argparse.Namespace:
    """Saved args may predate the tokenizer flags: give the missing ones their defaults."""
    for name, value in vars(_model_flag_parser().parse_args([])).items():
        if not hasattr(args, name):
            setattr(args, name, value)
    return args


def load_model(checkpoint_dir: str, overrides: dict, device: torch.device):
    """(model in eval mode, its args) from a checkpoint, with the overriding flags applied."""
    saved, state = read_megatron_checkpoint(checkpoint_dir)
    args = relayout_args(_with_tokenizer_defaults(saved), 1, 1, saved.use_legacy_models)
    for name, value in overrides.items():
        setattr(args, name, value)
    if device.type == "cpu":  # CPU kernels are fastest (and most accurate) in fp32
        args.fp16 = args.bf16 = False
        args.params_dtype = torch.float32
    try:
        validate_model_args(args)
    except ModelArgumentsError as error:
        raise GenerationError(str(error)) from None
    config = core_transformer_config_from_args(args)
    config.perform_initialization = False
    config.use_cpu_initialization = True
    model = gpt_builder(args, config=config)
    state = fit_vocabulary(state, args)
    if args.use_legacy_models:
        state = mcore_to_legacy_names(state, tied=not args.untie_embeddings_and_output_weights)
    model.load_state_dict(state)
    return model.to(device).eval(), args


def next_token(logits: torch.Tensor, temperature: Optional[float], top_k: int, top_p: float, generator) -> int:
    """Greedy, or sampled from the temperature-scaled distribution cut to top-k / top-p."""
    sampling = (temperature is not None and temperature > 0) or top_k > 1 or top_p > 0.0
    if not sampling or top_k == 1:
        return int(torch.argmax(logits))
    logits = logits.float() / (temperature or 1.0)
    if top_k > 1:
        threshold = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p > 0.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Keep every token up to and including the one that crosses top_p.
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probabilities = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probabilities.cpu(), 1, generator=generator))


@torch.no_grad()
def generate(
    model,
    prompt_ids: List[int],
    max_new_tokens: int,
    vocab_size: int,
    temperature: Optional[float] = None,
    top_k: int = 0,
    top_p: float = 0.0,
    seed: int = 1234,
    stop_id: Optional[int] = None,
) -> List[int]:
    """New token ids after `prompt_ids`: the prompt in one forward, then one cached position per token.

    Only the first `vocab_size` logits are candidates (the rest pad the vocabulary)."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    inference_params = InferenceParams(max_batch_size=1, max_sequence_length=len(prompt_ids) + max_new_tokens)
    tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    generated = []
    for _ in range(max_new_tokens):
        start = inference_params.sequence_len_offset
        positions = torch.arange(start, start + tokens.size(1), device=device).unsqueeze(0)
        logits = model(tokens, positions, None, inference_params=inference_params)
        inference_params.sequence_len_offset += tokens.size(1)
        token = next_token(logits[0, -1, :vocab_size], temperature, top_k, top_p, generator)
        generated.append(token)
        if token == stop_id:
            break
        tokens = torch.tensor([[token]], dtype=torch.long, device=device)
    return generated


def _prompt_ids(options, tokenizer) -> List[int]:
    if options.prompt_ids is not None:
        try:
            ids = [int(piece) for piece in options.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise GenerationError(
                f"--prompt-ids must be comma-separated integers, got {options.prompt_ids!r}"
            ) from None
    else:
        if tokenizer is None:
            raise GenerationError(
                "--prompt TEXT needs a tokenizer: pass --tokenizer-type (and its files) or use --prompt-ids"
            )
        ids = tokenizer.tokenize(options.prompt)
    if not ids:
        raise GenerationError("the prompt is empty")
    return ids


def run(argv=None) -> None:
    options = build_parser().parse_args(argv)
    if options.max_new_tokens < 1:
        raise GenerationError("--max-new-tokens must be at least 1")
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, args = load_model(options.load, _explicit_model_flags(argv), device)
    tokenizer = build_tokenizer(args) if getattr(args, "tokenizer_type", None) else None
    prompt_ids = _prompt_ids(options, tokenizer)
    vocab_size = tokenizer.vocab_size if tokenizer is not None else args.true_vocab_size
    bad = [token for token in prompt_ids if not 0 <= token < vocab_size]
    if bad:
        raise GenerationError(f"prompt token id {bad[0]} is outside the vocabulary of {vocab_size}")
    total = len(prompt_ids) + options.max_new_tokens
    if args.position_embedding_type == "learned_absolute" and total > args.max_position_embeddings:
        raise GenerationError(
            f"prompt ({len(prompt_ids)}) + --max-new-tokens ({options.max_new_tokens}) exceeds the "
            f"{args.max_position_embeddings} positions the model has embeddings for"
        )
    generated = generate(
        model,
        prompt_ids,
        options.max_new_tokens,
        vocab_size,
        options.temperature,
        options.top_k,
        options.top_p,
        options.seed,
        stop_id=tokenizer.eod if tokenizer is not None else None,
    )
    print("prompt ids: " + " ".join(map(str, prompt_ids)))
    print("generated ids: " + " ".join(map(str, generated)))
    if tokenizer is not None:
        print("text: " + tokenizer.detokenize(prompt_ids + generated))


def main(argv=None) -> int:
    try:
        run(argv if argv is not None else sys.argv[1:])
    except UserError as error:
        print(f"generate.py: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
