"""pretrain(): the training loop with Megatron-LM's semantics, written for any parallel layout.

Initialise -> build the model (wrapped in DistributedDataParallel), optimizer and schedule -> load a
checkpoint -> build data iterators at the saved data position -> train (the pipeline schedule's
forward-backward function, an optimizer step, logging, evaluation, checkpoints, exits) -> final save and
evaluation. User errors (bad flags, bad checkpoints, a NaN loss) end the run with one message and status 1.
"""

import contextlib
import inspect
import math
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
from megatron.core.num_microbatches_calculator import (
    get_current_global_batch_size,
    get_num_microbatches,
    update_num_microbatches,
)
from megatron.core.errors import UserError
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.training.checkpointing import load_checkpoint, maybe_finalize_async_save, save_checkpoint
from megatron.training.flops import num_floating_point_operations
from megatron.training.global_vars import (
    destroy_global_vars,
    get_args,
    get_signal_handler,
    get_timers,
    get_tensorboard_writer,
    get_wandb_writer,
)
from megatron.training.initialize import initialize_megatron
from megatron.training.model_config import ddp_config_from_args, optimizer_config_from_args
from megatron.training.moe_logging import moe_aux_loss_report, mtp_loss_report
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.training.training_log import TrainingLogger, build_logging_writers, print_args
from megatron.training.utils import (
    TrainingError,
    is_last_rank,
    print_datetime,
    print_error,
    print_line,
    print_rank_0,
    print_rank_last,
    unwrap_model,
)

_TRAIN_START_TIME = time.time()


class ModelTypeError(UserError, ValueError):
    """A model type this training loop cannot run."""


def pretrain(
    train_valid_test_dataset_provider,
    model_provider,
    model_type,
    forward_step_func,
    process_non_loss_data_func=None,
    extra_args_provider=None,
    args_defaults={},
    get_embedding_ranks=None,
    get_position_embedding_ranks=None,
    args_list=None,
):
    """Train a model end to end from command-line flags (`args_list`, else sys.argv); Megatron-LM's signature.

    `model_provider(pre_process, post_process)` builds this rank's model; `model_type` is
    ModelType.encoder_or_decoder (the only kind supported); `train_valid_test_dataset_provider([train, valid,
    test sample counts])` returns the three datasets, on every rank when it has `is_distributed = True`, else
    on tensor-parallel rank 0 only (the others receive batches by broadcast: get_batch_on_this_tp_rank);
    `forward_step_func(data_iterator, model)` returns (output, loss_func). `process_non_loss_data_func(
    collected, iteration, writer)` receives, at each evaluation, what loss_func(output, non_loss_data=True)
    returned on the last rank. `get_embedding_ranks` / `get_position_embedding_ranks` choose the stages that
    share embeddings (see parallel_state.initialize_model_parallel). Exits with status 1 and one message on a
    user error.
    """
    try:
        if model_type != ModelType.encoder_or_decoder:
            raise ModelTypeError(f"pretrain supports ModelType.encoder_or_decoder models only, not {model_type}")
        _pretrain(
            train_valid_test_dataset_provider,
            model_provider,
            forward_step_func,
            process_non_loss_data_func,
            extra_args_provider,
            args_defaults,
            args_list,
            get_embedding_ranks,
            get_position_embedding_ranks,
        )
    except UserError as error:
        print_error(str(error))
        sys.exit(1)
    finally:
        _shut_down()


