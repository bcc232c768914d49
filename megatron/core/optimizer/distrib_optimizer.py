"""The distributed optimizer: fp32 master weights and optimizer state sharded over data-parallel ranks.

Each DistributedDataParallel bucket is padded to a multiple of the data-parallel size and split into equal
slices; data-parallel rank r owns slice r of every bucket. DDP reduce-scatters the gradients, so rank r holds
the averaged gradient of its slice only; it keeps fp32 masters and Adam moments for exactly that slice,
steps them, and all-gathers the updated weights back into every replica's parameters. Optimizer memory per
rank therefore drops by the data-parallel size.

With `overlap_param_gather` the all-gather of each bucket starts after the step but is only waited for when
the next forward pass reaches a module that uses one of its weights (a forward pre-hook), so the gather of
later buckets overlaps the forward computation of earlier layers. One gather is in flight at a time and they
are issued in the same order on every rank (gloo may pair concurrently queued collectives differently).

Routed experts (`allreduce=False`) live in DDP's expert buffers, which are reduced and sharded over the
expert-data-parallel group instead: every buffer uses its own group and this rank's place in it.

The checkpointed parameter state (`distrib_optim.pt`) is gathered on data-parallel rank 0 in the buffers'
unpadded parameter order, so it does not depend on the data-parallel size it was saved at: loading at
another size re-partitions it.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron.core.optimizer.grad_scaler import MegatronGradScaler
from megatron.core.optimizer.optimizer import MegatronOptimizer, unscale_and_check_for_inf
from megatron.core.optimizer.optimizer_config import OptimizerConfig
from megatron.core.utils import all_gather_single

_MASTER_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "shared", "sequence_parallel")
PARAMETER_STATE_VERSION = 1


@dataclass
class _ShardEntry:
    """The part of one model parameter that this data-parallel rank owns, and its fp32 master copy."""

    model_param: torch.nn.Parameter
    buffer: object
    bucket: object
    param_start: int
    """Flat [param_start, param_end) within the parameter."""
    param_end: int
    buffer_start: int
    """Where the owned part starts in the gradient buffer."""
    master: torch.nn.Parameter


class DistributedOptimizer(MegatronOptimizer):
    """Wraps a torch optimizer built over this rank's shard masters (`build_optimizer(param_groups)`)."""

    def __init__(
        self,
        config: OptimizerConfig,
        model_chunks: List[torch.nn.Module],
        param_groups: List[dict],
        build_optimizer: Callable[[List[dict]], torch.optim.Optimizer],
        grad_scaler: Optional[MegatronGradScaler],
        data_parallel_group: Optional[dist.ProcessGroup],
        grad_stats_parallel_group: Optional[dist.ProcessGroup],
    ):
        if config.fp16 and grad_scaler is None:
            raise ValueError("fp16 training needs a grad scaler")
        self.model_chunks = model_chunks
        self.grad_scaler = grad_scaler
        self.data_parallel_group = data_parallel_group
        self.entries = self._shard_entries()
        group_of_param = {param: index for index, group in enumerate(param_groups) for param in group["params"]}
        shard_groups = [{**group, "params": []} for group in param_groups]
        for entry in self.entries:
            shard_groups[group_of_param[entry.model_param]]["params"].append(entry.master)
        super().__init__(build_optimizer(shard_groups), config, grad_stats_parallel_group)
        self._gathers_pending: List[tuple] = []
        """(buffer, bucket) still to gather after an overlapped step, in forward order."""
        self._gather_in_flight = None
        self._bucket_of_pending_param: Dict[torch.nn.Parameter, object] = {}
        if config.overlap_param_gather:
            for chunk in model_chunks:
                for module in chunk.modules():
                    module.register_forward_pre_hook(self._wait_for_weights_of, with_kwargs=True)

    def _buffers(self):
        for chunk in self.model_chunks:
            yield from chunk.all_buffers()

    def _shard_entries(self) -> List[_ShardEntry]:
        entries = []
        for buffer in self._buffers():
            for bucket in buffer.buckets:
                shard_start, shard_end = bucket.shard_range(buffer.data_parallel_rank)
                shard_start, shard_end = bucket.offset + shard_start, bucket.offset + shard_end
                for param in bucket.params:
                    start, end, _ = buffer.param_index_map[param]
                    low, high = max(start, shard_start), min(end, shard_end)
                    if low >= high:
                        continue
                    master = torch.nn.Parameter(param.detach().view(-1)[low - start : high - start].clone().float())
                    for attribute in _MASTER_ATTRIBUTES:
                        if hasattr(param, attribute):
                            setattr(master, attribute, getattr(param, attribute))
                    entries.append(_ShardEntry(param, buffer, bucket, low - start, high - start, low, master))
        return entries

    def get_loss_scale(self) -> float:
        return self.grad_scaler.scale if self.grad_scaler is not None else 1.0

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Master gradients are views or fresh copies of the reduced buffer each step, so they are dropped."""
        for entry in self.entries:
            entry.master.grad = None

    def _found_inf_reduce(self, found_inf: torch.Tensor) -> None:
        """Every rank holds different gradients, so an overflow anywhere skips the step everywhere."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)

    def step(self):
        self.finish_param_sync()
        for entry in self.entries:
            size = entry.param_end - entry.param_start
            entry.master.grad = entry.buffer.grad_data[entry.buffer_start : entry.buffer_start + size].float()
        if self.grad_scaler is not None:
            found_inf = unscale_and_check_for_inf(
                [entry.master for entry in self.entries], self.grad_scaler, self._found_inf_reduce
            )
            self.grad_scaler.update(found_inf)
            if found_inf:
                return False, None, None
        grad_norm, num_zeros = self._clip_and_step()
        if self.config.overlap_param_gather:
            self._start_overlapped_param_gather()
        else:
            self._all_gather_model_params()
        return True, grad_norm, num_zeros

    def _all_gather_model_params(self) -> None:
        """Every replica receives every bucket's updated weights from the rank that owns each slice."""
        for buffer in self._buffers():
            for bucket in buffer.buckets:
                gathered, _ = self._start_bucket_gather(buffer, bucket, async_op=False)
                self._copy_gathered_weights(buffer, bucket, gathered)

    def _start_bucket_gather(self, buffer, bucket, async_op: bool):
        """(the whole bucket's weights once the gather completes, the collective's handle or None)."""
        shard_start, shard_end = bucket.shard_range(buffer.data_parallel_rank)
        shard = torch.zeros(shard_end - shard_start, dtype=bucket.params[0].dtype, device=bucket.grad_data.device)
        with torch.no_grad():
            for entry in self.entries:
                if entry.bucket is bucket:
                    local = entry.buffer_start - bucket.offset - shard_start
                    shard[local : local + entry.master.numel()].copy_(entry.master)
        if buffer.data_parallel_world_size == 1:
            return shard, None
        if async_op:
            return self._all_gather(buffer, shard, bucket.grad_data.numel(), async_op=True)
        return self._all_gather(buffer, shard, bucket.grad_data.numel()), None

    @staticmethod
    def _copy_gathered_weights(buffer, bucket, gathered: torch.Tensor) -> None:
        with torch.no_grad():
            for param in bucket.params:
                start, end, _ = buffer.param_index_map[param]
                param.view(-1).copy_(gathered[start - bucket.offset : end - bucket.offset])

    @staticmethod
    def _all_gather(buffer, shard: torch.Tensor, total: int, async_op: bool = False):
        """(gathered, handle) over the buffer's (expert) data-parallel group when `async_op`, else the gathered
        tensor."""
        gathered = torch.empty(total, dtype=shard.dtype, device=shard.device)
        handle = all_gather_single(gathered, shard, group=buffer.data_parallel_group, async_op=async_op)
        return (gathered, handle) if async_op else gathered

    def _start_overlapped_param_gather(self) -> None:
        """Queue every bucket in forward order (the buffers hold parameters in reverse) and start the first."""
        self._gathers_pending = [
            (buffer, bucket) for buffer in self._buffers() for bucket in reversed(buffer.buckets)
        ]
        self._bucket_of_pending_param = {
            param: bucket for _, bucket in self._gathers_pending for param in bucket.params
        }
        self._start_next_gather()

    def _start_next_gather(self) -> None:
        if self._gathers_pending:
            buffer, bucket = self._gathers_pending[0]
            self._gather_in_flight = (buffer, bucket, *self._start_bucket_gather(buffer, bucket, async_op=True))

    def _finish_gathers_through(self, bucket) -> None:
        """Complete the queued gathers in order up to and including `bucket`."""
        while self._gathers_pending:
            buffer, in_flight_bucket, gathered, handle = self._gather_in_flight
            if handle is not None:
                handle.wait()
            self._copy_gathered_weights(buffer, in_flight_bucket, gathered)
            for param in in_flight_bucket.params:
                del self._bucket_of_pending_param[param]
            self._gathers_pending.pop(0)
            self._gather_in_flight = None
            self._start_next_gather()
            if in_flight_bucket is bucket:
                return

    def _wait_for_weights_of(self, module, args, kwargs) -> None:
        """Forward pre-hook: the module's own weights, and any weight handed to it as an argument (a tied
        output layer gets the embedding's), must be gathered before it runs."""
        if not self._gathers_pending:
            return
        candidates = [*module.parameters(recurse=False), *args, *kwargs.values()]
        for tensor in candidates:
            bucket = self._bucket_of_pending_param.get(tensor) if isinstance(tensor, torch.nn.Parameter) else None
            if bucket is not None:
                self._finish_gathers_through(bucket)

    def finish_param_sync(self) -> None:
        """Complete any overlapped gather, e.g. before a checkpoint reads the weights."""
        if self._gathers_pending:
            self._finish_gathers_through(self._gathers_pending[-1][1])

    def reload_model_params(self) -> None:
        """Refresh the masters from freshly loaded model weights."""
        self.finish_param_sync()
        with torch.no_grad():
            for entry in self.entries:
                entry.master.copy_(entry.model_param.detach().view(-1)[entry.param_start : entry.param_end])

    def state_dict(self) -> dict:
        """Hyperparameters and loss scale (identical on every rank); the sharded part is in
        `gather_parameter_state()`."""
        return {
            "param_groups": [
                {key: value for key, value in group.items() if key != "params"} for group in self.optimizer.param_groups
            ],
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "distributed_optimizer": True,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict.get("distributed_optimizer"):
            raise ValueError("it was saved without --use-distributed-optimizer")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.optimizer.param_groups):
            raise ValueError(
                f"it has {len(saved_groups)} parameter groups but this optimizer has {len(self.optimizer.param_groups)}"
            )
        for group, saved in zip(self.optimizer.param_groups, saved_groups):
            group.update(saved)
        if self.grad_scaler is not None and state_dict.get("grad_scaler"):
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])

    def _sharded_state_keys(self) -> List[str]:
        """'param' (the masters) plus the optimizer's per-element state tensors (exp_avg, exp_avg_sq, ...)."""
        for entry in self.entries:
            state = self.optimizer.state.get(entry.master, {})
            return ["param"] + sorted(
                key for key, value in state.items() if torch.is_tensor(value) and value.shape == entry.master.shape
            )
        return ["param"]

    def _scalar_state(self) -> dict:
        """Per-parameter scalars (Adam's step count), equal for every parameter."""
        for entry in self.entries:
            state = self.optimizer.state.get(entry.master, {})
            return {key: value for key, value in state.items() if not (torch.is_tensor(value) and value.dim() > 0)}
        return {}

    def _local_values(self, entry: _ShardEntry, key: str) -> torch.Tensor:
        return entry.master.detach() if key == "param" else self.optimizer.state[entry.master][key]

    def _gathered_buckets(self):
        """For every bucket, the whole fp32 masters and optimizer state of its parameters: [(buffer, bucket,
        {key: flat tensor over the bucket})]; a collective over each buffer's (expert) data-parallel group."""
        self.finish_param_sync()
        keys = self._sharded_state_keys()
        gathered = []
        for buffer in self._buffers():
            for bucket in buffer.buckets:
                shard_start, shard_end = bucket.shard_range(buffer.data_parallel_rank)
                values = {}
                for key in keys:
                    shard = torch.zeros(shard_end - shard_start, dtype=torch.float32, device=bucket.grad_data.device)
                    for entry in self.entries:
                        if entry.bucket is bucket:
                            local = entry.buffer_start - bucket.offset - shard_start
                            shard[local : local + entry.master.numel()].copy_(self._local_values(entry, key))
                    full = shard
                    if buffer.data_parallel_world_size > 1:
                        full = self._all_gather(buffer, shard, bucket.grad_data.numel())
                    values[key] = full
                gathered.append((buffer, bucket, values))
        return gathered

    def gather_parameter_state(self) -> Optional[dict]:
        """The full fp32 masters and optimizer state of this model-parallel rank, in unpadded parameter order;
        a collective over the (expert) data-parallel groups, returned only on the ranks that write checkpoints
        (None elsewhere)."""
        buffers_state, pieces, current = [], None, None
        for buffer, bucket, values in self._gathered_buckets():
            if buffer is not current:
                if pieces is not None:
                    buffers_state.append({key: torch.cat(parts) for key, parts in pieces.items()})
                pieces, current = {key: [] for key in values}, buffer
            for param in bucket.params:
                start, end, _ = buffer.param_index_map[param]
                for key, full in values.items():
                    pieces[key].append(full[start - bucket.offset : end - bucket.offset])
        if pieces is not None:
            buffers_state.append({key: torch.cat(parts) for key, parts in pieces.items()})
        if not self._writes_checkpoints():
            return None
        return {"version": PARAMETER_STATE_VERSION, "buffers": buffers_state, "scalars": self._scalar_state()}

    def param_state_for_checkpoint(self) -> Dict[torch.nn.Parameter, Dict[str, torch.Tensor]]:
        """Every model parameter's whole masters and state (gathered over data-parallel ranks: a collective)."""
        states = {}
        for buffer, bucket, values in self._gathered_buckets():
            for param in bucket.params:
                start, end, _ = buffer.param_index_map[param]
                states[param] = {
                    key: full[start - bucket.offset : end - bucket.offset].view(param.shape) for key, full in values.items()
                }
        return states

    def checkpoint_scalars(self) -> dict:
        return self._scalar_state()

    def load_param_state_from_checkpoint(self, states: Dict[torch.nn.Parameter, Dict[str, torch.Tensor]], hyperparameters: dict) -> None:
        """Take this rank's slices of every parameter's whole saved state, then refresh the model weights."""
        self.finish_param_sync()
        scalars = hyperparameters["scalars"]
        with torch.no_grad():
            for entry in self.entries:
                saved = {"param": entry.model_param.detach(), **states.get(entry.model_param, {})}
                flat = {key: value.reshape(-1)[entry.param_start : entry.param_end] for key, value in saved.items()}
                entry.master.copy_(flat.pop("param"))  # saved without masters: the loaded weights
                if flat:
                    state = {key: value.clone() for key, value in flat.items()}
                    state.update({key: value.clone() if torch.is_tensor(value) else value for key, value in scalars.items()})
                    self.optimizer.state[entry.master] = state
        self._all_gather_model_params()

    def _writes_checkpoints(self) -> bool:
        """Expert-data-parallel rank 0 writes (each expert-parallel rank its own experts); that is data-parallel
        rank 0 when there is no expert parallelism."""
        groups = [getattr(chunk, "expert_data_parallel_group", None) for chunk in self.model_chunks]
        group = next((group for group in groups if group is not None), self.data_parallel_group)
        return group is None or dist.get_rank(group) == 0

    def load_parameter_state(self, parameter_state: dict) -> None:
        """Take this rank's slices of a `gather_parameter_state()` saved at any data-parallel size."""
        self.finish_param_sync()
        buffers = list(self._buffers())
        saved_buffers = parameter_state["buffers"]
        if len(saved_buffers) != len(buffers):
            raise ValueError(f"it holds {len(saved_buffers)} gradient buffers but this model has {len(buffers)}")
        unpadded_offsets = {}
        for buffer, saved in zip(buffers, saved_buffers):
            offset = 0
            for param in buffer.params:
                unpadded_offsets[param] = offset
                offset += param.numel()
            if saved["param"].numel() != offset:
                raise ValueError(f"a buffer holds {saved['param'].numel()} elements but this model's holds {offset}")
        saved_of_buffer = {id(buffer): saved for buffer, saved in zip(buffers, saved_buffers)}
        with torch.no_grad():
            for entry in self.entries:
                saved = saved_of_buffer[id(entry.buffer)]
                start = unpadded_offsets[entry.model_param] + entry.param_start
                end = start + entry.master.numel()
                entry.master.copy_(saved["param"][start:end])
                state = {key: value[start:end].clone() for key, value in saved.items() if key != "param"}
                state.update({key: value.clone() if torch.is_tensor(value) else value for key, value in parameter_state["scalars"].items()})
                if len(state) > 0:
                    self.optimizer.state[entry.master] = state
        self._all_gather_model_params()
