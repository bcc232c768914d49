"""Megatron's `torch_dist` checkpoint directory, written and read with torch.distributed.checkpoint (DCP).

    DIR/.metadata            DCP's index: every global tensor's shape and which file holds each block
    DIR/__{rank}_{i}.distcp  the blocks (and pickled objects) each rank wrote
    DIR/common.pt            rank 0's torch.save of everything that is not sharded (args, iteration, ...)
    DIR/metadata.json        {"sharded_backend": "torch_dist", ...}: written last, it marks the directory complete

Saving is collective: every rank offers its blocks, DCP's planner gives each distinct block to one rank
(replicas share the writing) and the coordinator writes `.metadata`. Loading is per rank: each asks for the
blocks of the global tensors it holds at its own layout, so a checkpoint reshards on the fly. The `.metadata`
pickle and every object are unpickled through allow-lists: a crafted checkpoint cannot run code.
"""

import io
import json
import os
import pickle
import threading
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException as DCPCheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.errors import UserError
from megatron.core.safe_load import UnsafeCheckpointError, load_checkpoint_file

COMMON_BASENAME = "common.pt"
CONFIG_BASENAME = "metadata.json"
DCP_METADATA_BASENAME = ".metadata"
CHECKPOINT_CONFIG = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
COMMON_STATE_KEY = "common_state/shard_0_1"  # where Megatron >= core_v0.19 keeps the common dict


class CheckpointingException(UserError, RuntimeError):
    """A distributed checkpoint that cannot be written or read; the message names the key or file."""


# ---------------------------------------------------------------------------------------------- state dicts


def extract_sharded(state_dict) -> Tuple[List[Any], Any]:
    """(every ShardedTensor / ShardedObject in a nested dict or list, the rest of it: the common state;
    containers that held only sharded entries are left out of it)."""
    sharded = []
    removed = object()

    def visit(node):
        if isinstance(node, (ShardedTensor, ShardedObject)):
            sharded.append(node)
            return removed
        if isinstance(node, (dict, list)):
            items = node.items() if isinstance(node, dict) else enumerate(node)
            kept = [(key, visit(value)) for key, value in items]
            kept = [(key, value) for key, value in kept if value is not removed]
            if node and not kept:
                return removed
            return dict(kept) if isinstance(node, dict) else [value for _, value in kept]
        return node

    common = visit(state_dict)
    return sharded, ({} if common is removed else common)


def _replace_sharded(state_dict, loaded: Dict[int, Any]):
    """The nested dict with each sharded entry replaced by what was loaded for it (by id)."""
    if isinstance(state_dict, (ShardedTensor, ShardedObject)):
        return loaded[id(state_dict)]
    if isinstance(state_dict, dict):
        return {key: _replace_sharded(value, loaded) for key, value in state_dict.items()}
    if isinstance(state_dict, list):
        return [_replace_sharded(value, loaded) for value in state_dict]
    return state_dict


def _object_bytes(value) -> io.BytesIO:
    """Megatron stores a ShardedObject as torch.save([value])."""
    stream = io.BytesIO()
    torch.save([value], stream)
    stream.seek(0)
    return stream


# -------------------------------------------------------------------------------------------------- saving


class _BlockSavePlanner(DefaultSavePlanner):
    """Writes each ShardedTensor as the block it is of its global tensor, each ShardedObject as bytes.

    The state dict DCP hands around is {entry name: local tensor or bytes}; `_items` says where each entry goes.
    Deduplication of identical blocks across ranks (replicas) is DCP's default.
    """

    def __init__(self, items: Dict[str, WriteItem]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._items = items
        self._entry_of_index = {item.index: name for name, item in items.items()}

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(list(self._items.values()))
        return self.plan

    def lookup_object(self, index: MetadataIndex):
        return self.state_dict[self._entry_of_index[MetadataIndex(index.fqn, index.offset)]]

    def transform_object(self, write_item: WriteItem, object: Any):
        return object


def _write_plan(sharded: List[Any], copy: bool) -> Tuple[Dict[str, Any], Dict[str, WriteItem]]:
    """({entry name: the data}, {entry name: its write item}) for this rank's sharded entries; with `copy` the
    data are CPU copies, independent of later training steps (what an asynchronous save needs)."""
    state, items = {}, {}
    for number, entry in enumerate(sharded):
        name = f"{number}:{entry.key}"
        if isinstance(entry, ShardedObject):
            state[name] = _object_bytes(entry.data)
            items[name] = WriteItem(index=MetadataIndex(entry.unique_key), type=WriteItemType.BYTE_IO)
            continue
        data = entry.local_view().detach()
        data = data.to("cpu", copy=True) if copy else data.contiguous()
        state[name] = data
        items[name] = WriteItem(
            index=MetadataIndex(entry.key, torch.Size(entry.global_offset)),
            type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(offsets=torch.Size(entry.global_offset), sizes=data.shape),
                properties=TensorProperties.create_from_tensor(data),
                size=torch.Size(entry.global_shape),
            ),
        )
    return state, items


