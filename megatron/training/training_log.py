"""Training logs: Megatron-LM's per-interval line (so existing log parsers work), TensorBoard and wandb.

One line per --log-interval iterations, e.g.
 iteration       10/     100 | consumed samples:          320 | elapsed time per iteration (ms): 123.4 |
 throughput per GPU (TFLOP/s/GPU): 1.23 | throughput (tokens/s): 6640.2 | MFU: 0.61% | learning rate:
 3.000000E-04 | global batch size:    32 | lm loss: 7.123456E+00 | loss scale: 1.0 | grad norm: 1.234 |
 number of skipped iterations:   0 | number of nan iterations:   0 |
(on one line; MFU only where the device's peak is known).
"""

import contextlib
import math
import time

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.training.arguments import ArgumentsError
from megatron.training.flops import num_floating_point_operations
from megatron.training.global_vars import get_tensorboard_writer, get_wandb_writer, set_logging_writers
from megatron.training.utils import (
    calc_params_l2_norm,
    device_peak_tflops,
    is_last_rank,
    peak_memory_gib,
    print_rank_0,
    print_rank_last,
    report_memory,
)


def format_tflops(tflops: float) -> str:
    """Megatron's one decimal from 10 TFLOP/s up, three significant digits below, so a CPU run never shows 0.0."""
    if tflops >= 10.0 or tflops <= 0.0 or not math.isfinite(tflops):
        return f"{tflops:.1f}"
    decimals = max(1, 2 - math.floor(math.log10(tflops)))
    return f"{tflops:.{decimals}f}"


def print_args(args) -> None:
    """Every argument, one per line, as Megatron-LM prints them at start-up."""
    lines = ["------------------------ arguments ------------------------"]
    for name in sorted(vars(args)):
        lines.append(f"  {name} {'.' * (48 - len(name))} {getattr(args, name)}")
    lines.append("-------------------- end of arguments ---------------------")
    print_rank_0("\n".join(lines))


def build_logging_writers(args) -> None:
    """TensorBoard (--tensorboard-dir) and wandb (--wandb-project, when installed) on the logging rank."""
    tensorboard_writer = wandb_writer = None
    if args.tensorboard_dir and is_last_rank():
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ArgumentsError(
                "--tensorboard-dir needs the tensorboard package: pip install tensorboard"
            ) from None
        tensorboard_writer = SummaryWriter(log_dir=args.tensorboard_dir, max_queue=args.tensorboard_queue_size)
        print_rank_last(f"> TensorBoard events go to {args.tensorboard_dir}")
    if args.wandb_project and is_last_rank():
        try:
            import wandb
        except ImportError:
            print_rank_last("WARNING: --wandb-project is set but wandb is not installed; not logging to wandb")
        else:
            wandb.init(
                project=args.wandb_project,
                name=args.wandb_exp_name or None,
                dir=args.wandb_save_dir or args.save or None,
                config={name: str(value) for name, value in vars(args).items()},
            )
            wandb_writer = wandb
    set_logging_writers(tensorboard_writer, wandb_writer)


