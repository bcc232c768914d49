"""Torch-format checkpoints in Megatron-LM's layout (see docs/FORMATS.md).

SAVE/latest_checkpointed_iteration.txt names the last complete iteration; SAVE/iter_NNNNNNN/mp_rank_TT[_PPP]/
holds one model_optim_rng.pt per model-parallel rank. Every file is written under a temporary name and
renamed, each rank directory gets a manifest (checkpoint_manifest.py) once its files are complete, and the
tracker is written last, so a save interrupted at any point never becomes "latest". Out of disk space, a save
fails in one line and removes what it wrote; the previous checkpoint and the tracker are untouched.
"""

import errno
import os
import pickle
import random
import re
import shutil
import zipfile

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.training.arguments import build_parser
from megatron.training.checkpoint_manifest import MANIFEST_BASENAME, manifest_problem, manifest_text, read_manifest
from megatron.training.global_vars import get_args
from megatron.core.safe_load import load_checkpoint_file
from megatron.training.torch_dist_checkpointing import load_torch_dist, save_torch_dist
from megatron.training.utils import print_rank_0, unwrap_model
from megatron.core.errors import UserError

CHECKPOINT_BASENAME = "model_optim_rng.pt"
DISTRIBUTED_OPTIMIZER_BASENAME = "distrib_optim.pt"
TRACKER_BASENAME = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0  # Megatron-LM's checkpoint_version for this layout
# mp_rank_TT[_PPP][_EEE]: tensor rank, then pipeline and/or expert rank (a lone suffix is either; the layout says)
RANK_DIRECTORY_NAME = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be saved or loaded; the message names the file and the fix."""


_pending_async_save = None  # (iteration, --save, AsyncSaveRequest, --keep-last-checkpoints) of --async-save


def _parallel_ranks():
    """(tensor rank, pipeline rank, pipeline size) of this process; (0, 0, 1) before groups exist."""
    if not parallel_state.model_parallel_is_initialized():
        return 0, 0, 1
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    )


def _writes_rank_file() -> bool:
    """Whether this rank writes its rank file: the lowest global rank with its (tensor, pipeline, expert) ranks,
    the coordinates in the file name (ranks that share them hold the same weights)."""
    if not parallel_state.model_parallel_is_initialized() or not dist.is_initialized():
        return True
    tensor_rank, pipeline_rank, _ = _parallel_ranks()
    coordinates = [tensor_rank, pipeline_rank, parallel_state.get_expert_model_parallel_rank()]
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, coordinates)
    return every_rank.index(coordinates) == dist.get_rank()


def _expert_parallel_rank_and_size():
    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return parallel_state.get_expert_model_parallel_rank(), parallel_state.get_expert_model_parallel_world_size()


def get_checkpoint_name(
    checkpoints_path,
    iteration,
    release=False,
    pipeline_parallel=None,
    tensor_rank=None,
    pipeline_rank=None,
    expert_parallel=None,
    expert_rank=None,
    return_base_dir=False,
    basename=CHECKPOINT_BASENAME,
):
    """Path of one rank's checkpoint file: PATH/iter_0000100/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt.

    Ranks left as None are this process's own; `pipeline_parallel` None means "pipeline size > 1",
    `expert_parallel` None "expert-parallel size > 1" (Megatron's layout: each EEE holds its local experts).
    """
    directory = "release" if release else f"iter_{iteration:07d}"
    if return_base_dir:
        return os.path.join(checkpoints_path, directory)
    own_tensor_rank, own_pipeline_rank, pipeline_size = _parallel_ranks()
    if pipeline_parallel is None:
        pipeline_parallel = pipeline_size > 1
    if tensor_rank is None:
        tensor_rank = own_tensor_rank
    if pipeline_rank is None:
        pipeline_rank = own_pipeline_rank
    if pipeline_parallel:
        rank_directory = f"mp_rank_{tensor_rank:02d}_{pipeline_rank:03d}"
    else:
        rank_directory = f"mp_rank_{tensor_rank:02d}"
    own_expert_rank, expert_size = _expert_parallel_rank_and_size()
    if expert_parallel is None:
        expert_parallel = expert_size > 1
    if expert_parallel:
        rank_directory += f"_{own_expert_rank if expert_rank is None else expert_rank:03d}"
    return os.path.join(checkpoints_path, directory, rank_directory, basename)


def get_checkpoint_tracker_filename(checkpoints_path):
    """The text file naming the last complete checkpoint ("2000" or "release")."""
    return os.path.join(checkpoints_path, TRACKER_BASENAME)


def read_metadata(tracker_filename):
    """(iteration, release) from a tracker file; ranks agree on the largest iteration any of them read."""
    with open(tracker_filename) as tracker:
        text = tracker.read().strip()
    release = text == "release"
    if release:
        iteration = 0
    else:
        try:
            iteration = int(text)
        except ValueError:
            raise CheckpointError(
                f"{tracker_filename} should hold an iteration number or 'release' but holds {text!r}; "
                "delete it or write the iteration of a complete checkpoint into it"
            ) from None
        if iteration < 0:
            raise CheckpointError(f"{tracker_filename} holds a negative iteration {iteration}")
    return _reduce_across_ranks(iteration, dist.ReduceOp.MAX), release


def _reduce_across_ranks(value: int, op) -> int:
    """`value` reduced with `op` over every rank (the value itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    on_cuda = dist.get_backend() == "nccl"
    tensor = torch.tensor([value], dtype=torch.long, device="cuda" if on_cuda else "cpu")
    dist.all_reduce(tensor, op=op)
    return int(tensor.item())


# Flags that decide the shapes of the weights: they must agree between a checkpoint and the run loading it,
# and --use-checkpoint-args takes them from the checkpoint.
MODEL_SHAPING_ARGS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "group_query_attention",
    "num_query_groups",
    "kv_channels",
    "max_position_embeddings",
    "position_embedding_type",
    "normalization",
    "swiglu",
    "qk_layernorm",
    "untie_embeddings_and_output_weights",
    "add_bias_linear",
    "add_qkv_bias",
    "padded_vocab_size",
    "num_experts",
    "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size",
    "moe_layer_freq",
    "multi_latent_attention",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_head_dim",
    "qk_pos_emb_head_dim",
    "v_head_dim",
    "mtp_num_layers",
)
# Flags that change what the weights compute but not their shapes: a resumed run must agree with the
# checkpoint unless --override-checkpoint-args; --use-checkpoint-args takes them too.
MODEL_MATHS_ARGS = (
    "apply_residual_connection_post_layernorm",
    "moe_router_topk",
    "moe_router_score_function",
    "moe_router_pre_softmax",
    "norm_epsilon",
    "rotary_base",
    "rotary_percent",
    "rotary_interleaved",
    "rotary_seq_len_interpolation_factor",
    "use_rope_scaling",
    "rope_scaling_factor",
    "rope_scaling_low_freq_factor",
    "rope_scaling_high_freq_factor",
    "rope_scaling_original_max_position_embeddings",
    "rope_type",
    "rotary_scaling_factor",
    "mscale",
    "mscale_all_dim",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
)
# Also taken over by --use-checkpoint-args (where left at their defaults), but free to differ when loading.
CHECKPOINT_DEFAULT_ARGS = MODEL_SHAPING_ARGS + MODEL_MATHS_ARGS + (
    "seq_length",
    "use_legacy_models",
    "tokenizer_type",
    "vocab_size",
    "make_vocab_size_divisible_by",
)
PARALLEL_LAYOUT_ARGS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size")


def _rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _approximate_size(num_bytes: int) -> str:
    if num_bytes >= 1 << 30:
        return f"~{num_bytes / (1 << 30):.1f} GB"
    return f"~{max(1, round(num_bytes / (1 << 20)))} MB"


def _write_atomically(path: str, write, needed_bytes: int = 0) -> str:
    """write(PATH.tmp), then rename it to PATH: a reader never sees a half-written file under the real name.

    The temporary file is removed whatever fails, closing included; running out of disk space is one
    CheckpointError that says how much this rank's save needs. Returns PATH.
    """
    temporary = path + ".tmp"
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException as error:
        _remove_quietly(temporary)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EFBIG):
            raise CheckpointError(
                f"no space left on {os.path.dirname(path)} (needs {_approximate_size(needed_bytes)} for this rank's "
                f"checkpoint files; writing {os.path.basename(path)} failed): free disk space or choose another "
                "--save; the previous checkpoint is intact"
            ) from None
        raise
    return path