def _shut_down():
    """Flush the writers, restore signal handlers, leave the process groups."""
    destroy_global_vars()
    if dist.is_available() and dist.is_initialized():
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _pretrain(
    train_valid_test_dataset_provider,
    model_provider,
    forward_step_func,
    process_non_loss_data_func,
    extra_args_provider,
    args_defaults,
    args_list,
    get_embedding_ranks,
    get_position_embedding_ranks,
):
    initialize_megatron(
        extra_args_provider,
        args_defaults,
        args_list=args_list,
        get_embedding_ranks=get_embedding_ranks,
        get_position_embedding_ranks=get_position_embedding_ranks,
    )
    args = get_args()
    _agree_on_start_time(args)
    print_args(args)
    print_datetime("after megatron is initialized")
    build_logging_writers(args)

    update_train_iters(args)
    model, optimizer, opt_param_scheduler = setup_model_and_optimizer(model_provider)
    print_datetime("after model, optimizer, and learning rate scheduler are built")

    train_iterator, valid_iterator, test_iterator = build_train_valid_test_data_iterators(
        train_valid_test_dataset_provider
    )
    print_datetime("after dataloaders are built")

    iteration = args.iteration
    exited_early = False
    if not args.skip_train and args.train_iters > 0:
        print_rank_0("training ...")
        iteration, exited_early = train(
            forward_step_func, model, optimizer, opt_param_scheduler, train_iterator, valid_iterator,
            process_non_loss_data_func,
        )
        print_datetime("after training is done")
        if args.save and iteration != 0 and iteration != args.last_saved_iteration:
            save_checkpoint(iteration, model, optimizer, opt_param_scheduler, args.num_floating_point_operations_so_far)
        maybe_finalize_async_save(blocking=True)
    if exited_early:
        return
    if valid_iterator is not None and args.eval_iters > 0:
        evaluate_and_print_results(
            f"iteration {iteration} on validation set", forward_step_func, valid_iterator, model, iteration,
            process_non_loss_data_func,
        )
    if test_iterator is not None and args.eval_iters > 0:
        evaluate_and_print_results(
            f"iteration {iteration} on test set", forward_step_func, test_iterator, model, iteration,
            process_non_loss_data_func,
        )


def _agree_on_start_time(args):
    """All ranks measure --exit-duration-in-mins from the earliest start."""
    global _TRAIN_START_TIME
    start = torch.tensor([_TRAIN_START_TIME], dtype=torch.float64, device=_device(args))
    dist.all_reduce(start, op=dist.ReduceOp.MIN)
    _TRAIN_START_TIME = start.item()


def _device(args) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")


def update_train_iters(args):
    """Turn --train-samples into an iteration count (stepping through a batch-size ramp-up if any)."""
    if args.train_samples is None:
        return
    if args.rampup_batch_size is None:
        args.train_iters = args.train_samples // args.global_batch_size
        return
    iterations, consumed = 0, 0
    ramp_samples = args.rampup_batch_size[2]
    while consumed <= ramp_samples and consumed <= args.train_samples:
        update_num_microbatches(consumed, consistency_check=False)
        consumed += get_current_global_batch_size()
        iterations += 1
    update_num_microbatches(0, consistency_check=False)
    iterations += (args.train_samples - consumed) // args.global_batch_size
    args.train_iters = iterations
    print_rank_0(f"setting training iterations to {args.train_iters}")


def _build_model_chunks(model_provider_func, args) -> list:
    """This rank's model chunks: one, or one per virtual pipeline stage (each with its own layers).

    With --use-cpu-initialization every rank builds from --seed itself (not its per-stage seed), so
    each weight equals the unsplit model's at any pipeline layout.
    """
    virtual_size = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    stages = range(virtual_size) if virtual_size is not None else [None]
    # Megatron-LM's providers take (pre_process, post_process) and read the virtual stage from parallel_state.
    takes_vp_stage = "vp_stage" in inspect.signature(model_provider_func).parameters
    chunks = []
    with torch.random.fork_rng(devices=[], enabled=bool(args.use_cpu_initialization)):
        if args.use_cpu_initialization:
            torch.manual_seed(args.seed)
        for stage in stages:
            if stage is not None:
                parallel_state.set_virtual_pipeline_model_parallel_rank(stage)
            chunks.append(
                model_provider_func(
                    pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                    post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                    **({"vp_stage": stage} if stage is not None and takes_vp_stage else {}),
                )
            )
    if virtual_size is not None:
        parallel_state.set_virtual_pipeline_model_parallel_rank(0)
    return chunks


def get_model(model_provider_func):
    """This rank's model chunks: built, cast to the training dtype, moved to the device, wrapped in DDP."""
    args = get_args()
    return [_prepare_model_chunk(model, args) for model in _build_model_chunks(model_provider_func, args)]


def _prepare_model_chunk(model, args):
    if args.fp16 or args.bf16:
        for param in model.parameters():
            param.data = param.data.to(args.params_dtype)
    model.to(_device(args))
    if parallel_state.get_data_parallel_rank() == 0:
        print_line(
            f" > number of parameters on (tensor, pipeline) model parallel rank "
            f"({parallel_state.get_tensor_model_parallel_rank()}, {parallel_state.get_pipeline_model_parallel_rank()}): "
            f"{sum(param.numel() for param in model.parameters())}"
        )
    wrapped = DistributedDataParallel(model.config, ddp_config_from_args(args), model)
    if args.data_parallel_random_init:
        wrapped.broadcast_params()
    return wrapped


