"""A tiny MoE layer against the dense MLP with the same active parameters per token, at EP=1 and EP=2 (two
processes, gloo on CPU): tokens/s of forward + backward, the MoE step split into router, dispatch, experts and
combine, and peak memory; one line per case.

    python bench/moe_bench.py                                  (8 experts, top-2, 4096 tokens, hidden 256)
    python bench/moe_bench.py --dispatcher allgather --grouped-gemm --steps 20
"""

import argparse
import os
import resource
import socket
import time
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.moe.moe_utils import MoEProcessGroups
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

PHASES = ("router", "dispatch", "experts", "combine")


def _config(options, expert_parallel: int, **fields) -> TransformerConfig:
    fields.setdefault("ffn_hidden_size", options.expert_ffn)
    return TransformerConfig(
        num_layers=1, hidden_size=options.hidden, num_attention_heads=4,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        use_cpu_initialization=True, expert_model_parallel_size=expert_parallel, **fields,
    )


def _timed(phase_seconds, phase, function):
    def run(*args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        phase_seconds[phase] += time.perf_counter() - start
        return result

    return run


def _instrument(layer, phase_seconds):
    """Time the MoE layer's phases (forward only: backward runs inside autograd)."""
    dispatcher = layer.token_dispatcher
    layer.router.forward = _timed(phase_seconds, "router", layer.router.forward)
    for name in ("dispatch_preprocess", "token_dispatch", "dispatch_postprocess"):
        setattr(dispatcher, name, _timed(phase_seconds, "dispatch", getattr(dispatcher, name)))
    layer.experts.forward = _timed(phase_seconds, "experts", layer.experts.forward)
    for name in ("combine_preprocess", "token_combine", "combine_postprocess"):
        setattr(dispatcher, name, _timed(phase_seconds, "combine", getattr(dispatcher, name)))


def _peak_memory_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run(layer, tokens, steps, phase_seconds):
    hidden = torch.randn(tokens, 1, layer.config.hidden_size, requires_grad=True)
    layer(hidden)[0].sum().backward()  # warm-up
    phase_seconds.clear()
    start = time.perf_counter()
    for _ in range(steps):
        layer(hidden)[0].sum().backward()
    return time.perf_counter() - start


def _bench(rank, world_size, port, options, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    parallel_state.initialize_model_parallel(expert_model_parallel_size=world_size)
    torch.manual_seed(0)
    config = _config(
        options, world_size, num_moe_experts=options.experts, moe_router_topk=options.topk,
        moe_ffn_hidden_size=options.expert_ffn, moe_token_dispatcher_type=options.dispatcher,
        moe_grouped_gemm=options.grouped_gemm, moe_router_load_balancing_type="none",
    )
    spec = get_moe_module_spec(num_experts=options.experts, moe_grouped_gemm=options.grouped_gemm)
    layer = build_module(spec, config=config, layer_number=1, pg_collection=MoEProcessGroups.from_parallel_state())
    phase_seconds = defaultdict(float)
    _instrument(layer, phase_seconds)
    seconds = _run(layer, options.tokens, options.steps, phase_seconds)
    if rank == 0:
        results.put((f"moe ep={world_size}", seconds, dict(phase_seconds), _peak_memory_mib()))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _print(options, name, seconds, phases, memory):
    tokens_per_second = options.tokens * options.steps / seconds
    line = f"{name:12s} | tokens/s {tokens_per_second:10.1f} | step {1000 * seconds / options.steps:8.2f} ms |"
    for phase in PHASES if phases else ():
        line += f" {phase} {1000 * phases.get(phase, 0.0) / options.steps:7.2f} ms |"
    print(line + f" peak RSS {memory:8.1f} MiB", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--expert-ffn", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dispatcher", choices=["alltoall", "allgather"], default="alltoall")
    parser.add_argument("--grouped-gemm", action="store_true")
    options = parser.parse_args()
    torch.set_num_threads(1)

    dense = MLP(
        _config(options, 1, ffn_hidden_size=options.topk * options.expert_ffn),
        MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
    )
    _print(options, "dense", _run(dense, options.tokens, options.steps, defaultdict(float)), None, _peak_memory_mib())
    results = mp.get_context("spawn").SimpleQueue()
    for world_size in (1, 2):
        mp.spawn(_bench, args=(world_size, _free_port(), options, results), nprocs=world_size, join=True)
        _print(options, *results.get())


if __name__ == "__main__":
    main()