def _write_text(path: str, text: str, needed_bytes: int = 0) -> str:
    def write(temporary):
        with open(temporary, "w") as handle:
            handle.write(text)

    return _write_atomically(path, write, needed_bytes)


def write_tracker(checkpoints_path: str, iteration) -> None:
    """Name `iteration` (a number, or "release") as the last complete checkpoint: written last, atomically."""
    _write_text(get_checkpoint_tracker_filename(checkpoints_path), str(iteration))


def check_save_directory(checkpoints_path: str) -> None:
    """--save must be a directory this process can create files in: checked at start-up, not at the first save."""
    probe = os.path.join(checkpoints_path, f".write_test.{os.getpid()}")
    try:
        os.makedirs(checkpoints_path, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise CheckpointError(
            f"--save {checkpoints_path} is not a writable directory ({error.strerror}); create it with write "
            "permission or choose another --save"
        ) from None


def get_rng_state(data_parallel_random_init: bool, device: str) -> list:
    """Every generator's state (python, numpy, torch, CUDA on CUDA runs only, tensor-parallel streams).

    A list with one entry per data-parallel rank when replicas were seeded differently, else one entry.
    """
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if device == "cuda" else None,
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if not data_parallel_random_init or parallel_state.get_data_parallel_world_size() == 1:
        return [state]
    states = [None] * parallel_state.get_data_parallel_world_size()
    dist.all_gather_object(states, state, group=parallel_state.get_data_parallel_group())
    return states


def set_rng_state(state: dict) -> None:
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if state.get("cuda_rng_state") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    if state.get("rng_tracker_states"):
        tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _model_state_dicts(model) -> dict:
    """{"model": ...} for one model chunk; {"model0": ..., "model1": ...} for virtual pipeline chunks."""
    chunks = unwrap_model(model)
    if len(chunks) == 1:
        return {"model": chunks[0].state_dict()}
    return {f"model{index}": chunk.state_dict() for index, chunk in enumerate(chunks)}


def _save_safetensors(model_state: dict, path: str, needed_bytes: int) -> str:
    """The model's tensors as safetensors (shared storage cloned apart; extra state objects skipped)."""
    from safetensors.torch import save_file

    tensors = {
        name: value.detach().cpu().contiguous().clone()
        for name, value in model_state.items()
        if isinstance(value, torch.Tensor)
    }
    return _write_atomically(path, lambda temporary: save_file(tensors, temporary, metadata={"format": "pt"}), needed_bytes)


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors inside nested dicts / lists: the size a torch.save of `obj` is about."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(value) for value in obj)
    return 0


def _write_rank_files(checkpoint_name: str, state_dict: dict, distributed_optimizer_state, save_safetensors: bool):
    """This rank's files, then their manifest; on any failure the files written so far are removed."""
    directory = os.path.dirname(checkpoint_name)
    model_keys = [key for key in state_dict if key.startswith("model")]
    needed = _tensor_bytes(state_dict) + _tensor_bytes(distributed_optimizer_state)
    needed += _tensor_bytes([state_dict[key] for key in model_keys]) if save_safetensors else 0
    written = []
    try:
        os.makedirs(directory, exist_ok=True)
        _remove_quietly(os.path.join(directory, MANIFEST_BASENAME))  # a re-save is unverified until complete
        if distributed_optimizer_state is not None:
            path = os.path.join(directory, DISTRIBUTED_OPTIMIZER_BASENAME)
            written.append(_write_atomically(path, lambda temporary: torch.save(distributed_optimizer_state, temporary), needed))
        written.append(_write_atomically(checkpoint_name, lambda temporary: torch.save(state_dict, temporary), needed))
        for key in model_keys if save_safetensors else []:
            name = "model.safetensors" if key == "model" else f"{key}.safetensors"
            written.append(_save_safetensors(state_dict[key], os.path.join(directory, name), needed))
        manifest = manifest_text(directory, [os.path.basename(path) for path in written])
        _write_text(os.path.join(directory, MANIFEST_BASENAME), manifest, needed)
    except BaseException:
        for path in written:
            _remove_quietly(path)
        for empty in (directory, os.path.dirname(directory)):
            try:
                os.rmdir(empty)
            except OSError:
                break
        raise


def save_checkpoint(iteration, model, optimizer, opt_param_scheduler, num_floating_point_operations_so_far=0):
    """Write iteration `iteration` under --save in --ckpt-format; the tracker names it only after every rank
    finished (with --async-save, in a later maybe_finalize_async_save)."""
    args = get_args()
    maybe_finalize_async_save(blocking=True)
    rng_state = None if args.no_save_rng else get_rng_state(args.data_parallel_random_init, args.device)
    print_rank_0(f"saving checkpoint at iteration {iteration:7d} to {args.save} in {args.ckpt_format} format")
    optimizer.finish_param_sync()
    if args.ckpt_format == "torch_dist":
        if not _save_torch_dist(iteration, model, optimizer, opt_param_scheduler, num_floating_point_operations_so_far, rng_state):
            return
    else:
        _save_torch_format(iteration, model, optimizer, opt_param_scheduler, num_floating_point_operations_so_far, rng_state)
    publish_checkpoint(args.save, iteration, args.keep_last_checkpoints)
    print_rank_0(f"  successfully saved checkpoint at iteration {iteration:7d} to {args.save}")


def _run_state(args, iteration, num_floating_point_operations_so_far) -> dict:
    """What both formats save besides model, optimizer and RNG: the args (with the data position), the format
    version, the iteration and the FLOPs so far."""
    return {
        "args": args,
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "num_floating_point_operations_so_far": num_floating_point_operations_so_far,
    }


def _restore_data_position(args, checkpoint_args) -> None:
    """Continue the data where the checkpoint's run stopped."""
    args.consumed_train_samples = getattr(checkpoint_args, "consumed_train_samples", 0)
    args.skipped_train_samples = getattr(checkpoint_args, "skipped_train_samples", 0)
    args.consumed_valid_samples = getattr(checkpoint_args, "consumed_valid_samples", 0)


def _save_torch_format(iteration, model, optimizer, opt_param_scheduler, num_floating_point_operations_so_far, rng_state):
    args = get_args()
    checkpoint_name = get_checkpoint_name(args.save, iteration)
    # A collective over the data-parallel group: every rank contributes its optimizer shard.
    distributed_optimizer_state = (
        optimizer.gather_parameter_state() if args.use_distributed_optimizer and not args.no_save_optim else None
    )
    if _writes_rank_file():
        state_dict = {**_run_state(args, iteration, num_floating_point_operations_so_far), **_model_state_dicts(model)}
        if not args.no_save_optim:
            state_dict["optimizer"] = optimizer.state_dict()
            state_dict["opt_param_scheduler"] = opt_param_scheduler.state_dict()
        if rng_state is not None:
            state_dict["rng_state"] = rng_state
        _write_rank_files(checkpoint_name, state_dict, distributed_optimizer_state, args.save_safetensors)


def _save_torch_dist(iteration, model, optimizer, opt_param_scheduler, num_floating_point_operations_so_far, rng_state) -> bool:
    """Write the torch_dist directory; False when --async-save left it to finish in the background."""
    global _pending_async_save
    args = get_args()
    directory = get_checkpoint_name(args.save, iteration, return_base_dir=True)
    if _rank_and_world()[0] == 0 and os.path.exists(directory):
        shutil.rmtree(directory)  # re-saving an iteration: its old files must not mix with the new ones
    _barrier()
    common_state = _run_state(args, iteration, num_floating_point_operations_so_far)
    if not args.no_save_optim:
        common_state["optimizer"] = {"hyperparameters": optimizer.hyperparameter_state()}
        common_state["opt_param_scheduler"] = opt_param_scheduler.state_dict()
    try:
        request = save_torch_dist(directory, common_state, model, optimizer, rng_state, args, args.async_save)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise CheckpointError(f"no space left on {args.save} while saving iteration {iteration}: free disk space or choose another --save; the previous checkpoint is intact") from None
        raise
    if request is None:
        return True
    _pending_async_save = (iteration, args.save, request, args.keep_last_checkpoints)
    print_rank_0(f"  writing checkpoint of iteration {iteration:7d} in the background (--async-save)")
    return False


def _all_ranks_true(flag: bool) -> bool:
    return _reduce_across_ranks(int(flag), dist.ReduceOp.MIN) == 1


def maybe_finalize_async_save(blocking: bool = False) -> None:
    """Complete a pending --async-save once every rank's blocks are written (waiting for them when `blocking`):
    metadata.json, then the tracker. Every rank calls it (the training loop once per iteration)."""
    global _pending_async_save
    if _pending_async_save is None:
        return
    iteration, save_dir, request, keep = _pending_async_save
    if not blocking and not _all_ranks_true(request.done()):
        return
    _pending_async_save = None
    request.finalize()
    _barrier()
    publish_checkpoint(save_dir, iteration, keep)
    print_rank_0(f"  successfully saved checkpoint at iteration {iteration:7d} to {save_dir} (asynchronously)")


def publish_checkpoint(save_dir: str, iteration: int, keep_last) -> None:
    """Once every rank's files are complete: name `iteration` in the tracker, then apply --keep-last-checkpoints."""
    _barrier()
    if _rank_and_world()[0] == 0:
        write_tracker(save_dir, iteration)
        if keep_last:
            _delete_old_checkpoints(save_dir, iteration, keep_last)
    _barrier()


def _saved_iterations(checkpoints_path: str) -> list:
    """Every iteration with an iter_NNNNNNN directory under `checkpoints_path`, complete or not, ascending."""
    iterations = []
    for entry in os.listdir(checkpoints_path) if os.path.isdir(checkpoints_path) else []:
        match = re.fullmatch(r"iter_(\d+)", entry)
        if match and os.path.isdir(os.path.join(checkpoints_path, entry)):
            iterations.append(int(match.group(1)))
    return sorted(iterations)


def _complete_iterations(checkpoints_path: str, release_name: str) -> list:
    """Iterations under `checkpoints_path` whose file for this rank exists and is a whole zip archive."""
    iterations = []
    for iteration in _saved_iterations(checkpoints_path):
        candidate = os.path.join(get_checkpoint_name(checkpoints_path, iteration, return_base_dir=True), release_name)
        if os.path.isfile(candidate) and zipfile.is_zipfile(candidate):
            iterations.append(iteration)
    return iterations


def _delete_old_checkpoints(checkpoints_path: str, newest: int, keep: int) -> None:
    """--keep-last-checkpoints: once `newest` is complete (the tracker names it), delete all but the `keep`
    newest iteration directories up to it. Each is renamed first, so a deletion cut short leaves no iter_
    directory behind that looks like a checkpoint."""
    older = [iteration for iteration in _saved_iterations(checkpoints_path) if iteration < newest]
    for iteration in older[: max(0, len(older) - (keep - 1))]:
        directory = get_checkpoint_name(checkpoints_path, iteration, return_base_dir=True)
        retired = f"{directory}.deleting"
        os.replace(directory, retired)
        shutil.rmtree(retired, ignore_errors=True)
        print_rank_0(f"  deleted checkpoint at iteration {iteration} (--keep-last-checkpoints {keep})")


def _rank_directory_problem(checkpoint_name: str) -> "str | None":
    """Why this rank's directory of a checkpoint cannot be loaded, or None when it looks healthy."""
    if not os.path.isfile(checkpoint_name):
        return f"{checkpoint_name} does not exist"
    directory = os.path.dirname(checkpoint_name)
    manifest = read_manifest(directory)
    if manifest is None:  # saved before manifests existed, or by Megatron-LM
        return None if zipfile.is_zipfile(checkpoint_name) else f"{checkpoint_name} is not a whole checkpoint file"
    problem = manifest_problem(directory, manifest)
    return None if problem is None else f"{directory}: {problem}"


def _torch_dist_problem(directory: str) -> "str | None":
    """Why a torch_dist directory cannot be loaded (incomplete, or a data file lost or cut short), or None."""
    if not dist_checkpointing.check_is_distributed_checkpoint(directory):
        return f"{directory} has no valid metadata.json (its save did not complete)"
    try:
        metadata = dist_checkpointing.read_checkpoint_metadata(directory)
        dist_checkpointing.check_storage_files(directory, metadata)
    except UserError as error:
        return str(error)
    return None


def _verify_checkpoint(checkpoints_path: str, checkpoint_name: str, iteration: int) -> None:
    """Compare this rank's files with the manifest written when they were saved."""
    directory = os.path.dirname(checkpoint_name)
    manifest = read_manifest(directory)
    if manifest is None or not os.path.isfile(checkpoint_name):  # a missing file has its own message
        return
    problem = manifest_problem(directory, manifest)
    if problem is not None:
        raise CheckpointError(
            f"checkpoint {directory} is damaged: {problem}"
            + _older_checkpoint_hint(checkpoints_path, checkpoint_name, iteration)
            + " (--auto-resume falls back to the newest healthy checkpoint; --no-verify-checkpoint skips this check)"
        )


def _newest_healthy_iteration(checkpoints_path: str, latest: int) -> int:
    """--auto-resume: `latest` if every rank's files are healthy, else the newest older iteration that is."""
    problems = []
    for iteration in sorted({latest, *(it for it in _saved_iterations(checkpoints_path) if it < latest)}, reverse=True):
        directory = get_checkpoint_name(checkpoints_path, iteration, return_base_dir=True)
        if _rank_directory_names(directory):
            problem = _rank_directory_problem(get_checkpoint_name(checkpoints_path, iteration))
        else:
            problem = _torch_dist_problem(directory)
        if _reduce_across_ranks(int(problem is None), dist.ReduceOp.MIN) == 1:
            if problems:
                print_rank_0(
                    f"WARNING: --auto-resume: {'; '.join(problems)}; resuming from the newest healthy checkpoint, "
                    f"iteration {iteration}"
                )
            return iteration
        problems.append(f"iteration {iteration} is damaged ({problem or 'on another rank'})")
    raise CheckpointError(f"--auto-resume found no healthy checkpoint in {checkpoints_path}: {'; '.join(problems)}")


def _older_checkpoint_hint(checkpoints_path: str, checkpoint_name: str, iteration: int) -> str:
    rank_file = os.path.relpath(checkpoint_name, os.path.dirname(os.path.dirname(checkpoint_name)))
    older = [it for it in _complete_iterations(checkpoints_path, rank_file) if it < iteration]
    if not older:
        return ""
    return (
        f"; an older complete checkpoint exists at iteration {older[-1]}: load it with --ckpt-step {older[-1]} "
        f"(or write {older[-1]} into {get_checkpoint_tracker_filename(checkpoints_path)})"
    )


def _read_checkpoint_file(checkpoints_path: str, checkpoint_name: str, iteration: int) -> dict:
    """torch.load of one rank's file, with one clear message when it is missing or damaged."""
    if not os.path.isfile(checkpoint_name):
        raise CheckpointError(
            f"checkpoint file {checkpoint_name} does not exist (iteration {iteration} of {checkpoints_path} was "
            f"not saved completely, or was saved with another parallel layout)"
            + _older_checkpoint_hint(checkpoints_path, checkpoint_name, iteration)
        )
    try:
        return load_checkpoint_file(checkpoint_name)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"checkpoint file {checkpoint_name} is truncated or corrupt ({str(error).splitlines()[0]})"
            + _older_checkpoint_hint(checkpoints_path, checkpoint_name, iteration)
        ) from None