def get_optimizer_param_scheduler(optimizer):
    """The lr / weight-decay schedule, in samples (iteration flags are multiplied by the global batch)."""
    args = get_args()
    if args.train_samples is None:
        if args.lr_decay_iters is None:
            args.lr_decay_iters = args.train_iters
        lr_decay_steps = args.lr_decay_iters * args.global_batch_size
        wd_incr_steps = args.train_iters * args.global_batch_size
        wsd_decay_steps = args.lr_wsd_decay_iters * args.global_batch_size if args.lr_wsd_decay_iters else None
        warmup_steps = args.lr_warmup_iters * args.global_batch_size
    else:
        if args.lr_decay_samples is None:
            args.lr_decay_samples = args.train_samples
        lr_decay_steps = args.lr_decay_samples
        wd_incr_steps = args.train_samples
        wsd_decay_steps = args.lr_wsd_decay_samples
        warmup_steps = args.lr_warmup_samples
    if args.lr_warmup_fraction is not None:
        warmup_steps = args.lr_warmup_fraction * lr_decay_steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=args.lr_warmup_init,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=max(lr_decay_steps, 1),
        lr_decay_style=args.lr_decay_style,
        start_wd=args.start_weight_decay,
        end_wd=args.end_weight_decay,
        wd_incr_steps=max(wd_incr_steps, 1),
        wd_incr_style=args.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        wsd_decay_steps=wsd_decay_steps,
        lr_wsd_decay_style=args.lr_wsd_decay_style,
    )


def setup_model_and_optimizer(model_provider_func):
    """Model chunks, optimizer and schedule, with the checkpoint under --load applied."""
    args = get_args()
    model = get_model(model_provider_func)
    optimizer = get_megatron_optimizer(optimizer_config_from_args(args), model)
    opt_param_scheduler = get_optimizer_param_scheduler(optimizer)
    args.iteration, args.num_floating_point_operations_so_far = 0, 0
    if args.load is not None:
        args.iteration, args.num_floating_point_operations_so_far = load_checkpoint(
            model, optimizer, opt_param_scheduler
        )
    args.last_saved_iteration = args.iteration if args.load == args.save else None
    config = unwrap_model(model[0]).config
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = model[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.timers = get_timers()
    return model, optimizer, opt_param_scheduler


@contextlib.contextmanager
def _rng_neutral():
    """Run a block without moving any global random generator.

    Creating a DataLoader iterator draws a seed from torch's generator; doing that between restoring a
    checkpoint's RNG state and the first step would make a resumed run diverge from an uninterrupted one.
    """
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)


def build_train_valid_test_data_iterators(train_valid_test_dataset_provider):
    """Iterators over the three splits; training and validation continue from the consumed samples."""
    from megatron.training.datasets.data_samplers import build_pretraining_data_loader
    from megatron.training.datasets.utils import get_train_valid_test_num_samples

    args = get_args()
    num_samples = get_train_valid_test_num_samples(args)
    print_rank_0(" > datasets target sizes (minimum size):")
    for name, count in zip(("train", "validation", "test"), num_samples):
        print_rank_0(f"    {name + ':':<12}{count}")
    with _rng_neutral():
        # Megatron-LM: a provider without `is_distributed` builds on tensor-parallel rank 0 only.
        if getattr(train_valid_test_dataset_provider, "is_distributed", False) or (
            parallel_state.get_tensor_model_parallel_rank() == 0
        ):
            train_ds, valid_ds, test_ds = train_valid_test_dataset_provider(num_samples)
        else:
            train_ds = valid_ds = test_ds = None
        train_loader = build_pretraining_data_loader(train_ds, args.consumed_train_samples, args)
        valid_loader = build_pretraining_data_loader(valid_ds, args.consumed_valid_samples, args)
        test_loader = build_pretraining_data_loader(test_ds, 0, args)
        iterators = tuple(iter(loader) if loader is not None else None for loader in (train_loader, valid_loader, test_loader))
    return iterators


def _reduce_losses(losses_reduced):
    """{name: mean over the step's micro batches and data-parallel ranks} from the per-micro-batch reports.

    A report value is [sum, count] (a tensor of two, or Megatron's (sum, count) tuple: averaged as
    sum / count) or an already averaged scalar.
    """
    if not losses_reduced:
        return {}
    reduced = {}
    for key in losses_reduced[0]:
        values = torch.vstack([_report_tensor(report[key]) for report in losses_reduced]).sum(dim=0)
        if values.numel() == 1:
            values = torch.cat([values, torch.tensor([float(len(losses_reduced))], device=values.device)])
        dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
        reduced[key] = (values[0] / values[1].clamp(min=1)).item()
    return reduced


