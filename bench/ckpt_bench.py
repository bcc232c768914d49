r"""Checkpoint save and load time, torch format vs torch_dist, for one model in one run; one final line.

    python bench/ckpt_bench.py                      # ~0.94B-parameter Llama-style model, fp32 weights only
    python bench/ckpt_bench.py --with-optimizer     # + Adam state (after one training step)
    python bench/ckpt_bench.py --num-layers 2 --hidden-size 256 --ffn-hidden-size 688 --num-attention-heads 4

The default model is 16 layers x hidden 2048 x ffn 5504, 32 heads, a 32000-entry vocabulary, untied (bench/
train_bench.py's Llama-style flags); any training flag overrides it (a smaller model for a quick run), and
torchrun runs it at any parallel layout. The model, optimizer and scheduler are the training loop's
(setup_model_and_optimizer) and the timed calls are the training loop's save_checkpoint / load_checkpoint, into
a temporary directory (--bench-dir, removed afterwards). Before each load the weights are zeroed, and after it
their per-tensor sums must equal the saved ones. Loads follow their saves, so the files are in the page cache;
torch_dist fsyncs its data files, the torch format does not.
"""

import os
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.train_bench import LLAMA_STYLE_FLAGS, random_batches, run_steps  # noqa: E402
from megatron.training.checkpointing import load_checkpoint, save_checkpoint  # noqa: E402
from megatron.training.global_vars import get_args  # noqa: E402
from megatron.training.initialize import initialize_megatron  # noqa: E402
from megatron.training.training import setup_model_and_optimizer, update_train_iters  # noqa: E402
from megatron.training.utils import print_rank_0, unwrap_model  # noqa: E402
from pretrain_gpt import model_provider  # noqa: E402

ONE_BILLION_FLAGS = [
    "--num-layers", "16", "--hidden-size", "2048", "--ffn-hidden-size", "5504", "--num-attention-heads", "32",
    "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "1",
]
FORMATS = ("torch", "torch_dist")


def add_bench_args(parser):
    group = parser.add_argument_group(title="benchmark")
    group.add_argument("--with-optimizer", action="store_true", help="Save and load the Adam state too.")
    group.add_argument("--bench-dir", type=str, default=None, help="Where the temporary checkpoints go.")
    return parser


def weight_sums(model):
    return [tensor.detach().double().sum().item() for chunk in unwrap_model(model) for tensor in chunk.state_dict().values() if torch.is_tensor(tensor)]


def zero_weights(model):
    with torch.no_grad():
        for chunk in unwrap_model(model):
            for param in chunk.parameters():
                param.zero_()


def directory_gigabytes(directory: str) -> float:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(directory) for name in names) / 1e9


def timed(function) -> float:
    dist.barrier()
    start = time.perf_counter()
    function()
    dist.barrier()
    return time.perf_counter() - start


def bench_format(ckpt_format, root, model, optimizer, scheduler, expected_sums):
    """(save seconds, load seconds, checkpoint GB) of one format; the load must restore every weight."""
    args = get_args()
    args.ckpt_format = ckpt_format
    args.save = args.load = os.path.join(root, ckpt_format)
    save_seconds = timed(lambda: save_checkpoint(args.iteration, model, optimizer, scheduler))
    gigabytes = directory_gigabytes(args.save)
    zero_weights(model)
    load_seconds = timed(lambda: load_checkpoint(model, optimizer, scheduler))
    if weight_sums(model) != expected_sums:
        raise SystemExit(f"ckpt_bench: the {ckpt_format} checkpoint did not restore the weights")
    shutil.rmtree(args.save, ignore_errors=True)
    return save_seconds, load_seconds, gigabytes


def main():
    flags = LLAMA_STYLE_FLAGS + ONE_BILLION_FLAGS + ["--train-iters", "1000000"] + sys.argv[1:]
    initialize_megatron(add_bench_args, args_list=flags)
    args = get_args()
    update_train_iters(args)
    args.no_save_optim = args.no_load_optim = not args.with_optimizer
    model, optimizer, scheduler = setup_model_and_optimizer(model_provider)
    if args.with_optimizer:  # Adam's state exists after the first step
        run_steps(1, model, optimizer, scheduler, random_batches(args))
    parameters = sum(param.numel() for chunk in unwrap_model(model) for param in chunk.parameters())
    expected_sums = weight_sums(model)
    root = tempfile.mkdtemp(prefix="ckpt_bench.", dir=args.bench_dir) if args.rank == 0 else None
    shared = [root]
    dist.broadcast_object_list(shared)
    results = {}
    try:
        for ckpt_format in FORMATS:
            results[ckpt_format] = bench_format(ckpt_format, shared[0], model, optimizer, scheduler, expected_sums)
            save, load, gigabytes = results[ckpt_format]
            print_rank_0(
                f"{ckpt_format:>10}: {gigabytes:.2f} GB | save {save:.2f} s ({gigabytes / save:.2f} GB/s) | "
                f"load {load:.2f} s ({gigabytes / load:.2f} GB/s)"
            )
    finally:
        if args.rank == 0:
            shutil.rmtree(shared[0], ignore_errors=True)
    (torch_save, torch_load, torch_gb), (dist_save, dist_load, dist_gb) = results["torch"], results["torch_dist"]
    content = "weights + Adam state" if args.with_optimizer else "weights"
    print_rank_0(
        f"ckpt_bench | {parameters / 1e9:.2f}B parameters, {args.num_layers} layers x hidden {args.hidden_size}, "
        f"{content}, {args.world_size} rank(s) | torch: save {torch_save:.2f} s, load {torch_load:.2f} s, "
        f"{torch_gb:.2f} GB | torch_dist: save {dist_save:.2f} s, load {dist_load:.2f} s, {dist_gb:.2f} GB | "
        f"torch_dist / torch: save {dist_save / torch_save:.2f}x, load {dist_load / torch_load:.2f}x"
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