def _locate_checkpoint(checkpoints_path: str, ckpt_step, exit_on_missing: bool):
    """(iteration, release) to load from `checkpoints_path`, or None when there is nothing to load."""
    tracker = get_checkpoint_tracker_filename(checkpoints_path)
    if ckpt_step is not None:
        return ckpt_step, False
    if not os.path.isfile(tracker):
        if exit_on_missing:
            raise CheckpointError(
                f"--load {checkpoints_path} holds no checkpoint ({tracker} is missing) and "
                "--exit-on-missing-checkpoint is set"
            )
        return None
    return read_metadata(tracker)


def _describe_mismatch(checkpoint_args, args, layout_args=PARALLEL_LAYOUT_ARGS) -> str:
    """The model flags whose values differ between the checkpoint and this run, as one sentence
    (--override-checkpoint-args: the parallel layout only)."""
    differences = []
    model_args = () if args.override_checkpoint_args else MODEL_SHAPING_ARGS + MODEL_MATHS_ARGS
    if not layout_args:  # the vocabulary's padding follows the tensor-parallel size
        model_args = tuple(name for name in model_args if name != "padded_vocab_size")
    for name in model_args + layout_args:
        if hasattr(checkpoint_args, name) and hasattr(args, name):
            saved, current = getattr(checkpoint_args, name), getattr(args, name)
            if saved != current:
                differences.append(f"--{name.replace('_', '-')} {saved} (checkpoint) vs {current} (this run)")
    return "; ".join(differences)