def _report_tensor(value) -> torch.Tensor:
    """A report value as a flat float tensor ([sum, count] or [mean])."""
    if isinstance(value, (tuple, list)):
        return torch.stack([torch.as_tensor(item).detach().float().reshape(()) for item in value])
    return torch.as_tensor(value).detach().float().view(-1)


def _check_finite(name: str, value, iteration: int):
    if value is not None and not math.isfinite(value):
        raise TrainingError(
            f"{name} is {value} at iteration {iteration}; lower --lr, use --clip-grad, check the data, or pass "
            "--no-check-for-nan-in-loss-and-grad to continue past it"
        )


def train_step(forward_step_func, data_iterator, model, optimizer, opt_param_scheduler, iteration):
    """One optimizer step over a global batch; returns (losses, skipped, grad_norm, num_zeros_in_grad)."""
    args = get_args()
    for model_chunk in model:
        model_chunk.zero_grad_buffer()
    optimizer.zero_grad()
    forward_backward_func = get_forward_backward_func()
    losses_reduced = forward_backward_func(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=model,
        num_microbatches=get_num_microbatches(),
        seq_length=getattr(args, "seq_length", None),
        micro_batch_size=args.micro_batch_size,
        forward_only=False,
    )
    loss_dict = _reduce_losses(losses_reduced) if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else {}
    moe_losses = moe_aux_loss_report(
        model[0].config, get_num_microbatches(), get_tensorboard_writer(), iteration, args.moe_per_layer_logging
    )
    moe_losses.update(mtp_loss_report(model[0].config, get_num_microbatches()))
    if loss_dict:
        loss_dict.update(moe_losses)
    update_successful, grad_norm, num_zeros_in_grad = optimizer.step()
    # Checked after the step, whose collectives every rank must join; a bad step is never saved.
    if args.check_for_nan_in_loss_and_grad:
        for name, value in loss_dict.items():
            _check_finite(name, value, iteration)
        _check_finite("the gradient norm", grad_norm, iteration)
    if update_successful:
        opt_param_scheduler.step(increment=get_num_microbatches() * args.micro_batch_size * args.data_parallel_size)
    if args.empty_unused_memory_level >= 1 and args.device == "cuda":
        torch.cuda.empty_cache()
    return loss_dict, int(not update_successful), grad_norm, num_zeros_in_grad


def _save(iteration, model, optimizer, opt_param_scheduler):
    args = get_args()
    save_checkpoint(iteration, model, optimizer, opt_param_scheduler, args.num_floating_point_operations_so_far)
    args.last_saved_iteration = iteration


def checkpoint_and_decide_exit(model, optimizer, opt_param_scheduler, iteration) -> bool:
    """Save when due, and decide whether to stop now (signal, duration, exit interval); saves before exiting."""
    args = get_args()
    if args.exit_signal_handler and any(get_signal_handler().signals_received()):
        if args.save:
            _save(iteration, model, optimizer, opt_param_scheduler)
        print_datetime(f"exiting program after receiving a termination signal at iteration {iteration}")
        return True
    saved = False
    if args.save and args.save_interval and iteration % args.save_interval == 0:
        _save(iteration, model, optimizer, opt_param_scheduler)
        saved = True
    if args.exit_duration_in_mins:
        elapsed_minutes = torch.tensor([(time.time() - _TRAIN_START_TIME) / 60.0], device=_device(args))
        dist.all_reduce(elapsed_minutes, op=dist.ReduceOp.MAX)
        if elapsed_minutes.item() > args.exit_duration_in_mins:
            if args.save and not saved:
                _save(iteration, model, optimizer, opt_param_scheduler)
            print_datetime(f"exiting program after {elapsed_minutes.item():.2f} minutes")
            return True
    if args.exit_interval and iteration % args.exit_interval == 0:
        if args.save and not saved:
            _save(iteration, model, optimizer, opt_param_scheduler)
        print_datetime(f"exiting program at iteration {iteration}")
        return True
    return False