class TrainingLogger:
    """Accumulates per-iteration numbers and writes them every --log-interval / --tensorboard-log-interval."""

    def __init__(self, args):
        self.args = args
        self.peak_tflops = device_peak_tflops(args)
        self.loss_sums = {}
        self.advanced_iterations = 0
        self.skipped_iterations = 0
        self.nan_iterations = 0
        self.interval_iterations = 0
        self.interval_start = self._synchronized_time()
        self.memory_reported = False

    @contextlib.contextmanager
    def paused(self):
        """Leave a block (evaluation, checkpointing) out of the iteration time."""
        start = self._synchronized_time()
        try:
            yield
        finally:
            self.interval_start += self._synchronized_time() - start

    def _synchronized_time(self) -> float:
        if self.args.device == "cuda":
            torch.cuda.synchronize()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return time.time()

    def log_iteration(
        self, iteration, loss_dict, learning_rate, loss_scale, skipped_iter, grad_norm, num_zeros_in_grad, batch_size, model
    ) -> None:
        args = self.args
        self.interval_iterations += 1
        self.skipped_iterations += skipped_iter
        if any(not math.isfinite(value) for value in loss_dict.values()):
            self.nan_iterations += 1
        elif not skipped_iter:
            self.advanced_iterations += 1
            for key, value in loss_dict.items():
                self.loss_sums[key] = self.loss_sums.get(key, 0.0) + value
        params_norm = calc_params_l2_norm(model) if args.log_params_norm else None
        if iteration % args.tensorboard_log_interval == 0:
            self._write_scalars(iteration, loss_dict, learning_rate, loss_scale, grad_norm, num_zeros_in_grad, params_norm, batch_size)
        if iteration % args.log_interval == 0:
            self._print_line(iteration, learning_rate, loss_scale, grad_norm, num_zeros_in_grad, params_norm, batch_size)

    def _write_scalars(self, iteration, loss_dict, learning_rate, loss_scale, grad_norm, num_zeros, params_norm, batch_size):
        writer, wandb_writer = get_tensorboard_writer(), get_wandb_writer()
        if writer is None and wandb_writer is None:
            return
        scalars = {"learning-rate": learning_rate, "batch-size": batch_size, "loss-scale": loss_scale, **loss_dict}
        if grad_norm is not None:
            scalars["grad-norm"] = grad_norm
        if num_zeros is not None:
            scalars["num-zeros"] = num_zeros
        if params_norm is not None:
            scalars["params-norm"] = params_norm
        if self.args.log_memory_to_tensorboard:
            scalars["mem-max-allocated-gigabytes"] = peak_memory_gib(self.args.device)
        for name, value in scalars.items():
            if writer is not None:
                writer.add_scalar(name, value, iteration)
                writer.add_scalar(f"{name} vs samples", value, self.args.consumed_train_samples)
        if wandb_writer is not None:
            wandb_writer.log(scalars, iteration)

    def _print_line(self, iteration, learning_rate, loss_scale, grad_norm, num_zeros, params_norm, batch_size):
        args = self.args
        now = self._synchronized_time()
        seconds_per_iteration = (now - self.interval_start) / self.interval_iterations
        flops = num_floating_point_operations(args, batch_size)
        tflops_per_device = flops / (seconds_per_iteration * 1e12 * args.world_size)
        tokens_per_second = batch_size * args.seq_length / seconds_per_iteration

        line = f" iteration {iteration:8d}/{args.train_iters:8d} |"
        line += f" consumed samples: {args.consumed_train_samples:12d} |"
        line += f" elapsed time per iteration (ms): {seconds_per_iteration * 1000.0:.1f} |"
        line += f" throughput per GPU (TFLOP/s/GPU): {format_tflops(tflops_per_device)} |"
        line += f" throughput (tokens/s): {tokens_per_second:.1f} |"
        if self.peak_tflops:
            line += f" MFU: {100.0 * tflops_per_device / self.peak_tflops:.2f}% |"
        line += f" learning rate: {learning_rate:.6E} |"
        line += f" global batch size: {batch_size:5d} |"
        for key, total in self.loss_sums.items():
            average = total / max(1, self.advanced_iterations)
            if average > 0.0:
                line += f" {key}: {average:.6E} |"
        line += f" loss scale: {loss_scale:.1f} |"
        if grad_norm is not None:
            line += f" grad norm: {grad_norm:.3f} |"
        if num_zeros is not None:
            line += f" num zeros: {num_zeros} |"
        if params_norm is not None:
            line += f" params norm: {params_norm:.3f} |"
        line += f" number of skipped iterations: {self.skipped_iterations:3d} |"
        line += f" number of nan iterations: {self.nan_iterations:3d} |"
        print_rank_last(line)

        writer = get_tensorboard_writer()
        if writer is not None:
            writer.add_scalar("throughput", tflops_per_device, iteration)
            writer.add_scalar("tokens-per-second", tokens_per_second, iteration)
            writer.add_scalar("iteration-time", seconds_per_iteration, iteration)
        if not self.memory_reported:
            if parallel_rank_reports_memory():
                report_memory(f"(after {iteration} iterations)", args.device)
            self.memory_reported = True
        self.loss_sums = {key: 0.0 for key in self.loss_sums}
        self.advanced_iterations = self.skipped_iterations = self.nan_iterations = 0
        self.interval_iterations = 0
        self.interval_start = self._synchronized_time()


def parallel_rank_reports_memory() -> bool:
    """The first data-parallel replica reports memory: one line per model-parallel rank."""
    return parallel_state.get_data_parallel_rank() == 0