def _check_model_stack(checkpoint_name: str, checkpoint_args, args) -> None:
    """The legacy and mcore stacks name their weights differently: a checkpoint is read by the stack that wrote it."""
    saved_legacy = getattr(checkpoint_args, "use_legacy_models", None)
    if saved_legacy is None or bool(saved_legacy) == bool(args.use_legacy_models):
        return
    stack = {True: "legacy (--use-legacy-models)", False: "mcore"}
    raise CheckpointError(
        f"{checkpoint_name} was saved by the {stack[bool(saved_legacy)]} stack but this run uses the "
        f"{stack[bool(args.use_legacy_models)]} stack; run with the checkpoint's stack, or convert it: python "
        f"tools/checkpoint/convert.py --load-model-type mg --save-model-type mg --load-dir "
        f"{os.path.dirname(os.path.dirname(os.path.dirname(checkpoint_name)))} --save-dir NEW_DIR "
        f"{'--use-legacy-models' if args.use_legacy_models else '--use-mcore-models'}"
    )


def _check_checkpoint_args(checkpoint_name: str, checkpoint_args, args, any_layout: bool = False) -> None:
    """The saved model flags must match this run's; `any_layout` (torch_dist): the parallel layout and the stack
    may differ, since the checkpoint holds global tensors under one set of names."""
    if not any_layout:
        _check_model_stack(checkpoint_name, checkpoint_args, args)
    mismatch = _describe_mismatch(checkpoint_args, args, () if any_layout else PARALLEL_LAYOUT_ARGS)
    if not mismatch:
        return
    layout_changed = any(
        getattr(checkpoint_args, name, None) not in (None, getattr(args, name)) for name in PARALLEL_LAYOUT_ARGS
    )
    hint = (
        "re-shard it with tools/checkpoint/convert.py --target-tensor-parallel-size/--target-pipeline-parallel-size/"
        "--target-expert-parallel-size"
        if layout_changed
        else "use the checkpoint's values (or --use-checkpoint-args), or force it with --override-checkpoint-args"
    )
    raise CheckpointError(f"{checkpoint_name} does not match this model: {mismatch}; {hint}")


