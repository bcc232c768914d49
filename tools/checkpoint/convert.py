"""Convert checkpoints between Hugging Face and Megatron (either stack, any tensor/pipeline layout).

    python tools/checkpoint/convert.py --load-model-type hf --save-model-type mg --model-type-hf llama3 \
        --load-dir HF_DIR --save-dir CKPT --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2

hf -> mg writes CKPT/latest_checkpointed_iteration.txt ("release") and CKPT/release/mp_rank_TT[_PPP]/
model_optim_rng.pt, which `--load CKPT --finetune` (or `--no-load-optim --no-load-rng`) trains from;
mg -> hf writes config.json + model.safetensors that `transformers` loads; mg -> mg re-lays out a
checkpoint (TP/PP, uneven first/last pipeline stages) and/or moves it between the legacy and mcore stacks
(by default it keeps the source's stack). Megatron inputs may be at any layout, virtual pipeline chunks
included; only the model weights are converted (train from the result with --finetune or --no-load-optim).

Megatron inputs are read in either checkpoint format (torch: mp_rank_* files; torch_dist: the iteration
directory's metadata.json), whichever the files show. `--save-ckpt-format torch_dist` writes CKPT/release/ as
Megatron's distributed checkpoint (global tensors, loadable at any TP/PP/EP with `--ckpt-format torch_dist`);
then the --target-* sizes only set the layout recorded in the saved args and the vocabulary padding
(--make-vocab-size-divisible-by x TP, which Megatron-LM requires to equal its own run's).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from megatron.core.errors import UserError  # noqa: E402
from megatron.core.transformer.module import check_state_dict_fits  # noqa: E402
from tools.checkpoint.checkpoint_files import (  # noqa: E402
    fit_vocabulary,
    model_args,
    read_hf_directory,
    read_megatron_checkpoint,
    relayout_args,
    state_dtype,
    unsplit_model,
    write_hf_directory,
    write_megatron_checkpoint,
    write_torch_dist_checkpoint,
)
from tools.checkpoint.hf_families import FAMILIES, ConversionError, family_for  # noqa: E402


MEGATRON_WRITERS = {"torch": write_megatron_checkpoint, "torch_dist": write_torch_dist_checkpoint}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load-model-type", required=True, choices=["hf", "mg"], help="Format of --load-dir.")
    parser.add_argument("--save-model-type", required=True, choices=["hf", "mg"], help="Format to write.")
    parser.add_argument(
        "--model-type-hf", type=str, default=None, help=f"Hugging Face model family: {', '.join(FAMILIES)}."
    )
    parser.add_argument("--load-dir", required=True, help="Hugging Face model directory or Megatron checkpoint.")
    parser.add_argument("--save-dir", required=True, help="Where to write the converted model.")
    parser.add_argument("--target-tensor-parallel-size", type=int, default=1, help="Tensor-parallel size to write.")
    parser.add_argument("--target-pipeline-parallel-size", type=int, default=1, help="Pipeline-parallel size to write.")
    parser.add_argument(
        "--target-expert-parallel-size", type=int, default=1, help="Expert-parallel size to write (MoE models)."
    )
    for stage in ("first", "last"):
        parser.add_argument(
            f"--target-decoder-{stage}-pipeline-num-layers",
            type=int,
            default=None,
            help=f"Layers of the {stage} pipeline stage to write (uneven split; the other stages share the rest). "
            "mg -> mg at an unchanged pipeline size keeps the source's split by default.",
        )
    stack = parser.add_mutually_exclusive_group()
    stack.add_argument(
        "--use-mcore-models", action="store_true", help="Write the mcore stack (the default, except mg -> mg)."
    )
    stack.add_argument(
        "--use-legacy-models", action="store_true", help="Write the legacy stack (mg -> mg: the source's stack)."
    )
    parser.add_argument(
        "--save-ckpt-format",
        choices=list(MEGATRON_WRITERS),
        default="torch",
        help="Megatron checkpoint format to write: torch (mp_rank_* files at the --target-* layout) or torch_dist "
        "(layout-free; the --target-* sizes are only recorded in the saved args and pad the vocabulary).",
    )
    parser.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=1,
        help="hf -> mg: pad the vocabulary to a multiple of this times the tensor-parallel size.",
    )
    return parser


def check_state_fits_args(args, state) -> None:
    """The tensors must have exactly the shapes of the model the args describe (at TP=1, PP=1)."""
    check_state_dict_fits(unsplit_model(args).state_dict(), state)


def _uneven_stage_layers(options):
    return options.target_decoder_first_pipeline_num_layers, options.target_decoder_last_pipeline_num_layers


def _hf_to_megatron(options) -> None:
    family = family_for(options.model_type_hf)
    config, hf_state = read_hf_directory(options.load_dir)
    config = family.config_for_tensors(config, hf_state)
    if config.get("model_type") not in family.model_types:
        raise ConversionError(
            f"{options.load_dir}/config.json describes a {config.get('model_type')!r} model, not "
            f"--model-type-hf {options.model_type_hf}"
        )
    args = model_args(
        family.flags(config),
        config["vocab_size"],
        options.make_vocab_size_divisible_by,
        options.target_tensor_parallel_size,
        options.target_pipeline_parallel_size,
        options.use_legacy_models,
        _uneven_stage_layers(options),
        options.target_expert_parallel_size,
    )
    state = family.to_mcore(hf_state, args)
    check_state_fits_args(args, state)
    write_megatron(options, args, state)


def _megatron_to_hf(options) -> None:
    family = family_for(options.model_type_hf)
    args, state = read_megatron_checkpoint(options.load_dir)
    check_state_fits_args(args, state)
    family.check_args(args)
    hf_state = family.from_mcore(state, args)
    write_hf_directory(options.save_dir, family.hf_config(args, state_dtype(hf_state)), hf_state)


def _megatron_to_megatron(options) -> None:
    args, state = read_megatron_checkpoint(options.load_dir)
    check_state_fits_args(args, state)
    stack_asked = options.use_mcore_models or options.use_legacy_models
    legacy = options.use_legacy_models if stack_asked else args.use_legacy_models
    target = relayout_args(
        args,
        options.target_tensor_parallel_size,
        options.target_pipeline_parallel_size,
        legacy,
        _uneven_stage_layers(options),
        options.target_expert_parallel_size,
    )
    write_megatron(options, target, fit_vocabulary(state, target))


def write_megatron(options, args, state) -> None:
    """Write in --save-ckpt-format, which the saved args record."""
    args.ckpt_format = options.save_ckpt_format
    MEGATRON_WRITERS[options.save_ckpt_format](options.save_dir, args, state)


def convert(options) -> None:
    sizes = (options.target_tensor_parallel_size, options.target_pipeline_parallel_size, options.target_expert_parallel_size)
    if min(sizes) < 1:
        raise ConversionError(
            "--target-tensor-parallel-size, --target-pipeline-parallel-size and --target-expert-parallel-size must be "
            "at least 1"
        )
    if options.load_model_type == "hf" and options.save_model_type == "hf":
        raise ConversionError("--load-model-type hf with --save-model-type hf: nothing to convert")
    if options.save_model_type == "hf" and options.save_ckpt_format != "torch":
        raise ConversionError("--save-ckpt-format applies to Megatron output (--save-model-type mg) only")
    if "hf" in (options.load_model_type, options.save_model_type) and options.model_type_hf is None:
        raise ConversionError(f"converting to or from Hugging Face needs --model-type-hf ({', '.join(FAMILIES)})")
    if os.path.abspath(options.load_dir) == os.path.abspath(options.save_dir):
        raise ConversionError("--save-dir must differ from --load-dir")
    with torch.no_grad():
        if options.load_model_type == "hf":
            _hf_to_megatron(options)
        elif options.save_model_type == "hf":
            _megatron_to_hf(options)
        else:
            _megatron_to_megatron(options)


def main(argv=None) -> int:
    options = build_parser().parse_args(argv)
    try:
        convert(options)
    except UserError as error:
        print(f"convert.py: error: {error}", file=sys.stderr)
        return 1
    print(f"converted {options.load_dir} ({options.load_model_type}) -> {options.save_dir} ({options.save_model_type})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