def _is_distributed(process_group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def _is_coordinator(process_group) -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank(process_group) == 0


def _write_file_atomically(path: str, write) -> None:
    temporary = f"{path}.tmp.{os.getpid()}"
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def save_common(common_state: Any, checkpoint_dir: str) -> None:
    """common.pt and then metadata.json (which marks the directory complete); rank 0 calls it."""
    _write_file_atomically(os.path.join(checkpoint_dir, COMMON_BASENAME), lambda path: torch.save(common_state, path))
    text = json.dumps(CHECKPOINT_CONFIG)

    def write_config(path):
        with open(path, "w") as handle:
            handle.write(text)

    _write_file_atomically(os.path.join(checkpoint_dir, CONFIG_BASENAME), write_config)


def _save_blocks(state: Dict[str, Any], items: Dict[str, WriteItem], checkpoint_dir: str, process_group) -> None:
    distributed = _is_distributed(process_group)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(
            state,
            storage_writer=FileSystemWriter(checkpoint_dir, thread_count=1),
            planner=_BlockSavePlanner(items),
            process_group=process_group,
            no_dist=not distributed,
        )


class AsyncSaveRequest:
    """A save whose blocks are being written by a background thread; `finalize` (the common state and
    metadata.json) runs once `done()` is true on every rank, or in `wait()`."""

    def __init__(self, target, finalize):
        self._error: Optional[BaseException] = None
        self._finalize = finalize
        self._thread = threading.Thread(target=self._run, args=(target,), name="async-checkpoint-save", daemon=True)
        self._thread.start()

    def _run(self, target) -> None:
        try:
            target()
        except BaseException as error:  # reported to the training thread in wait()/finalize()
            self._error = error

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> None:
        """Block until this rank's blocks are written; raises what the writer raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error

    def finalize(self) -> None:
        self.wait()
        self._finalize()


def save(
    sharded_state_dict,
    checkpoint_dir: str,
    sharded_strategy=None,
    common_strategy=None,
    validate_access_integrity: bool = True,
    async_sharded_save: bool = False,
    process_group=None,
):
    """Save a nested dict of ShardedTensors / ShardedObjects and plain values (the common state) into the
    empty or new directory `checkpoint_dir`; every rank calls it. With `async_sharded_save` the blocks are
    copied now and written by a background thread (pass a `process_group` that training does not use), and an
    AsyncSaveRequest is returned; the caller runs its `finalize()` on every rank once all are `done()`.
    Otherwise metadata.json is written before returning (Megatron's signature; strategies are ignored)."""
    if sharded_strategy not in (None, "torch_dist") and not hasattr(sharded_strategy, "save"):
        raise CheckpointingException(f"unsupported sharded strategy {sharded_strategy!r}: only torch_dist is")
    sharded, common_state = extract_sharded(sharded_state_dict)
    os.makedirs(checkpoint_dir, exist_ok=True)
    state, items = _write_plan(sharded, copy=async_sharded_save)

    def finalize():
        if _is_coordinator(None):
            save_common(common_state, checkpoint_dir)

    def write_blocks():
        _save_blocks(state, items, checkpoint_dir, process_group)

    if async_sharded_save:
        return AsyncSaveRequest(write_blocks, finalize)
    write_blocks()
    finalize()
    if _is_distributed(None):
        dist.barrier()
    return None


# ------------------------------------------------------------------------------------------------- loading

_METADATA_MODULES = ("torch.distributed.checkpoint.", "megatron.core.dist_checkpointing.strategies.torch")
_TORCH_NAMES = {"Size", "device", "strided", "sparse_coo", "contiguous_format", "preserve_format", "channels_last"}
_BUILTINS = {"set", "frozenset", "tuple", "list", "dict", "slice"}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP's metadata classes, torch sizes/dtypes and plain containers (a `.metadata` file is a
    pickle, which could otherwise run any code)."""

    def find_class(self, module, name):
        allowed = (
            module.startswith(_METADATA_MODULES)
            or (module == "torch" and (name in _TORCH_NAMES or isinstance(getattr(torch, name, None), torch.dtype)))
            or (module == "collections" and name in ("OrderedDict", "defaultdict"))
            or (module == "builtins" and name in _BUILTINS)
            or (module == "torch.serialization" and name == "_get_layout")  # a layout looked up by its name
            or (module == "pathlib" and name in ("Path", "PosixPath", "WindowsPath"))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")
        return super().find_class(module, name)


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the `.metadata` pickle read through an allow-list."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = os.path.join(self.path, DCP_METADATA_BASENAME)
        try:
            with open(path, "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
        except FileNotFoundError:
            raise CheckpointingException(
                f"{path} is missing: {self.path} is not a complete torch_dist checkpoint"
            ) from None
        except pickle.UnpicklingError as error:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it holds {str(error).split()[-1]}, which checkpoint metadata never "
                "contains and which could run code when loaded"
            ) from None
        except (EOFError, ValueError, TypeError, AttributeError) as error:
            raise CheckpointingException(f"{path} is truncated or corrupt ({error})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointingException(f"{path} is not torch.distributed.checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_checkpoint_metadata(checkpoint_dir: str) -> Metadata:
    """The `.metadata` index of a torch_dist directory: every key, its global shape and where its blocks are."""
    return SafeFileSystemReader(checkpoint_dir).read_metadata()


def check_is_distributed_checkpoint(checkpoint_dir: str) -> bool:
    """Whether `checkpoint_dir` is a torch_dist checkpoint: its metadata.json names the torch_dist backend."""
    path = os.path.join(checkpoint_dir, CONFIG_BASENAME)
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("sharded_backend") == "torch_dist"


def check_storage_files(checkpoint_dir: str, metadata: Metadata, keys=None) -> None:
    """Every data file holding blocks of `keys` (all when None) exists and is long enough: otherwise one line
    naming the file (a truncated or lost shard)."""
    needed: Dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        if keys is None or index.fqn in keys:
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for relative_path, size in sorted(needed.items()):
        path = os.path.join(checkpoint_dir, relative_path)
        if not os.path.isfile(path):
            raise CheckpointingException(f"checkpoint file {path} is missing: the checkpoint is incomplete")
        actual = os.path.getsize(path)
        if actual < size:
            raise CheckpointingException(
                f"checkpoint file {path} is truncated ({actual} bytes, the checkpoint's index needs {size})"
            )


class _BlockLoadPlanner(DefaultLoadPlanner):
    """Reads, for each ShardedTensor, the parts of the saved blocks that overlap its block, straight into its
    data; ShardedObjects are unpickled through the checkpoint allow-list."""

    def __init__(self, checkpoint_dir: str, tensors: List[ShardedTensor], objects: List[ShardedObject]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._checkpoint_dir = checkpoint_dir
        self._tensors, self._objects = tensors, objects
        self._destinations: Dict[Tuple[str, Tuple[int, ...]], List[torch.Tensor]] = {}
        self.loaded_objects: Dict[str, Any] = {}
        self.error: Optional[UserError] = None

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.state_dict, self.metadata, self.is_coordinator = state_dict, metadata, is_coordinator

    def _chunk(self, entry: ShardedTensor, saved) -> Optional[Tuple[ChunkStorageMetadata, torch.Tensor]]:
        """The part of `entry`'s block to read and the view it lands in (vocabulary rows: the overlap)."""
        target, offsets, sizes = entry.local_view(), list(entry.global_offset), list(entry.local_shape)
        saved_shape = tuple(saved.size)
        if saved_shape != entry.global_shape:
            axis = entry.prepend_axis_num
            same_elsewhere = saved_shape[:axis] + saved_shape[axis + 1 :] == entry.global_shape[:axis] + entry.global_shape[axis + 1 :]
            if not (entry.allow_shape_mismatch and len(saved_shape) == len(entry.global_shape) and same_elsewhere):
                raise CheckpointingException(
                    f"{self._checkpoint_dir}: tensor {entry.key} has global shape {saved_shape} in the checkpoint but "
                    f"{entry.global_shape} in this model; load it into a model of the saved shape"
                )
            rows = min(sizes[axis], saved_shape[axis] - offsets[axis])
            if rows <= 0:
                return None
            sizes[axis] = rows
            target = target.narrow(axis, 0, rows)
        return ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)), target

    def create_local_plan(self) -> LoadPlan:
        try:
            return self._create_local_plan()
        except UserError as error:  # DCP wraps what its steps raise; load() re-raises this one line
            self.error = error
            raise

    def _create_local_plan(self) -> LoadPlan:
        requests = []
        for entry in self._tensors:
            saved = self.metadata.state_dict_metadata.get(entry.key)
            if saved is None or isinstance(saved, BytesStorageMetadata):
                raise CheckpointingException(
                    f"{self._checkpoint_dir} has no tensor {entry.key} (this model needs one of global shape "
                    f"{entry.global_shape}); it was saved from another model"
                )
            chunk = self._chunk(entry, saved)
            if chunk is None:
                continue
            chunk_metadata, target = chunk
            key = (entry.key, tuple(chunk_metadata.offsets))
            if key in self._destinations:
                self._destinations[key].append(target)
                continue
            self._destinations[key] = [target]
            requests += create_read_items_for_chunk_list(entry.key, saved, [chunk_metadata])
        for entry in self._objects:
            saved = self.metadata.state_dict_metadata.get(entry.unique_key)
            if not isinstance(saved, BytesStorageMetadata):
                raise CheckpointingException(f"{self._checkpoint_dir} has no object {entry.unique_key}")
            index = MetadataIndex(entry.unique_key)
            zero = torch.Size((0,))
            requests.append(ReadItem(LoadItemType.BYTE_IO, index, zero, index, zero, zero))
        self.plan = LoadPlan(requests)
        return self.plan

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        value.seek(0)
        name = f"object {read_item.dest_index.fqn} of {self._checkpoint_dir}"
        try:
            loaded = load_checkpoint_file(value, name=name)
        except UserError as error:
            self.error = error
            raise
        self.loaded_objects[read_item.dest_index.fqn] = loaded[0] if isinstance(loaded, list) and len(loaded) == 1 else loaded

    def resolve_tensor(self, read_item) -> torch.Tensor:
        target = self._destinations[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))][0]
        for axis, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            target = target.narrow(axis, start, length)
        return target

    def commit_tensor(self, read_item, tensor: torch.Tensor) -> None:
        targets = self._destinations[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for copy in targets[1:]:
            region = copy
            for axis, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                region = region.narrow(axis, start, length)
            region.copy_(tensor)


def load_common_state_dict(checkpoint_dir: str):
    """The common (non-sharded) state: common.pt, or the `common_state` object of Megatron >= core_v0.19."""
    path = os.path.join(checkpoint_dir, COMMON_BASENAME)
    if os.path.isfile(path):
        return _read_common_file(path)
    metadata = read_checkpoint_metadata(checkpoint_dir)
    if COMMON_STATE_KEY not in metadata.state_dict_metadata:
        raise CheckpointingException(f"{checkpoint_dir} holds neither {COMMON_BASENAME} nor a common_state object")
    common = ShardedObject("common_state", None)
    return load_entries(checkpoint_dir, metadata, [], [common])[common.unique_key]


def _read_common_file(path: str):
    try:
        return load_checkpoint_file(path)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        if isinstance(error, UnsafeCheckpointError):
            raise
        raise CheckpointingException(f"checkpoint file {path} is truncated or corrupt ({str(error).splitlines()[0]})") from None


def load_entries(checkpoint_dir: str, metadata: Metadata, tensors: List[ShardedTensor], objects: List[ShardedObject]):
    """Fill the tensors' data in place from the checkpoint (whose `.metadata` is `metadata`); returns {unique
    key: value} of the objects. No collectives: each rank reads what it needs."""
    check_storage_files(checkpoint_dir, metadata, {entry.key for entry in tensors} | {entry.unique_key for entry in objects})
    planner = _BlockLoadPlanner(checkpoint_dir, tensors, objects)
    reader = SafeFileSystemReader(checkpoint_dir)
    reader.read_metadata = lambda *args, **kwargs: metadata
    try:
        with warnings.catch_warnings():  # a per-rank read is meant: no_dist says so, DCP warns anyway
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({}, storage_reader=reader, planner=planner, no_dist=True)
    except (Exception, DCPCheckpointException) as error:  # DCP wraps what its steps raise; name the first cause
        if planner.error is not None:
            raise planner.error from None
        raise CheckpointingException(
            f"reading {checkpoint_dir} failed ({str(error).strip().splitlines()[-1][:300]}); its data files are "
            "damaged or do not belong to its .metadata"
        ) from None
    return planner.loaded_objects


def load(sharded_state_dict, checkpoint_dir: str, sharded_strategy=None, common_strategy=None, validate_access_integrity=True, strict=None):
    """Load `checkpoint_dir` into a nested dict of ShardedTensors (their data is filled in place, at this rank's
    layout, whatever layout saved it) and ShardedObjects; returns the dict with each sharded entry replaced by
    its loaded value, merged over the common state (Megatron's signature; strategies are ignored)."""
    if not os.path.isdir(checkpoint_dir):
        raise CheckpointingException(f"checkpoint directory {checkpoint_dir} does not exist")
    common_state = load_common_state_dict(checkpoint_dir)
    sharded, _ = extract_sharded(sharded_state_dict)
    tensors = [entry for entry in sharded if isinstance(entry, ShardedTensor)]
    objects = [entry for entry in sharded if isinstance(entry, ShardedObject)]
    metadata = read_checkpoint_metadata(checkpoint_dir)
    with torch.no_grad():
        loaded_objects = load_entries(checkpoint_dir, metadata, tensors, objects)
    loaded = {id(entry): entry.data for entry in tensors}
    loaded.update({id(entry): loaded_objects[entry.unique_key] for entry in objects})
    result = _replace_sharded(sharded_state_dict, loaded)
    if isinstance(common_state, dict) and isinstance(result, dict):
        return {**common_state, **result}
    return result
