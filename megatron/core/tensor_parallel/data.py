"""broadcast_data: tensor-parallel rank 0's batch tensors, sent to the other ranks of its group."""

from typing import Dict, List

import torch

from megatron.core import parallel_state


def broadcast_data(keys: List[str], data: Dict[str, torch.Tensor], datatype: torch.dtype) -> Dict[str, torch.Tensor]:
    """{key: tensor} on every tensor-parallel rank: rank 0 gives `data` (each tensor of `datatype`), the
    others may pass anything; the shapes travel first, then one flat tensor (Megatron-core's contract)."""
    group = parallel_state.get_tensor_model_parallel_group()
    source = parallel_state.get_tensor_model_parallel_src_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend(group) == "nccl" else "cpu"
    is_source = parallel_state.get_tensor_model_parallel_rank() == 0
    if is_source:
        for key in keys:
            if data[key].dtype != datatype:
                raise TypeError(f"broadcast_data: {key!r} is {data[key].dtype}, expected {datatype}")
    max_dims = 8
    shapes = torch.zeros(len(keys), max_dims, dtype=torch.long, device=device)
    if is_source:
        for row, key in enumerate(keys):
            if data[key].dim() > max_dims:
                raise ValueError(f"broadcast_data: {key!r} has more than {max_dims} dimensions")
            shapes[row, : data[key].dim()] = torch.tensor(data[key].shape)
    torch.distributed.broadcast(shapes, source, group=group)
    sizes = {key: [int(size) for size in row if size > 0] for key, row in zip(keys, shapes.tolist())}
    numels = [int(torch.tensor(sizes[key]).prod()) for key in keys]
    if is_source:
        flat = torch.cat([data[key].contiguous().view(-1) for key in keys]).to(device)
    else:
        flat = torch.empty(sum(numels), dtype=datatype, device=device)
    torch.distributed.broadcast(flat, source, group=group)
    return {key: part.view(sizes[key]) for key, part in zip(keys, torch.split(flat, numels))}