def _load_model_weights(model, state_dict: dict, checkpoint_name: str, strict: bool) -> None:
    chunks = unwrap_model(model)
    for index, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{index}"
        if key not in state_dict:
            raise CheckpointError(f"{checkpoint_name} has no '{key}' entry: it is not a model checkpoint")
        try:
            chunk.load_state_dict(state_dict[key], strict=strict)
        except RuntimeError as error:
            details = " ".join(line.strip() for line in str(error).splitlines()[1:])
            raise CheckpointError(f"{checkpoint_name} does not fit the model: {details}") from None


def _rank_directory_names(iteration_directory: str) -> set:
    if not os.path.isdir(iteration_directory):
        return set()
    return {name for name in os.listdir(iteration_directory) if RANK_DIRECTORY_NAME.match(name)}


def _describe_saved_layout(names: set) -> str:
    """The layout rank directories mp_rank_TT[_PPP][_EEE] show; a lone suffix is a pipeline or an expert rank
    (Megatron's names do not say which)."""
    parts = [[int(part) for part in name.split("_")[2:]] for name in names]
    sizes = [1 + max(ranks[index] for ranks in parts) if all(len(ranks) > index for ranks in parts) else 1 for index in range(3)]
    suffixes = max(len(ranks) for ranks in parts) - 1
    if suffixes == 2:
        return f"tensor-parallel {sizes[0]} x pipeline-parallel {sizes[1]} x expert-parallel {sizes[2]}"
    if suffixes == 1:
        return f"tensor-parallel {sizes[0]} x pipeline-parallel {sizes[1]} (or expert-parallel {sizes[1]})"
    return f"tensor-parallel {sizes[0]} x pipeline-parallel 1"