def train(
    forward_step_func,
    model,
    optimizer,
    opt_param_scheduler,
    train_data_iterator,
    valid_data_iterator,
    process_non_loss_data_func=None,
):
    """Steps from args.iteration to --train-iters; returns (last iteration, whether an exit condition stopped it)."""
    args = get_args()
    for model_chunk in model:
        model_chunk.train()
    iteration = args.iteration
    logger = TrainingLogger(args)
    while iteration < args.train_iters:
        update_num_microbatches(args.consumed_train_samples, consistency_check=True)
        loss_dict, skipped_iter, grad_norm, num_zeros_in_grad = train_step(
            forward_step_func, train_data_iterator, model, optimizer, opt_param_scheduler, iteration + 1
        )
        iteration += 1
        batch_size = args.micro_batch_size * args.data_parallel_size * get_num_microbatches()
        args.consumed_train_samples += batch_size
        args.num_floating_point_operations_so_far += num_floating_point_operations(args, batch_size)
        if args.log_params_norm:
            optimizer.finish_param_sync()  # the norm reads the weights an overlapped gather may still hold back
        logger.log_iteration(
            iteration=iteration,
            loss_dict=loss_dict,
            learning_rate=opt_param_scheduler.get_lr(optimizer.param_groups[0]),
            loss_scale=optimizer.get_loss_scale(),
            skipped_iter=skipped_iter,
            grad_norm=grad_norm,
            num_zeros_in_grad=num_zeros_in_grad,
            batch_size=batch_size,
            model=model,
        )
        with logger.paused():
            if valid_data_iterator is not None and args.eval_iters > 0 and iteration % args.eval_interval == 0:
                evaluate_and_print_results(
                    f"iteration {iteration}", forward_step_func, valid_data_iterator, model, iteration,
                    process_non_loss_data_func,
                )
            if checkpoint_and_decide_exit(model, optimizer, opt_param_scheduler, iteration):
                maybe_finalize_async_save(blocking=True)
                return iteration, True
            maybe_finalize_async_save(blocking=False)
    return iteration, False


def evaluate(forward_step_func, data_iterator, model, process_non_loss_data_func=None):
    """(mean of each reported loss over --eval-iters global batches, without gradients; with
    `process_non_loss_data_func`, the last rank's collected non-loss data of one more pass, else None)."""
    args = get_args()
    for model_chunk in model:
        model_chunk.eval()
    eval_num_microbatches = args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)
    sums = {}
    forward_backward_func = get_forward_backward_func()
    with torch.no_grad():
        for _ in range(args.eval_iters):
            reports = forward_backward_func(
                forward_step_func=forward_step_func,
                data_iterator=data_iterator,
                model=model,
                num_microbatches=eval_num_microbatches,
                seq_length=getattr(args, "seq_length", None),
                micro_batch_size=args.micro_batch_size,
                forward_only=True,
            )
            args.consumed_valid_samples += args.global_batch_size
            if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
                for key, value in _reduce_losses(reports).items():
                    sums[key] = sums.get(key, 0.0) + value
        collected_non_loss_data = None
        if process_non_loss_data_func is not None and is_last_rank():
            collected_non_loss_data = forward_backward_func(
                forward_step_func=forward_step_func,
                data_iterator=data_iterator,
                model=model,
                num_microbatches=eval_num_microbatches,
                seq_length=getattr(args, "seq_length", None),
                micro_batch_size=args.micro_batch_size,
                forward_only=True,
                collect_non_loss_data=True,
            )
    for model_chunk in model:
        model_chunk.train()
    return {key: total / args.eval_iters for key, total in sums.items()}, collected_non_loss_data


def evaluate_and_print_results(prefix, forward_step_func, data_iterator, model, iteration, process_non_loss_data_func=None):
    """Megatron-LM's framed validation line (loss and perplexity), also sent to TensorBoard / wandb."""
    losses, collected_non_loss_data = evaluate(forward_step_func, data_iterator, model, process_non_loss_data_func)
    writer, wandb_writer = get_tensorboard_writer(), get_wandb_writer()
    if collected_non_loss_data is not None:
        process_non_loss_data_func(collected_non_loss_data, iteration, writer)
    line = f" validation loss at {prefix} | "
    for key, value in losses.items():
        perplexity = math.exp(min(20.0, value))
        line += f"{key} value: {value:.6E} | {key} PPL: {perplexity:.6E} | "
        if writer is not None:
            writer.add_scalar(f"{key} validation", value, iteration)
            writer.add_scalar(f"{key} validation ppl", perplexity, iteration)
        if wandb_writer is not None:
            wandb_writer.log({f"{key} validation": value, f"{key} validation ppl": perplexity}, iteration)
    rule = "-" * (len(line) + 1)
    print_rank_last(f"{rule}\n{line}\n{rule}")
    return losses