def _check_saved_layout(iteration_directory: str, args) -> None:
    """A checkpoint is read at the TP/PP/EP layout it was written with; another layout needs conversion first."""
    names = _rank_directory_names(iteration_directory)
    tp, pp, ep = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size
    expected = {
        os.path.basename(os.path.dirname(get_checkpoint_name("", 0, False, pp > 1, t, p, ep > 1, e)))
        for t in range(tp)
        for p in range(pp)
        for e in range(ep)
    }
    # Missing rank directories of the right layout are reported when that rank reads its file.
    if not names or (names <= expected and _describe_saved_layout(names) == _describe_saved_layout(expected)):
        return
    current = f"tensor-parallel {tp} x pipeline-parallel {pp}" + (f" x expert-parallel {ep}" if ep > 1 else "")
    raise CheckpointError(
        f"{iteration_directory} was saved at {_describe_saved_layout(names)} but this run uses {current}; re-shard "
        f"it first: python tools/checkpoint/convert.py --load-model-type mg --save-model-type mg --load-dir "
        f"{os.path.dirname(iteration_directory)} --save-dir NEW_DIR --target-tensor-parallel-size {tp} "
        f"--target-pipeline-parallel-size {pp} --target-expert-parallel-size {ep}"
    )


def _check_optimizer_kind(checkpoint_name: str, optimizer_state: dict, args) -> None:
    """Optimizer state is kept in the form it was saved in: sharded (distrib_optim.pt) or whole."""
    saved_distributed = bool(isinstance(optimizer_state, dict) and optimizer_state.get("distributed_optimizer"))
    if saved_distributed == bool(args.use_distributed_optimizer):
        return
    saved, current = ("with", "without") if saved_distributed else ("without", "with")
    raise CheckpointError(
        f"{checkpoint_name} was saved {saved} --use-distributed-optimizer but this run is {current} it; "
        f"run {saved} the flag, or pass --no-load-optim to load the weights only (fresh optimizer state)"
    )


def _read_distributed_optimizer_state(checkpoints_path: str, checkpoint_name: str, iteration: int) -> dict:
    """distrib_optim.pt beside the rank's model file (written by data-parallel rank 0 at any DP size)."""
    name = os.path.join(os.path.dirname(checkpoint_name), DISTRIBUTED_OPTIMIZER_BASENAME)
    return _read_checkpoint_file(checkpoints_path, name, iteration)


def load_checkpoint(model, optimizer, opt_param_scheduler, load_arg: str = "load", strict: bool = True):
    """Load --load (or `load_arg`) into the model, optimizer, scheduler and RNGs.

    Returns (iteration, num_floating_point_operations_so_far); (0, 0) when there is nothing to load.
    Sets args.consumed_train_samples / consumed_valid_samples so the data continues where it stopped.
    """
    args = get_args()
    checkpoints_path = getattr(args, load_arg)
    located = _locate_checkpoint(checkpoints_path, args.ckpt_step, args.exit_on_missing_checkpoint)
    if located is None:
        print_rank_0(f"WARNING: no checkpoint found in {checkpoints_path}; training starts from random weights")
        return 0, 0
    iteration, release = located
    verified = False
    if args.auto_resume and not release and args.ckpt_step is None:
        iteration, verified = _newest_healthy_iteration(checkpoints_path, iteration), True
    directory = get_checkpoint_name(checkpoints_path, iteration, release, return_base_dir=True)
    if _checkpoint_format(directory, args) == "torch_dist":
        return _load_torch_dist_checkpoint(model, optimizer, opt_param_scheduler, checkpoints_path, directory, release)
    _check_saved_layout(directory, args)
    checkpoint_name = get_checkpoint_name(checkpoints_path, iteration, release)
    if args.verify_checkpoint and not verified:
        _verify_checkpoint(checkpoints_path, checkpoint_name, iteration)
    state_dict = _read_checkpoint_file(checkpoints_path, checkpoint_name, iteration)
    checkpoint_args = state_dict.get("args")
    if checkpoint_args is not None:
        _check_checkpoint_args(checkpoint_name, checkpoint_args, args)
    _load_model_weights(model, state_dict, checkpoint_name, strict)

    weights_only = args.finetune or release
    if weights_only:
        iteration = 0
    else:
        iteration = state_dict["iteration"]
        if checkpoint_args is not None:
            _restore_data_position(args, checkpoint_args)
    if weights_only or args.no_load_optim:
        optimizer.reload_model_params()
    else:
        if "optimizer" not in state_dict:
            raise CheckpointError(
                f"{checkpoint_name} holds no optimizer state (saved with --no-save-optim?); pass --no-load-optim "
                "or --finetune to load the weights only"
            )
        _check_optimizer_kind(checkpoint_name, state_dict["optimizer"], args)
        try:
            optimizer.load_state_dict(state_dict["optimizer"])
            if args.use_distributed_optimizer:
                optimizer.load_parameter_state(_read_distributed_optimizer_state(checkpoints_path, checkpoint_name, iteration))
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"the optimizer state in {checkpoint_name} does not fit: {error}") from None
        try:
            opt_param_scheduler.load_state_dict(state_dict["opt_param_scheduler"])
        except ValueError as error:
            raise CheckpointError(f"cannot resume from {checkpoint_name}: {error}") from None
    if not (weights_only or args.no_load_rng):
        if "rng_state" not in state_dict:
            raise CheckpointError(
                f"{checkpoint_name} holds no RNG state (saved with --no-save-rng?); pass --no-load-rng"
            )
        _restore_rng_state(state_dict["rng_state"], args.data_parallel_random_init)
    _barrier()
    print_rank_0(f"  successfully loaded checkpoint from {checkpoints_path} at iteration {iteration}")
    return iteration, state_dict.get("num_floating_point_operations_so_far", 0)


def _checkpoint_format(directory: str, args) -> str:
    """The format of the checkpoint directory `directory`: --ckpt-format's, or what the files say with
    --auto-detect-ckpt-format; a directory of the other format is one clear error."""
    is_torch_dist = dist_checkpointing.check_is_distributed_checkpoint(directory)
    is_torch = bool(_rank_directory_names(directory))
    if args.auto_detect_ckpt_format:
        return "torch_dist" if is_torch_dist or not is_torch else "torch"
    if args.ckpt_format == "torch" and is_torch_dist and not is_torch:
        raise CheckpointError(
            f"{directory} is a torch_dist checkpoint but this run loads --ckpt-format torch; pass --ckpt-format "
            "torch_dist or --auto-detect-ckpt-format"
        )
    if args.ckpt_format == "torch_dist" and is_torch and not is_torch_dist:
        raise CheckpointError(
            f"{directory} is a torch-format checkpoint (mp_rank_* files) but this run loads --ckpt-format "
            "torch_dist; pass --ckpt-format torch or --auto-detect-ckpt-format (or convert it with "
            "tools/checkpoint/convert.py --save-ckpt-format torch_dist)"
        )
    return args.ckpt_format


def _load_torch_dist_checkpoint(model, optimizer, opt_param_scheduler, checkpoints_path: str, directory: str, release: bool):
    """load_checkpoint for a torch_dist directory, at any parallel layout."""
    args = get_args()
    weights_only = args.finetune or release
    load_optimizer = not (weights_only or args.no_load_optim)
    load_rng = not (weights_only or args.no_load_rng)
    common = load_torch_dist(
        model, optimizer, directory, args, load_optimizer, load_rng,
        lambda saved_args: _check_checkpoint_args(directory, saved_args, args, any_layout=True),
    )
    checkpoint_args = common.get("args")
    iteration = 0 if weights_only else common["iteration"]
    if not weights_only and checkpoint_args is not None:
        _restore_data_position(args, checkpoint_args)
    if load_optimizer:
        try:
            opt_param_scheduler.load_state_dict(common["opt_param_scheduler"])
        except ValueError as error:
            raise CheckpointError(f"cannot resume from {directory}: {error}") from None
    if load_rng and common["rng_state"] is not None:
        _restore_rng_state(common["rng_state"], args.data_parallel_random_init)
    _barrier()
    print_rank_0(f"  successfully loaded checkpoint from {checkpoints_path} at iteration {iteration} (torch_dist)")
    return iteration, common.get("num_floating_point_operations_so_far", 0)


def _restore_rng_state(rng_states: list, data_parallel_random_init: bool) -> None:
    index = parallel_state.get_data_parallel_rank() if data_parallel_random_init else 0
    if index >= len(rng_states):
        raise CheckpointError(
            f"the checkpoint holds RNG states of {len(rng_states)} data-parallel ranks, this run has more; "
            "pass --no-load-rng"
        )
    set_rng_state(rng_states[index])


def load_args_from_checkpoint(args, load_arg: str = "load") -> None:
    """--use-checkpoint-args: take the model-shaping flags saved in the checkpoint for every one that this
    run left at its default (flags given on the command line win)."""
    parser = build_parser()
    checkpoints_path = getattr(args, load_arg)
    located = _locate_checkpoint(checkpoints_path, args.ckpt_step, exit_on_missing=True)
    iteration, release = located
    directory = get_checkpoint_name(checkpoints_path, iteration, release, return_base_dir=True)
    if _checkpoint_format(directory, args) == "torch_dist":
        checkpoint_name = directory
        checkpoint_args = dist_checkpointing.load_common_state_dict(directory).get("args")
    else:
        checkpoint_name = get_checkpoint_name(
            checkpoints_path, iteration, release, pipeline_parallel=args.pipeline_model_parallel_size > 1,
            tensor_rank=0, pipeline_rank=0, expert_parallel=args.expert_model_parallel_size > 1, expert_rank=0,
        )
        if args.verify_checkpoint:
            _verify_checkpoint(checkpoints_path, checkpoint_name, iteration)
        checkpoint_args = _read_checkpoint_file(checkpoints_path, checkpoint_name, iteration).get("args")
    if checkpoint_args is None:
        raise CheckpointError(f"{checkpoint_name} holds no saved arguments; give the model flags instead of --use-checkpoint-args")
    for name in CHECKPOINT_DEFAULT_ARGS:
        if hasattr(checkpoint_args, name) and getattr(args, name, None) == parser.get_default(name):
            setattr(args, name, getattr(checkpoint_args, name))
