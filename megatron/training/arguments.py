"""Every command-line flag of the training scripts, with Megatron-LM's names and defaults.

Flags are grouped by concern, one `_add_*_args` function per group; `parse_args` assembles them.
"""

import argparse
import difflib
import importlib.util
import os
import sys
from types import SimpleNamespace

import torch
import yaml

from megatron.core.errors import UserError
from megatron.core.model_parallel_config import ConfigError
from megatron.training.model_config import core_transformer_config_from_args, get_blend_and_blend_per_split
from megatron.training.tokenizer.arguments import add_tokenizer_args


class ArgumentsError(UserError, ValueError):
    """An inconsistent or impossible combination of flags; the message says which flags and how to fix it."""


def parse_args(extra_args_provider=None, ignore_unknown_args=False, args_list=None):
    """Parse the training flags (from `args_list`, or sys.argv when None).

    `--config FILE.yaml` supplies values for any flag (keys are flag names with underscores); flags given
    on the command line win over the file. Unknown flags are an error that names the nearest known flag.
    """
    parser = build_parser(extra_args_provider)
    argv = sys.argv[1:] if args_list is None else list(args_list)
    config_file = _config_file_from(argv)
    if config_file is not None:
        parser.set_defaults(**_read_yaml_config(parser, config_file))
    yaml_cfg = _config_file_from(argv, "--yaml-cfg")
    yaml_sections = {}
    if yaml_cfg is not None:
        yaml_defaults, yaml_sections = _read_yaml_cfg_sections(parser, yaml_cfg)
        parser.set_defaults(**yaml_defaults)
    args, unknown = parser.parse_known_args(argv)
    if unknown and not ignore_unknown_args:
        parser.error(_describe_unknown_flags(parser, unknown))
    for name, section in yaml_sections.items():
        setattr(args, name, SimpleNamespace(**section))
    return args


def build_parser(extra_args_provider=None):
    """The parser with every flag group; `extra_args_provider(parser)` may add a script's own flags."""
    parser = _ArgumentParser(description="Megatron-style arguments", allow_abbrev=False)
    parser.add_argument(
        "--config",
        type=str,
        default=None,
        help="YAML file of flag values (keys are flag names with underscores); the command line wins.",
    )
    for add_group in ARGUMENT_GROUPS:
        parser = add_group(parser)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    return parser


class _ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line: the usage of hundreds of flags would bury the message."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help for every flag)\n")


def _config_file_from(argv, flag="--config"):
    """The path `flag` names in argv, read before the full parse so the file can supply defaults."""
    pre_parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre_parser.add_argument(flag, type=str, default=None, dest="path")
    known, _ = pre_parser.parse_known_args(argv)
    return known.path


def _actions_by_config_key(parser):
    """Each flag's action under every name a config file may use: its dest and its option names."""
    actions = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "config"):
            continue
        actions[action.dest] = action
        for option in action.option_strings:
            actions[option.lstrip("-").replace("-", "_")] = action
    return actions


def _read_yaml_config(parser, path):
    """{dest: value} from a YAML file of flags, each value converted and checked as the flag would be."""
    try:
        with open(path) as config_file:
            config = yaml.safe_load(config_file)
    except OSError as error:
        parser.error(f"--config {path}: cannot read the file ({error.strerror})")
    except yaml.YAMLError as error:
        parser.error(f"--config {path} is not valid YAML: {error}")
    if config is None:
        return {}
    if not isinstance(config, dict):
        parser.error(f"--config {path} must be a mapping of flag names to values, not a {type(config).__name__}")
    actions = _actions_by_config_key(parser)
    defaults = {}
    for key, value in config.items():
        normalized = str(key).replace("-", "_")
        action = actions.get(normalized)
        if action is None:
            nearest = difflib.get_close_matches(normalized, list(actions), n=1)
            hint = f" (did you mean {nearest[0]!r}?)" if nearest else ""
            parser.error(f"--config {path}: unknown key {key!r}{hint}")
        try:
            defaults[action.dest] = _config_value(action, normalized, value)
        except (TypeError, ValueError) as error:
            parser.error(f"--config {path}: bad value {value!r} for {key!r}: {error}")
    return defaults


def _read_yaml_cfg_sections(parser, path):
    """Megatron-LM's experimental --yaml-cfg file: mappings by section (language_model, model_parallel, ...).

    Returns ({dest: value} for every key that names one of our flags: it sets that flag, the command line
    winning; {section: its whole mapping}, kept as args.<section> for core_transformer_config_from_yaml,
    which also reads the TransformerConfig fields that are not flags here).
    """
    try:
        with open(path) as config_file:
            config = yaml.safe_load(config_file) or {}
    except OSError as error:
        parser.error(f"--yaml-cfg {path}: cannot read the file ({error.strerror})")
    except yaml.YAMLError as error:
        parser.error(f"--yaml-cfg {path} is not valid YAML: {error}")
    if not isinstance(config, dict):
        parser.error(f"--yaml-cfg {path} must be a mapping of sections, not a {type(config).__name__}")
    actions = _actions_by_config_key(parser)
    sections = {name: value for name, value in config.items() if isinstance(value, dict)}
    settings = {key: value for key, value in config.items() if key not in sections}
    for section in sections.values():
        settings.update(section)
    defaults = {}
    for key, value in settings.items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None or value is None:
            continue
        try:
            defaults[action.dest] = _config_value(action, str(key), value)
        except (TypeError, ValueError) as error:
            parser.error(f"--yaml-cfg {path}: bad value {value!r} for {key!r}: {error}")
    return defaults, sections


def _config_value(action, key, value):
    """A YAML value as the flag's action would have stored it."""
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        if key == action.dest:
            return value
        return action.const if value else action.default
    if value is None:
        return None
    many = action.nargs in ("*", "+") or isinstance(action.nargs, int)
    values = [_typed_config_item(action, item) for item in (value if isinstance(value, list) else [value])]
    if action.choices is not None:
        for item in values:
            if item not in action.choices:
                raise ValueError(f"choose from {', '.join(map(str, action.choices))}")
    if many:
        return values
    if len(values) != 1:
        raise ValueError("expected a single value, not a list")
    return values[0]


def _typed_config_item(action, item):
    """One YAML item converted by the flag's type, refusing what int()/float() would silently coerce:
    true/false for a number (int(True) == 1) and a fraction for an integer (int(2.7) == 2)."""
    if action.type in (int, float) and isinstance(item, bool):
        raise ValueError(f"expected {'an integer' if action.type is int else 'a number'}, not true/false")
    if action.type is int and isinstance(item, float):
        raise ValueError("expected an integer")
    return action.type(item) if action.type is not None else item


def _describe_unknown_flags(parser, unknown):
    """One message naming every unknown flag and, where one is close, the known flag it resembles."""
    known_flags = [option for action in parser._actions for option in action.option_strings]
    problems = []
    for token in unknown:
        if not token.startswith("-"):
            if not problems:
                problems.append(f"unexpected value {token!r}")
            continue
        flag = token.split("=", 1)[0]
        nearest = difflib.get_close_matches(flag, known_flags, n=1)
        problems.append(f"unknown flag {flag}" + (f" (did you mean {nearest[0]}?)" if nearest else ""))
    return "; ".join(problems)


def validate_args(args, defaults=None):
    """Check the flags together and derive the values they imply, before any process group forms.

    `defaults` fills flags the user left unset (a script's own defaults). Every inconsistency raises one
    ArgumentsError that names the flags involved and how to fix them.
    """
    for key, value in (defaults or {}).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.rank = int(os.environ.get("RANK", "0"))
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    _check_parallel_layout(args)
    _validate_context_parallel_args(args)
    _check_batch_sizes(args)
    _check_training_length(args)
    _check_learning_rate(args)
    _check_weight_decay(args)
    _check_precision(args)
    _check_checkpointing(args)
    _check_device(args)
    _check_logging(args)
    _validate_moe_args(args)
    validate_mla_args(args)
    validate_model_args(args)
    _validate_data_args(args)
    _validate_data_parallel_args(args)
    _validate_pipeline_args(args)
    _validate_megatron_api_args(args)
    args.consumed_train_samples = 0
    args.skipped_train_samples = 0
    args.consumed_valid_samples = 0
    return args


def _require(condition, message):
    if not condition:
        raise ArgumentsError(message)


def _check_parallel_layout(args):
    _require(args.context_parallel_size >= 1, "--context-parallel-size must be at least 1")
    model_parallel_size = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    _require(
        args.tensor_model_parallel_size >= 1 and args.pipeline_model_parallel_size >= 1,
        "--tensor-model-parallel-size and --pipeline-model-parallel-size must be at least 1",
    )
    _require(
        args.world_size % model_parallel_size == 0,
        f"world size {args.world_size} is not divisible by --tensor-model-parallel-size "
        f"{args.tensor_model_parallel_size} x --pipeline-model-parallel-size {args.pipeline_model_parallel_size}; "
        "launch a multiple of their product processes",
    )
    _require(
        args.world_size % (model_parallel_size * args.context_parallel_size) == 0,
        f"world size {args.world_size} is not divisible by tensor x pipeline x --context-parallel-size "
        f"{model_parallel_size * args.context_parallel_size}; launch a multiple of that many processes",
    )
    args.data_parallel_size = args.world_size // (model_parallel_size * args.context_parallel_size)


def _check_batch_sizes(args):
    _require(
        args.micro_batch_size is not None and args.micro_batch_size > 0,
        "--micro-batch-size is required and must be positive",
    )
    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = per_step
    _require(
        args.global_batch_size > 0 and args.global_batch_size % per_step == 0,
        f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
        f"{args.micro_batch_size} x data-parallel size {args.data_parallel_size} = {per_step}; "
        f"use a multiple of {per_step}",
    )
    if args.rampup_batch_size is None:
        return
    _require(
        len(args.rampup_batch_size) == 3,
        "--rampup-batch-size takes three integers: START INCREMENT SAMPLES",
    )
    try:
        start, increment, ramp_samples = (int(value) for value in args.rampup_batch_size)
    except ValueError:
        raise ArgumentsError(
            f"--rampup-batch-size takes three integers, got {' '.join(args.rampup_batch_size)}"
        ) from None
    _require(
        0 < start <= args.global_batch_size and increment > 0 and ramp_samples >= 0,
        "--rampup-batch-size START INCREMENT SAMPLES needs 0 < START <= --global-batch-size, INCREMENT > 0 "
        "and SAMPLES >= 0",
    )
    _require(
        (args.global_batch_size - start) % increment == 0,
        f"--rampup-batch-size: --global-batch-size {args.global_batch_size} minus START {start} must be a "
        f"multiple of INCREMENT {increment}",
    )
    _require(
        start % per_step == 0 and increment % per_step == 0,
        f"--rampup-batch-size: START {start} and INCREMENT {increment} must be multiples of micro batch x "
        f"data-parallel size = {per_step}",
    )
    args.rampup_batch_size = [start, increment, ramp_samples]


def _check_training_length(args):
    _require(
        args.train_iters is None or args.train_samples is None,
        "give --train-iters or --train-samples, not both",
    )
    if args.train_iters is None and args.train_samples is None:
        _require(args.skip_train, "give the training length with --train-iters N or --train-samples N")
        args.train_iters = 0
    if args.train_iters is not None:
        _require(args.train_iters >= 0, "--train-iters must not be negative")
        for flag, value in (
            ("--lr-decay-samples", args.lr_decay_samples),
            ("--lr-wsd-decay-samples", args.lr_wsd_decay_samples),
            ("--rampup-batch-size", args.rampup_batch_size),
        ):
            _require(value is None, f"{flag} needs sample-based training (--train-samples), not --train-iters")
        _require(
            args.lr_warmup_samples == 0,
            "--lr-warmup-samples needs sample-based training (--train-samples); use --lr-warmup-iters",
        )
    else:
        _require(args.train_samples > 0, "--train-samples must be positive")
        for flag, value in (
            ("--lr-decay-iters", args.lr_decay_iters),
            ("--lr-wsd-decay-iters", args.lr_wsd_decay_iters),
        ):
            _require(value is None, f"{flag} needs iteration-based training (--train-iters), not --train-samples")
        _require(
            args.lr_warmup_iters == 0,
            "--lr-warmup-iters needs iteration-based training (--train-iters); use --lr-warmup-samples",
        )
    _require(args.log_interval > 0, "--log-interval must be positive")
    _require(args.eval_interval > 0, "--eval-interval must be positive")
    _require(args.eval_iters >= 0, "--eval-iters must not be negative")
    _require(args.exit_interval is None or args.exit_interval > 0, "--exit-interval must be positive")


def _check_learning_rate(args):
    if args.lr is None:
        _require(args.skip_train, "--lr is required for training")
        args.lr = 0.0  # evaluation only: the optimizer is built but never steps
        return
    _require(0.0 <= args.min_lr <= args.lr, f"--min-lr {args.min_lr} must lie between 0 and --lr {args.lr}")
    _require(
        0.0 <= args.lr_warmup_init <= args.lr,
        f"--lr-warmup-init {args.lr_warmup_init} must lie between 0 and --lr {args.lr}",
    )
    by_iterations = args.train_iters is not None
    unit = "iters" if by_iterations else "samples"
    decay_length = (args.lr_decay_iters or args.train_iters) if by_iterations else (args.lr_decay_samples or args.train_samples)
    warmup = args.lr_warmup_iters if by_iterations else args.lr_warmup_samples
    if args.lr_warmup_fraction is not None:
        _require(
            warmup == 0,
            f"give --lr-warmup-fraction or --lr-warmup-{unit}, not both",
        )
        _require(0.0 <= args.lr_warmup_fraction < 1.0, "--lr-warmup-fraction must lie in [0, 1)")
    if args.skip_train:
        return
    _require(
        decay_length > 0,
        f"--lr-decay-{unit} (default --train-{unit}) must be positive; to only evaluate, give --train-{unit} 0 "
        f"with --lr-decay-{unit} N, or --skip-train",
    )
    _require(
        warmup < decay_length,
        f"--lr-warmup-{unit} {warmup} is not shorter than the decay length {decay_length} "
        f"(--lr-decay-{unit}, default --train-{unit}); shorten the warmup or lengthen training",
    )
    if args.lr_decay_style == "WSD":
        wsd_length = args.lr_wsd_decay_iters if by_iterations else args.lr_wsd_decay_samples
        _require(
            wsd_length is not None and 0 < wsd_length <= decay_length,
            f"--lr-decay-style WSD needs --lr-wsd-decay-{unit} between 1 and the decay length {decay_length}",
        )


def _check_weight_decay(args):
    if args.weight_decay_incr_style == "constant":
        for flag, value in (("--start-weight-decay", args.start_weight_decay), ("--end-weight-decay", args.end_weight_decay)):
            _require(
                value is None or value == args.weight_decay,
                f"{flag} {value} differs from --weight-decay {args.weight_decay} with --weight-decay-incr-style "
                "constant; choose linear or cosine to change weight decay during training",
            )
        args.start_weight_decay = args.end_weight_decay = args.weight_decay
        return
    _require(
        args.start_weight_decay is not None and args.end_weight_decay is not None,
        f"--weight-decay-incr-style {args.weight_decay_incr_style} needs --start-weight-decay and --end-weight-decay",
    )
    _require(
        0.0 <= args.start_weight_decay <= args.end_weight_decay,
        "--start-weight-decay must be >= 0 and not above --end-weight-decay",
    )


def _check_precision(args):
    args.params_dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32
    if args.bf16:
        args.accumulate_allreduce_grads_in_fp32 = True
    _require(args.loss_scale is None or args.loss_scale > 0, "--loss-scale must be positive")
    _require(
        0 < args.min_loss_scale <= args.initial_loss_scale,
        "--min-loss-scale must be positive and not above --initial-loss-scale",
    )
    _require(args.loss_scale_window > 0, "--loss-scale-window must be positive")
    _require(args.hysteresis >= 1, "--hysteresis must be at least 1")
    _require(args.clip_grad >= 0.0, "--clip-grad must not be negative (0 disables clipping)")


def _check_checkpointing(args):
    _require(
        args.save_interval is None or args.save is not None,
        "--save-interval needs --save DIR to write the checkpoints to",
    )
    _require(args.save_interval is None or args.save_interval > 0, "--save-interval must be positive")
    for flag, value in (
        ("--ckpt-step", args.ckpt_step),
        ("--use-checkpoint-args", args.use_checkpoint_args),
        ("--exit-on-missing-checkpoint", args.exit_on_missing_checkpoint),
        ("--finetune", args.finetune),
    ):
        _require(value in (None, False) or args.load is not None, f"{flag} needs --load DIR")
    _require(args.ckpt_step is None or args.ckpt_step >= 0, "--ckpt-step must not be negative")
    _require(args.auto_resume is False or args.load is not None, "--auto-resume needs --load DIR")
    _require(
        args.keep_last_checkpoints is None or args.keep_last_checkpoints >= 1,
        "--keep-last-checkpoints must be at least 1",
    )
    _require(args.keep_last_checkpoints is None or args.save is not None, "--keep-last-checkpoints needs --save DIR")
    _require(
        not args.async_save or args.ckpt_format == "torch_dist",
        "--async-save needs --ckpt-format torch_dist (torch-format saves are synchronous)",
    )
    _require(
        not args.save_safetensors or args.ckpt_format == "torch",
        "--save-safetensors writes torch-format rank files; use --ckpt-format torch, or convert a torch_dist "
        "checkpoint with tools/checkpoint/convert.py",
    )


def _check_device(args):
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    _require(
        args.device == "cpu" or torch.cuda.is_available(),
        "--device cuda was requested but torch sees no CUDA device; use --device cpu",
    )
    if args.distributed_backend is None:
        args.distributed_backend = "nccl" if args.device == "cuda" else "gloo"
    _require(
        not (args.distributed_backend == "nccl" and args.device == "cpu"),
        "--distributed-backend nccl needs CUDA devices; use gloo with --device cpu",
    )


def _check_logging(args):
    _require(
        args.device_peak_tflops is None or args.device_peak_tflops > 0, "--device-peak-tflops must be positive"
    )
    _require(args.tensorboard_log_interval > 0, "--tensorboard-log-interval must be positive")


def _add_training_args(parser):
    """Batch sizes, iteration counts, recomputation, exits and the optimizer choice."""
    group = parser.add_argument_group(title="training")
    group.add_argument("--micro-batch-size", type=int, default=None, help="Samples per micro batch per model instance.")
    group.add_argument(
        "--global-batch-size",
        type=int,
        default=None,
        help="Samples per optimizer step across all data-parallel ranks (default: micro batch x data-parallel "
        "size); micro batches are accumulated to reach it.",
    )
    group.add_argument(
        "--rampup-batch-size",
        nargs="*",
        default=None,
        help="START INCREMENT SAMPLES: grow the global batch from START by INCREMENT, evenly over SAMPLES "
        "consumed samples (sample-based training only).",
    )
    group.add_argument(
        "--decrease-batch-size-if-needed",
        action="store_true",
        help="Shrink the global batch to a multiple of micro batch x data-parallel size instead of failing.",
    )
    group.add_argument(
        "--recompute-granularity",
        type=str,
        default=None,
        choices=["full", "selective"],
        help="Recompute activations in the backward pass: whole transformer layers (full) or only the "
        "attention core (selective).",
    )
    group.add_argument(
        "--recompute-method",
        type=str,
        default=None,
        choices=["uniform", "block"],
        help="With full granularity: uniform recomputes every chunk of --recompute-num-layers layers, "
        "block recomputes only the first --recompute-num-layers layers.",
    )
    group.add_argument(
        "--recompute-num-layers", type=int, default=None, help="Layers per recompute chunk (uniform) or recomputed layers (block)."
    )
    group.add_argument("--train-iters", type=int, default=None, help="Iterations to train (iteration-based training).")
    group.add_argument(
        "--train-samples", type=int, default=None, help="Samples to train on (sample-based training)."
    )
    group.add_argument("--log-interval", type=int, default=100, help="Iterations between log lines.")
    group.add_argument(
        "--exit-interval", type=int, default=None, help="Save (with --save) and exit when the iteration is a multiple of this."
    )
    group.add_argument(
        "--exit-duration-in-mins", type=int, default=None, help="Save (with --save) and exit after this many minutes of training."
    )
    group.add_argument(
        "--exit-signal-handler",
        action="store_true",
        help="On SIGTERM or SIGINT finish the current iteration, save (with --save) and exit with status 0.",
    )
    group.add_argument(
        "--no-check-for-nan-in-loss-and-grad",
        action="store_false",
        dest="check_for_nan_in_loss_and_grad",
        help="Do not stop when the loss or the gradient norm is NaN or infinite.",
    )
    group.add_argument("--optimizer", type=str, default="adam", choices=["adam", "sgd"], help="Optimizer.")
    group.add_argument(
        "--empty-unused-memory-level",
        type=int,
        default=0,
        choices=[0, 1, 2],
        help="Release cached accelerator memory: 1 after each step, 2 also after each evaluation.",
    )
    return parser


def _add_initialization_args(parser):
    """Seeds."""
    group = parser.add_argument_group(title="initialization")
    group.add_argument("--seed", type=int, default=1234, help="Seed of python, numpy, torch and the model-parallel RNGs.")
    group.add_argument(
        "--data-parallel-random-init",
        action="store_true",
        help="Initialise each data-parallel replica with its own seed instead of broadcasting rank 0's weights.",
    )
    return parser


def _add_learning_rate_args(parser):
    """The learning-rate schedule: warmup, decay style and length, WSD annealing."""
    group = parser.add_argument_group(title="learning rate")
    group.add_argument("--lr", type=float, default=None, help="Peak learning rate (after warmup).")
    group.add_argument(
        "--lr-decay-style",
        type=str,
        default="linear",
        choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
        help="Learning-rate decay after warmup.",
    )
    group.add_argument(
        "--lr-wsd-decay-style",
        type=str,
        default="exponential",
        choices=["exponential", "linear", "cosine", "minus_sqrt"],
        help="Shape of the final annealing phase of the WSD schedule.",
    )
    group.add_argument("--lr-decay-iters", type=int, default=None, help="Iterations to decay over (default: --train-iters).")
    group.add_argument("--lr-decay-samples", type=int, default=None, help="Samples to decay over (default: --train-samples).")
    group.add_argument("--lr-wsd-decay-iters", type=int, default=None, help="Iterations of the WSD annealing phase.")
    group.add_argument("--lr-wsd-decay-samples", type=int, default=None, help="Samples of the WSD annealing phase.")
    group.add_argument(
        "--lr-warmup-fraction", type=float, default=None, help="Warmup length as a fraction of the decay length."
    )
    group.add_argument("--lr-warmup-iters", type=int, default=0, help="Iterations of linear warmup.")
    group.add_argument("--lr-warmup-samples", type=int, default=0, help="Samples of linear warmup.")
    group.add_argument("--lr-warmup-init", type=float, default=0.0, help="Learning rate at the start of warmup.")
    group.add_argument("--min-lr", type=float, default=0.0, help="Floor of the decayed learning rate.")
    group.add_argument(
        "--override-opt_param-scheduler",
        "--override-opt-param-scheduler",
        action="store_true",
        dest="override_opt_param_scheduler",
        help="Use the schedule given by the flags and ignore the one stored in the checkpoint.",
    )
    group.add_argument(
        "--use-checkpoint-opt_param-scheduler",
        "--use-checkpoint-opt-param-scheduler",
        action="store_true",
        dest="use_checkpoint_opt_param_scheduler",
        help="Take the schedule (lr, warmup, decay) from the checkpoint instead of the flags.",
    )
    return parser


def _add_regularization_args(parser):
    """Weight decay and its schedule, gradient clipping, Adam and SGD hyper-parameters."""
    group = parser.add_argument_group(title="regularization")
    group.add_argument("--weight-decay", type=float, default=0.01, help="Decoupled weight decay (not applied to biases and norm weights).")
    group.add_argument("--start-weight-decay", type=float, default=None, help="Weight decay at the start of training.")
    group.add_argument("--end-weight-decay", type=float, default=None, help="Weight decay at the end of training.")
    group.add_argument(
        "--weight-decay-incr-style",
        type=str,
        default="constant",
        choices=["constant", "linear", "cosine"],
        help="How weight decay moves from --start-weight-decay to --end-weight-decay.",
    )
    group.add_argument("--clip-grad", type=float, default=1.0, help="Clip the global L2 gradient norm to this (0 disables).")
    group.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1.")
    group.add_argument("--adam-beta2", type=float, default=0.999, help="Adam beta2.")
    group.add_argument("--adam-eps", type=float, default=1e-08, help="Adam epsilon.")
    group.add_argument("--sgd-momentum", type=float, default=0.9, help="SGD momentum.")
    return parser


def _add_checkpointing_args(parser):
    """Where and when to save, what to load and what to skip."""
    group = parser.add_argument_group(title="checkpointing")
    group.add_argument("--save", type=str, default=None, help="Directory to save checkpoints to.")
    group.add_argument("--save-interval", type=int, default=None, help="Iterations between checkpoint saves.")
    group.add_argument("--no-save-optim", action="store_true", default=None, help="Do not save the optimizer state.")
    group.add_argument("--no-save-rng", action="store_true", default=None, help="Do not save the RNG states.")
    group.add_argument("--load", type=str, default=None, help="Directory to load a checkpoint from.")
    group.add_argument("--no-load-optim", action="store_true", default=None, help="Do not load the optimizer state.")
    group.add_argument("--no-load-rng", action="store_true", default=None, help="Do not load the RNG states.")
    group.add_argument(
        "--finetune",
        action="store_true",
        help="Load the model weights only and start at iteration 0 (no optimizer, RNG or iteration).",
    )
    group.add_argument(
        "--use-checkpoint-args",
        action="store_true",
        help="Take the model-shaping flags (layers, sizes, ...) from the checkpoint being loaded.",
    )
    group.add_argument(
        "--exit-on-missing-checkpoint",
        action="store_true",
        help="Fail when --load holds no checkpoint instead of starting from random weights.",
    )
    group.add_argument("--ckpt-step", type=int, default=None, help="Load this iteration instead of the latest.")
    group.add_argument(
        "--ckpt-format",
        type=str,
        default="torch",
        choices=["torch", "torch_dist"],
        help="Checkpoint format to save and load: torch (one model_optim_rng.pt per model-parallel rank) or "
        "torch_dist (Megatron's distributed format: global tensors that load at any parallel layout).",
    )
    group.add_argument(
        "--auto-detect-ckpt-format",
        action="store_true",
        help="Load whichever format --load holds (torch_dist is recognised by its metadata.json).",
    )
    group.add_argument(
        "--async-save",
        action="store_true",
        help="torch_dist: write checkpoints in the background while training continues; a checkpoint becomes "
        "the latest once every rank's files are complete.",
    )
    group.add_argument(
        "--ckpt-fully-parallel-save",
        action="store_true",
        default=True,
        help="torch_dist: every rank writes a share of the replicated tensors (always on; accepted for Megatron-LM).",
    )
    group.add_argument(
        "--no-ckpt-fully-parallel-save",
        action="store_false",
        dest="ckpt_fully_parallel_save",
        help="Accepted for Megatron-LM; torch_dist saves stay fully parallel.",
    )
    group.add_argument(
        "--save-safetensors",
        action="store_true",
        help="Also write each rank's model weights as model.safetensors beside model_optim_rng.pt.",
    )
    group.add_argument(
        "--override-checkpoint-args",
        action="store_true",
        help="Load a checkpoint even though model flags that change its maths (norms, rope, residuals) differ.",
    )
    group.add_argument(
        "--no-verify-checkpoint",
        action="store_false",
        dest="verify_checkpoint",
        help="Do not compare the loaded files with the sizes and CRC-32s in their checkpoint_manifest.json.",
    )
    group.add_argument(
        "--auto-resume",
        action="store_true",
        help="When the latest checkpoint under --load is damaged or incomplete, resume from the newest healthy one.",
    )
    group.add_argument(
        "--keep-last-checkpoints",
        type=int,
        default=None,
        help="Keep only the N newest iterations under --save; older ones are deleted after a newer save completes.",
    )
    return parser


def _add_mixed_precision_args(parser):
    """fp16 / bf16 training with fp32 master weights and loss scaling."""
    group = parser.add_argument_group(title="mixed precision")
    group.add_argument("--fp16", action="store_true", help="Train in float16 with dynamic loss scaling and fp32 master weights.")
    group.add_argument("--bf16", action="store_true", help="Train in bfloat16 with fp32 master weights.")
    group.add_argument("--loss-scale", type=float, default=None, help="A fixed fp16 loss scale (default: dynamic scaling).")
    group.add_argument("--initial-loss-scale", type=float, default=2**32, help="First dynamic fp16 loss scale.")
    group.add_argument("--min-loss-scale", type=float, default=1.0, help="Smallest dynamic fp16 loss scale.")
    group.add_argument(
        "--loss-scale-window", type=float, default=1000, help="Overflow-free steps before the dynamic loss scale doubles."
    )
    group.add_argument(
        "--hysteresis", type=int, default=2, help="Overflowing steps tolerated before the dynamic loss scale halves."
    )
    group.add_argument(
        "--accumulate-allreduce-grads-in-fp32",
        action="store_true",
        help="Accumulate and all-reduce gradients in fp32 (always on with --bf16).",
    )
    return parser


def _add_distributed_args(parser):
    """Parallel layout, process-group backend and data-parallel gradient reduction."""
    group = parser.add_argument_group(title="distributed")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1, help="Tensor-parallel size.")
    group.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="Pipeline-parallel size.")
    group.add_argument(
        "--distributed-backend",
        default=None,
        choices=["nccl", "gloo"],
        help="torch.distributed backend (default: nccl on CUDA, gloo on CPU).",
    )
    group.add_argument(
        "--distributed-timeout-minutes", type=int, default=10, help="Timeout of collective operations, in minutes."
    )
    group.add_argument(
        "--device",
        type=str,
        default=None,
        choices=["cpu", "cuda"],
        help="Device to train on (default: cuda when available, else cpu).",
    )
    group.add_argument(
        "--ddp-bucket-size",
        type=int,
        default=None,
        help="Gradient elements per data-parallel all-reduce bucket (default: one bucket, or 40M elements "
        "with --overlap-grad-reduce).",
    )
    group.add_argument(
        "--overlap-grad-reduce",
        action="store_true",
        help="All-reduce each gradient bucket as soon as the backward pass fills it.",
    )
    group.add_argument(
        "--local-rank", type=int, default=None, help="Set by the launcher; torchrun passes LOCAL_RANK in the environment."
    )
    return parser


def _add_validation_args(parser):
    """Periodic evaluation on the validation split."""
    group = parser.add_argument_group(title="validation")
    group.add_argument("--eval-iters", type=int, default=100, help="Iterations per evaluation (and of the final test).")
    group.add_argument("--eval-interval", type=int, default=1000, help="Iterations between evaluations.")
    group.add_argument("--skip-train", action="store_true", help="Skip training; only evaluate (after --load).")
    return parser


def _add_logging_args(parser):
    """Log lines, TensorBoard, Weights & Biases and throughput accounting."""
    group = parser.add_argument_group(title="logging")
    group.add_argument("--log-params-norm", action="store_true", help="Log the L2 norm of the parameters.")
    group.add_argument("--log-num-zeros-in-grad", action="store_true", help="Log the number of zero gradient entries.")
    group.add_argument(
        "--log-throughput",
        action="store_true",
        help="Accepted for compatibility: throughput (TFLOP/s, tokens/s, MFU) is always logged.",
    )
    group.add_argument(
        "--device-peak-tflops",
        type=float,
        default=None,
        help="Peak dense TFLOP/s of one device at the training dtype, for the MFU column (known GPUs are "
        "looked up by name).",
    )
    group.add_argument("--tensorboard-dir", type=str, default=None, help="Write TensorBoard events here.")
    group.add_argument("--tensorboard-log-interval", type=int, default=1, help="Iterations between TensorBoard writes.")
    group.add_argument("--tensorboard-queue-size", type=int, default=1000, help="TensorBoard events buffered before a flush.")
    group.add_argument("--log-memory-to-tensorboard", action="store_true", help="Write memory use to TensorBoard.")
    group.add_argument("--wandb-project", type=str, default="", help="Weights & Biases project (logging on when set and wandb is installed).")
    group.add_argument("--wandb-exp-name", type=str, default="", help="Weights & Biases run name.")
    group.add_argument("--wandb-save-dir", type=str, default="", help="Weights & Biases local directory.")
    return parser


def add_network_size_args(parser):
    """Model architecture (shared by both stacks): sizes, positions, norms, activations, biases."""
    group = parser.add_argument_group(title="network size")
    group.add_argument("--num-layers", type=int, default=None, help="Number of transformer layers.")
    group.add_argument("--hidden-size", type=int, default=None, help="Transformer hidden size.")
    group.add_argument(
        "--ffn-hidden-size",
        type=int,
        default=None,
        help="MLP width (default 4 x hidden size; with --swiglu 2/3 of that rounded down to a multiple of 64).",
    )
    group.add_argument("--num-attention-heads", type=int, default=None, help="Number of attention heads.")
    group.add_argument(
        "--kv-channels", type=int, default=None, help="Width of one attention head (default hidden size / heads)."
    )
    group.add_argument("--group-query-attention", action="store_true", help="Use grouped-query attention.")
    group.add_argument(
        "--num-query-groups", type=int, default=1, help="Key/value heads with --group-query-attention."
    )
    group.add_argument(
        "--max-position-embeddings",
        type=int,
        default=None,
        help="Longest sequence the position embeddings cover (default --seq-length).",
    )
    group.add_argument(
        "--position-embedding-type",
        type=str,
        default="learned_absolute",
        choices=["learned_absolute", "rope", "none"],
        help="Learned absolute positions (GPT), rotary (Llama, Qwen) or none.",
    )
    group.add_argument("--rotary-base", type=float, default=10000, help="RoPE theta.")
    group.add_argument(
        "--rotary-percent", type=float, default=1.0, help="Fraction of each head's channels that rotate."
    )
    group.add_argument(
        "--rotary-interleaved", action="store_true", help="Rotate adjacent channel pairs instead of the two halves."
    )
    group.add_argument(
        "--rotary-seq-len-interpolation-factor",
        type=int,
        default=None,
        help="Divide positions by this factor (linear RoPE interpolation).",
    )
    group.add_argument("--use-rope-scaling", action="store_true", help="Llama 3.1 RoPE frequency scaling.")
    group.add_argument("--rope-scaling-factor", type=float, default=8.0, help="Llama 3.1 RoPE scaling factor.")
    group.add_argument(
        "--rope-scaling-low-freq-factor", type=float, default=1.0, help="Llama 3.1 RoPE scaling low-frequency factor."
    )
    group.add_argument(
        "--rope-scaling-high-freq-factor", type=float, default=4.0, help="Llama 3.1 RoPE scaling high-frequency factor."
    )
    group.add_argument(
        "--rope-scaling-original-max-position-embeddings",
        type=int,
        default=8192,
        help="Llama 3.1 RoPE scaling: the context length the model was trained with before scaling.",
    )
    group.add_argument(
        "--normalization", type=str, default="LayerNorm", choices=["LayerNorm", "RMSNorm"], help="Norm type."
    )
    group.add_argument("--norm-epsilon", type=float, default=1e-5, help="Epsilon of every norm.")
    group.add_argument(
        "--apply-residual-connection-post-layernorm",
        action="store_true",
        help="Take the residual after the norm instead of before it.",
    )
    group.add_argument("--swiglu", action="store_true", help="Gated SiLU MLP (Llama) instead of GeLU.")
    group.add_argument(
        "--no-bias-gelu-fusion",
        action="store_false",
        dest="bias_gelu_fusion",
        help="Exact erf GeLU instead of the fused bias-GeLU (tanh approximation, GPT-2's gelu_new).",
    )
    group.add_argument(
        "--untie-embeddings-and-output-weights",
        action="store_true",
        help="Give the output layer its own weight instead of the word embeddings.",
    )
    group.add_argument("--qk-layernorm", action="store_true", help="Normalise queries and keys per head (Qwen3).")
    group.add_argument(
        "--disable-bias-linear",
        action="store_false",
        dest="add_bias_linear",
        help="No biases in the linear layers.",
    )
    group.add_argument(
        "--add-qkv-bias", action="store_true", help="Bias on the query/key/value projection even without others."
    )
    return parser


def add_model_regularization_args(parser):
    """Dropout and weight initialisation of the model."""
    group = parser.add_argument_group(title="model regularization and initialization")
    group.add_argument("--hidden-dropout", type=float, default=0.1, help="Dropout on the residual branches.")
    group.add_argument("--attention-dropout", type=float, default=0.1, help="Dropout on the attention probabilities.")
    group.add_argument(
        "--init-method-std", type=float, default=0.02, help="Standard deviation of the weight initialisation."
    )
    group.add_argument(
        "--use-cpu-initialization",
        action="store_true",
        default=None,
        help="Build each full weight on the CPU from the seed and keep this rank's slice (identical weights at "
        "any parallel layout).",
    )
    return parser


def add_model_stack_args(parser):
    """Which model stack and kernels build the model."""
    group = parser.add_argument_group(title="model stack")
    group.add_argument(
        "--use-legacy-models", action="store_true", help="Build the monolithic legacy model (megatron/legacy)."
    )
    group.add_argument(
        "--use-mcore-models", action="store_true", help="Build the modular megatron.core model (the default)."
    )
    group.add_argument(
        "--transformer-impl",
        type=str,
        default=None,
        choices=["local", "transformer_engine"],
        help="Layer kernels of the mcore stack (default local; transformer_engine needs that package).",
    )
    group.add_argument(
        "--use-flash-attn",
        action="store_true",
        help="Restrict attention to the flash kernel of torch's scaled_dot_product_attention.",
    )
    group.add_argument(
        "--attention-softmax-in-fp32",
        action="store_true",
        help="Compute the attention softmax in fp32 when the model runs in fp16/bf16.",
    )
    group.add_argument(
        "--fp16-lm-cross-entropy",
        action="store_true",
        help="Compute the loss from fp16/bf16 logits instead of fp32 ones.",
    )
    return parser


class ModelArgumentsError(ArgumentsError):
    """Model flags that contradict each other; the message names the flags and the fix."""


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def _swiglu_ffn_hidden_size(hidden_size: int) -> int:
    """Megatron-LM's SwiGLU width: 2/3 of 4h (two input projections keep the parameter count), rounded
    down to a multiple of 64."""
    return int((4 * hidden_size * 2 / 3) / 64) * 64


def _require_model(condition: bool, message: str) -> None:
    if not condition:
        raise ModelArgumentsError(message)


def _check_model_stack(args) -> None:
    _require_model(
        not (args.use_legacy_models and args.use_mcore_models),
        "--use-legacy-models and --use-mcore-models are mutually exclusive; choose one stack",
    )
    if args.transformer_impl == "transformer_engine":
        _require_model(
            transformer_engine_available(),
            "--transformer-impl transformer_engine needs the transformer_engine package, which is not installed; "
            "install it or use --transformer-impl local",
        )
        _require_model(
            False,
            "--transformer-impl transformer_engine: this project has no Transformer Engine layer spec yet; use "
            "--transformer-impl local (the same model on torch kernels; checkpoints convert either way)",
        )
    if args.use_flash_attn and getattr(args, "device", None) == "cpu":
        _require_model(
            args.attention_dropout == 0.0,
            "--use-flash-attn on the CPU has no kernel with attention dropout; set --attention-dropout 0",
        )


def _derive_model_flag_defaults(args) -> None:
    """Defaults that depend on other flags rather than on the model's shape (which its config derives)."""
    if args.transformer_impl is None:
        args.transformer_impl = "local"
    if args.ffn_hidden_size is None and args.swiglu and args.hidden_size:
        args.ffn_hidden_size = _swiglu_ffn_hidden_size(args.hidden_size)
    if args.max_position_embeddings is None:
        args.max_position_embeddings = getattr(args, "seq_length", None)
    if not args.add_bias_linear:
        # Megatron-LM: the fused bias-GeLU needs a bias; without biases GeLU is the exact one.
        args.bias_gelu_fusion = False


def _check_positions(args) -> None:
    seq_length = getattr(args, "seq_length", None)
    if args.position_embedding_type == "learned_absolute":
        _require_model(
            args.max_position_embeddings is not None,
            "learned absolute position embeddings need --max-position-embeddings (or --seq-length)",
        )
        _require_model(
            seq_length is None or seq_length <= args.max_position_embeddings,
            f"--seq-length {seq_length} exceeds --max-position-embeddings {args.max_position_embeddings}, "
            "which learned position embeddings cannot cover",
        )
    _require_model(0.0 < args.rotary_percent <= 1.0, f"--rotary-percent must lie in (0, 1], got {args.rotary_percent}")
    _require_model(
        not args.use_rope_scaling or args.position_embedding_type == "rope",
        "--use-rope-scaling scales rotary embeddings and needs --position-embedding-type rope",
    )


# Shape fields the TransformerConfig derives when their flag is not given; copied back so that saved
# checkpoint args, the converter and the logs see the values the model uses.
_DERIVED_SHAPE_FIELDS = ("num_query_groups", "kv_channels", "ffn_hidden_size")


def _expand_deepseek_moe_flags(args) -> None:
    """DeepSeek's --first-k-dense-replace and --n-shared-experts written as Megatron's --moe-layer-freq list and
    --moe-shared-expert-intermediate-size, for training and for the tools that only read model flags."""
    if not args.num_experts:
        return
    if args.first_k_dense_replace is not None and args.first_k_dense_replace >= 0:
        k, freq = args.first_k_dense_replace, args.moe_layer_freq
        if isinstance(freq, int):
            args.moe_layer_freq = [int(layer >= k and layer % freq == 0) for layer in range(args.num_layers)]
        else:  # a pattern already (saved args were expanded before): it must keep the first k layers dense
            _require(
                not any(freq[:k]),
                f"--first-k-dense-replace {k} makes the first {k} layers dense but --moe-layer-freq {freq} does not; "
                "give one of them",
            )
    if args.n_shared_experts is not None:
        expert_width = args.moe_ffn_hidden_size or args.ffn_hidden_size
        _require(expert_width is not None, "--n-shared-experts needs --moe-ffn-hidden-size (the width of one expert)")
        shared = args.n_shared_experts * expert_width
        _require(
            args.moe_shared_expert_intermediate_size in (None, shared),
            f"--n-shared-experts {args.n_shared_experts} gives a shared width {shared} but "
            f"--moe-shared-expert-intermediate-size is {args.moe_shared_expert_intermediate_size}; give one of them",
        )
        args.moe_shared_expert_intermediate_size = shared or None


def validate_model_args(args) -> None:
    """Complete and check the model flags in place: the flag-only rules here, every shape and range rule by
    building the TransformerConfig (which validates itself, naming the flags)."""
    _check_model_stack(args)
    _expand_deepseek_moe_flags(args)
    _derive_model_flag_defaults(args)
    validate_mtp_args(args)
    try:
        config = core_transformer_config_from_args(args)
    except ConfigError as error:  # reported as a flag error, like the rules here
        raise ModelArgumentsError(str(error)) from None
    for name in _DERIVED_SHAPE_FIELDS:
        setattr(args, name, getattr(config, name))
    _check_positions(args)


def add_data_args(parser):
    """Datasets and loaders: where the tokens are, how they blend and split, how samples are cut and read."""
    group = parser.add_argument_group(title="data and dataloader")
    group.add_argument(
        "--data-path",
        nargs="*",
        default=None,
        help="Dataset prefixes (PREFIX for PREFIX.bin/.idx), weighted by their sizes (A B), or weight/prefix "
        "pairs (0.3 A 0.7 B); --split divides each into train, valid and test.",
    )
    group.add_argument(
        "--split",
        type=str,
        default=None,
        help="Train, valid and test shares of --data-path's documents, e.g. 949,50,1 (default 969,30,1).",
    )
    group.add_argument("--train-data-path", nargs="*", default=None, help="Blend of the train split (forms as --data-path).")
    group.add_argument("--valid-data-path", nargs="*", default=None, help="Blend of the valid split (forms as --data-path).")
    group.add_argument("--test-data-path", nargs="*", default=None, help="Blend of the test split (forms as --data-path).")
    group.add_argument(
        "--data-args-path", type=str, default=None, help="File holding the --data-path tokens, for long blends."
    )
    group.add_argument(
        "--per-split-data-args-path",
        type=str,
        default=None,
        help='JSON file {"train": BLEND, "valid": BLEND, "test": BLEND}, each a list or string of --data-path tokens.',
    )
    group.add_argument(
        "--data-cache-path",
        type=str,
        default=None,
        help="Folder of the cached dataset indices (default: a cache folder beside each dataset).",
    )
    group.add_argument(
        "--no-shared-storage",
        action="store_true",
        help="Nodes do not share --data-cache-path: the first rank of each node builds its own index cache.",
    )
    group.add_argument("--mock-data", action="store_true", help="Train on synthetic data instead of files.")
    group.add_argument("--seq-length", type=int, default=None, help="Tokens per sample.")
    group.add_argument(
        "--reset-position-ids", action="store_true", help="Restart position ids after each end-of-document token."
    )
    group.add_argument(
        "--reset-attention-mask", action="store_true", help="Stop attention across end-of-document tokens."
    )
    group.add_argument("--eod-mask-loss", action="store_true", help="Leave end-of-document tokens out of the loss.")
    group.add_argument(
        "--no-create-attention-mask-in-dataloader",
        action="store_false",
        dest="create_attention_mask_in_dataloader",
        help="Leave the attention mask out of the samples (the model builds the causal mask itself).",
    )
    group.add_argument("--no-mmap-bin-files", action="store_false", dest="mmap_bin_files", help="Read .bin files without mmap.")
    group.add_argument(
        "--mid-level-dataset-surplus",
        type=float,
        default=0.005,
        help="Extra fraction of samples each blended dataset builds beyond its share.",
    )
    group.add_argument(
        "--renormalize-blend-weights",
        action="store_true",
        help="Weigh a weighted blend by the samples each dataset was built with (its share plus the surplus).",
    )
    group.add_argument(
        "--num-dataset-builder-threads", type=int, default=1, help="Threads building the datasets of a blend."
    )
    group.add_argument("--num-workers", type=int, default=2, help="Dataloader worker processes.")
    group.add_argument(
        "--dataloader-type",
        type=str,
        default="single",
        choices=["single", "cyclic"],
        help="single: one pass in the datasets' order, resumable at the consumed samples; cyclic: reshuffled "
        "passes repeated without end.",
    )
    return parser


def _validate_data_args(args):
    """One data source, well-formed blends and split, and a sequence length to cut samples by."""
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split
    from megatron.core.datasets.utils import DatasetError
    from megatron.training.datasets.utils import data_sources

    sources = data_sources(args)
    _require(len(sources) <= 1, f"give one data source, not {' and '.join(sources)}")
    divides_one_blend = args.data_path is not None or args.data_args_path is not None
    if args.split is None and divides_one_blend:
        args.split = "969, 30, 1"
    _require(
        args.split is None or divides_one_blend or args.mock_data,
        "--split divides the documents of --data-path; per-split blends (--train-data-path ...) need no --split",
    )
    try:
        if args.split is not None:
            parse_and_normalize_split(args.split)
        get_blend_and_blend_per_split(args)
    except DatasetError as error:
        raise ArgumentsError(str(error)) from None
    _require(args.seq_length is None or args.seq_length > 0, "--seq-length must be positive")
    _require(not sources or args.seq_length is not None, "give the sample length with --seq-length N")
    _require(args.num_workers >= 0, "--num-workers must not be negative")
    _require(args.num_dataset_builder_threads >= 1, "--num-dataset-builder-threads must be at least 1")
    _require(args.mid_level_dataset_surplus >= 0, "--mid-level-dataset-surplus must not be negative")


def _add_data_parallel_args(parser):
    """Sequence parallelism and the distributed optimizer (optimizer state sharded over data-parallel ranks)."""
    group = parser.add_argument_group(title="data and sequence parallelism")
    group.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="Shard norms and dropout along the sequence over the tensor-parallel ranks (needs tensor parallelism).",
    )
    group.add_argument(
        "--use-distributed-optimizer",
        action="store_true",
        help="Shard fp32 master weights and optimizer state over data-parallel ranks; gradients are "
        "reduce-scattered and updated weights all-gathered.",
    )
    group.add_argument(
        "--overlap-param-gather",
        action="store_true",
        help="Overlap the distributed optimizer's all-gather of updated weights with the next forward pass "
        "(each bucket is waited for when a module first uses one of its weights).",
    )
    return parser


def _validate_data_parallel_args(args):
    """Sequence-parallel and data-parallel optimizer flags, checked before any group forms. (Sequence
    parallel without TP and heads / query groups / FFN not divisible by TP are refused by the model config.)"""
    _require(
        not args.overlap_param_gather or args.use_distributed_optimizer,
        "--overlap-param-gather needs --use-distributed-optimizer (only the distributed optimizer gathers "
        "parameters)",
    )


def _add_pipeline_args(parser):
    """Pipeline-parallel layout: uneven first/last stages and virtual (interleaved) stages."""
    group = parser.add_argument_group(title="pipeline parallel")
    group.add_argument(
        "--decoder-first-pipeline-num-layers",
        type=int,
        default=None,
        help="Decoder layers on the first pipeline stage (the other stages split the rest evenly).",
    )
    group.add_argument(
        "--decoder-last-pipeline-num-layers",
        type=int,
        default=None,
        help="Decoder layers on the last pipeline stage (the other stages split the rest evenly).",
    )
    group.add_argument(
        "--num-layers-per-virtual-pipeline-stage",
        type=int,
        default=None,
        help="Layers per virtual pipeline stage: each stage holds several model chunks and the interleaved "
        "1F1B schedule runs them.",
    )
    return parser


def _validate_pipeline_args(args):
    """Layer split over pipeline stages, virtual stages and micro batches per step, checked before any
    process group forms. Sets args.virtual_pipeline_model_parallel_size."""
    from megatron.core.model_parallel_config import ConfigError
    from megatron.core.transformer.pipeline_layout import pipeline_stage_layer_counts

    pipeline_size = args.pipeline_model_parallel_size
    args.virtual_pipeline_model_parallel_size = None
    uneven = args.decoder_first_pipeline_num_layers is not None or args.decoder_last_pipeline_num_layers is not None
    try:
        counts = pipeline_stage_layer_counts(
            args.num_layers, pipeline_size, args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers
        )
    except ConfigError as error:
        raise ArgumentsError(f"--num-layers {args.num_layers} over --pipeline-model-parallel-size {pipeline_size}: {error}") from None
    per_virtual = args.num_layers_per_virtual_pipeline_stage
    if per_virtual is not None:
        _require(pipeline_size > 1, "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
        _require(
            not uneven,
            "--num-layers-per-virtual-pipeline-stage cannot be combined with --decoder-first/last-pipeline-num-layers; "
            "use an even split",
        )
        _require(
            per_virtual >= 1 and counts[0] % per_virtual == 0,
            f"--num-layers-per-virtual-pipeline-stage {per_virtual} must divide the {counts[0]} layers of each "
            f"pipeline stage (--num-layers {args.num_layers} / --pipeline-model-parallel-size {pipeline_size})",
        )
        if counts[0] // per_virtual > 1:
            args.virtual_pipeline_model_parallel_size = counts[0] // per_virtual
    if pipeline_size == 1:
        return
    num_microbatches = args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)
    if args.rampup_batch_size is not None:
        num_microbatches = args.rampup_batch_size[0] // (args.micro_batch_size * args.data_parallel_size)
    _require(
        num_microbatches >= pipeline_size,
        f"{num_microbatches} micro batches per step (--global-batch-size / (--micro-batch-size x data-parallel "
        f"size)) is fewer than the {pipeline_size} pipeline stages; raise --global-batch-size to at least "
        f"{pipeline_size * args.micro_batch_size * args.data_parallel_size}",
    )
    _require(
        args.virtual_pipeline_model_parallel_size is None or num_microbatches % pipeline_size == 0,
        f"the interleaved schedule needs the micro batches per step ({num_microbatches}) to be a multiple of "
        f"--pipeline-model-parallel-size {pipeline_size}; adjust --global-batch-size",
    )


def _add_megatron_api_args(parser):
    """Megatron-LM core_v0.9.0 flags that its scripts read: layer specs, yaml configs, per-token loss, the
    rank order, and the sizes of features that come later (context / expert parallelism, MoE, FP8)."""
    group = parser.add_argument_group(title="megatron api")
    group.add_argument(
        "--spec",
        type=str,
        default=None,
        nargs="*",
        help="<module> <function or attribute> returning the ModuleSpec of a transformer layer "
        "(megatron.core.transformer.spec_utils.import_module).",
    )
    group.add_argument(
        "--yaml-cfg",
        type=str,
        default=None,
        help="Megatron-LM's experimental sectioned YAML config (language_model, model_parallel, ...); keys that "
        "name flags set them (the command line wins).",
    )
    group.add_argument(
        "--calculate-per-token-loss",
        action="store_true",
        help="Average the loss over all non-padded tokens of the global batch instead of per micro batch.",
    )
    group.add_argument("--fp8", default=None, choices=["e4m3", "hybrid"], help="FP8 training format.")
    group.add_argument("--fp8-param-gather", action="store_true", help="Keep FP8 parameters for the gather.")
    group.add_argument(
        "--use-tp-pp-dp-mapping",
        action="store_true",
        help="Order ranks tp-cp-ep-pp-dp instead of tp-cp-ep-dp-pp (pipeline stages on neighbouring ranks).",
    )
    group.add_argument(
        "--nccl-communicator-config-path",
        type=str,
        default=None,
        help="YAML of NCCL options (min_ctas, max_ctas, cga_cluster_size) per process group.",
    )
    group.add_argument(
        "--timing-log-level", type=int, default=0, choices=range(0, 3), help="Highest log_level of get_timers() timers that run."
    )
    group.add_argument(
        "--timing-log-option", type=str, default="minmax", choices=["max", "minmax", "all"], help="How timers are reduced."
    )
    return parser


def _validate_megatron_api_args(args):
    """Flags accepted for Megatron's scripts whose features come with later issues: one clear error each."""
    not_yet = {
        "--fp8": args.fp8 is not None,
        "--fp8-param-gather": args.fp8_param_gather,
    }
    for flag, used in not_yet.items():
        _require(not used, f"{flag} is not supported yet; leave it at its default")


def moe_layer_freq_type(text):
    """--moe-layer-freq: an int N (a MoE layer every N layers) or a list expression of 0/1 per layer such as
    "([0]*3+[1]*58)" (Megatron's syntax), read without eval: only integers, lists, + and *."""
    try:
        return int(text)
    except ValueError:
        pass
    import ast

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.List):
            return [value(item) for item in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(text)

    try:
        pattern = value(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, TypeError):
        pattern = None
    if not isinstance(pattern, list):
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an integer nor a list expression of 0/1 such as \"([0]*1+[1]*3)\""
        )
    return pattern


def _add_moe_args(parser):
    """Mixture-of-experts flags (Megatron-LM's names; MindSpeed's --first-k-dense-replace and
    --n-shared-experts as aliases). They become TransformerConfig's moe_* fields."""
    group = parser.add_argument_group(title="moe")
    add = group.add_argument
    add("--num-experts", type=int, default=None, help="Routed experts per MoE layer (None: dense MLP).")
    add("--expert-model-parallel-size", type=int, default=1, help="Expert-parallel size (divides --num-experts).")
    add("--expert-tensor-parallel-size", type=int, default=None, help="Tensor parallelism inside experts.")
    add("--moe-ffn-hidden-size", type=int, default=None, help="Width of one routed expert (default --ffn-hidden-size).")
    add("--moe-shared-expert-intermediate-size", type=int, default=None, help="Total width of the shared experts.")
    add("--moe-shared-expert-gate", action="store_true", help="Sigmoid gate on the shared-expert output.")
    add("--moe-shared-expert-overlap", action="store_true", help="Overlap shared experts with dispatch (no effect).")
    add("--moe-layer-freq", type=moe_layer_freq_type, default=1, help='Int N or a 0/1 list such as "([0]*1+[1]*3)".')
    add("--moe-router-topk", type=int, default=2, help="Experts per token.")
    add("--moe-router-score-function", choices=["softmax", "sigmoid"], default="softmax", help="Router scores.")
    add("--moe-router-pre-softmax", action="store_true", help="Softmax over all experts before the top-k.")
    add("--moe-router-topk-scaling-factor", type=float, default=None, help="Multiply the routing weights.")
    add("--moe-router-num-groups", type=int, default=None, help="Expert groups for group-limited routing.")
    add("--moe-router-group-topk", type=int, default=None, help="Groups each token may use.")
    add("--moe-router-dtype", choices=["fp32", "fp64"], default=None, help="Router logits' dtype.")
    add("--moe-router-enable-expert-bias", action="store_true", help="Aux-loss-free expert bias (sigmoid router).")
    add("--moe-router-bias-update-rate", type=float, default=1e-3, help="Expert-bias step per global batch.")
    add("--moe-router-force-load-balancing", action="store_true", help="Benchmarks: route on random logits.")
    add(
        "--moe-router-load-balancing-type",
        nargs="+",
        choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "none"],
        default=["aux_loss"],
        help="Balancing losses (one --moe-aux-loss-coeff each).",
    )
    add("--moe-aux-loss-coeff", type=float, nargs="+", default=[0.0], help="Aux-loss coefficients.")
    add("--moe-z-loss-coeff", type=float, default=None, help="Router z-loss coefficient.")
    add("--moe-input-jitter-eps", type=float, default=None, help="Router input noise: uniform in [1-eps, 1+eps].")
    add("--moe-token-dispatcher-type", choices=["allgather", "alltoall"], default="allgather", help="Dispatcher.")
    add("--moe-grouped-gemm", action="store_true", help="All local experts in one grouped GEMM.")
    add("--moe-expert-capacity-factor", type=float, default=None, help="Capacity per expert (None: dropless).")
    add("--moe-pad-expert-input-to-capacity", action="store_true", help="Pad every expert to its capacity.")
    add("--moe-token-drop-policy", choices=["probs", "position"], default="probs", help="Which tokens to drop.")
    add("--moe-per-layer-logging", action="store_true", help="TensorBoard MoE losses per layer.")
    add("--first-k-dense-replace", type=int, default=None, help="MindSpeed: the first k layers dense (-1: none).")
    add("--n-shared-experts", type=int, default=None, help="MindSpeed: shared experts of --moe-ffn-hidden-size.")
    return parser


def _single_or_list(values):
    return values[0] if len(values) == 1 else values


def _validate_moe_args(args):
    """Flag-only MoE rules and the MindSpeed aliases; the model rules live in TransformerConfig._check_moe."""
    args.moe_router_load_balancing_type = _single_or_list(args.moe_router_load_balancing_type)
    args.moe_aux_loss_coeff = _single_or_list(args.moe_aux_loss_coeff)
    if args.num_experts is None:
        return
    _require(
        not args.use_legacy_models,
        "--num-experts needs the mcore stack: MoE layers are not built by --use-legacy-models; drop that flag",
    )
    if args.expert_tensor_parallel_size is None:
        args.expert_tensor_parallel_size = args.tensor_model_parallel_size
    etp, ep, pp = args.expert_tensor_parallel_size, args.expert_model_parallel_size, args.pipeline_model_parallel_size
    _require(etp >= 1 and ep >= 1, "--expert-tensor-parallel-size and --expert-model-parallel-size must be at least 1")
    _require(
        args.world_size % (etp * ep * pp) == 0,
        f"world size {args.world_size} is not divisible by --expert-tensor-parallel-size {etp} x "
        f"--expert-model-parallel-size {ep} x --pipeline-model-parallel-size {pp}; launch a multiple of "
        f"{etp * ep * pp} processes",
    )
    _require(
        etp in (1, args.tensor_model_parallel_size),
        f"--expert-tensor-parallel-size {etp} must be 1 or --tensor-model-parallel-size "
        f"{args.tensor_model_parallel_size}: the torch checkpoint format stores experts in the tensor-parallel "
        "rank files",
    )


# MindSpeed-LLM's --context-parallel-algo names for the algorithms of --cp-comm-type.
MINDSPEED_CP_ALGORITHMS = {"megatron_cp_algo": "p2p", "ulysses_cp_algo": "a2a", "kvallgather_cp_algo": "all_gather"}


def _add_context_parallel_args(parser):
    """Context parallelism: every sequence split over --context-parallel-size ranks (Megatron's load-balanced
    chunks), attention over the group by --cp-comm-type (MindSpeed's --context-parallel-algo as an alias)."""
    group = parser.add_argument_group(title="context parallel")
    group.add_argument("--context-parallel-size", type=int, default=1, help="Ranks that split every sequence.")
    group.add_argument(
        "--cp-comm-type",
        nargs="+",
        default=None,
        help="Context-parallel attention: p2p (ring, the default), all_gather (keys/values gathered) or a2a "
        "(Ulysses head exchange); one for all layers or one per layer.",
    )
    group.add_argument(
        "--context-parallel-algo",
        default=None,
        help="MindSpeed's name for --cp-comm-type: megatron_cp_algo (p2p), ulysses_cp_algo (a2a), "
        "kvallgather_cp_algo (all_gather).",
    )
    return parser


def add_performance_args(parser):
    """Speed and memory switches that leave the numbers unchanged (within rounding)."""
    group = parser.add_argument_group(title="performance")
    group.add_argument(
        "--no-fused-output-cross-entropy",
        action="store_false",
        dest="fused_output_cross_entropy",
        help="Compute the training loss from the full fp32 logits of each micro batch instead of from the output "
        "layer's input a chunk of tokens at a time.",
    )
    group.add_argument(
        "--torch-compile-fusions",
        action="store_true",
        help="Compile RMSNorm, the SwiGLU activation and RoPE with torch.compile into fused kernels (C++/OpenMP on "
        "CPU, which needs a C++ compiler; Triton on GPU). The first step of each new shape pays the compile time.",
    )
    group.add_argument(
        "--no-bias-swiglu-fusion",
        action="store_false",
        dest="bias_swiglu_fusion",
        help="Keep the SwiGLU activation eager under --torch-compile-fusions.",
    )
    group.add_argument(
        "--no-rope-fusion",
        action="store_false",
        dest="apply_rope_fusion",
        help="Keep RoPE eager under --torch-compile-fusions.",
    )
    group.add_argument(
        "--no-gradient-accumulation-fusion",
        action="store_false",
        dest="gradient_accumulation_fusion",
        help="Let linear layers return a fresh weight gradient that a hook adds into the main_grad buffer, instead "
        "of adding it there themselves with one addmm (the default; torch only, no apex kernel needed).",
    )
    # Megatron-LM's switches for apex / Transformer Engine kernels this project does not use: accepted so its
    # scripts run unchanged, each saying what happens here instead.
    for flag, instead in (
        ("--no-masked-softmax-fusion", "attention's softmax is always torch's scaled_dot_product_attention"),
        ("--no-bias-dropout-fusion", "bias + dropout + residual add is always the same eager code"),
        ("--no-persist-layer-norm", "norms always use torch's own LayerNorm / RMSNorm kernels"),
    ):
        group.add_argument(flag, action="store_false", dest=flag[5:].replace("-", "_"), help=f"No effect here: {instead}.")
    group.add_argument(
        "--cross-entropy-loss-fusion",
        action="store_true",
        help="No effect here: the loss is already fused with the output layer (see --no-fused-output-cross-entropy).",
    )
    return parser


def add_mla_args(parser):
    """Multi-latent attention (DeepSeek-V2/V3) and its YaRN RoPE: Megatron-LM's flags, which become
    MLATransformerConfig's fields; --original-max-position-embeddings, --beta-fast and --beta-slow (fixed
    at DeepSeek-V3's values in Megatron) are MindSpeed's settings of the YaRN ramp."""
    group = parser.add_argument_group(title="multi-latent attention")
    add = group.add_argument
    add("--multi-latent-attention", action="store_true", help="Multi-latent attention (DeepSeek-V2/V3).")
    add("--q-lora-rank", type=int, default=None, help="Width of the query latent (None: no query compression).")
    add("--kv-lora-rank", type=int, default=32, help="Width of the key/value latent.")
    add("--qk-head-dim", type=int, default=128, help="Query/key channels per head without position (no RoPE).")
    add("--qk-pos-emb-head-dim", type=int, default=64, help="Rotated query/key channels per head.")
    add("--v-head-dim", type=int, default=128, help="Value channels per head.")
    add("--rope-type", choices=["rope", "yarn"], default=None, help="MLA's RoPE (default yarn).")
    add("--rotary-scaling-factor", type=float, default=1.0, help="YaRN context stretch factor.")
    add("--mscale", type=float, default=1.0, help="YaRN mscale of cos and sin.")
    add("--mscale-all-dim", type=float, default=0.0, help="YaRN mscale_all_dim (also scales the softmax).")
    add("--original-max-position-embeddings", type=int, default=4096, help="YaRN: the context before stretching.")
    add("--beta-fast", type=float, default=32.0, help="YaRN: rotations above which channels keep their frequency.")
    add("--beta-slow", type=float, default=1.0, help="YaRN: rotations below which channels are fully interpolated.")
    return parser


def validate_mla_args(args):
    """Flag-only MLA rules; the shapes and RoPE rules live in MLATransformerConfig."""
    if not args.multi_latent_attention:
        _require(args.rope_type is None, "--rope-type sets multi-latent attention's RoPE; add --multi-latent-attention or drop it")
        return
    _require(not args.use_legacy_models, "--multi-latent-attention needs the mcore stack; drop --use-legacy-models")
    _require(
        not args.group_query_attention,
        "--multi-latent-attention and --group-query-attention are mutually exclusive; drop one",
    )


def add_mtp_args(parser):
    """Multi-token prediction (DeepSeek-V3), Megatron-LM's flags; TransformerConfig's mtp_* fields."""
    group = parser.add_argument_group(title="multi-token prediction")
    group.add_argument("--mtp-num-layers", type=int, default=None, help="Multi-token prediction depths (None: off).")
    group.add_argument(
        "--mtp-loss-scaling-factor", type=float, default=0.1, help="Weight of the depths' mean loss in the gradient."
    )
    return parser


def _validate_context_parallel_args(args):
    """Context-parallel flags, before any group forms: sets args.cp_comm_type to one name or a per-layer list."""
    args.cp_comm_type = _single_or_list(_cp_comm_types(args))
    cp = args.context_parallel_size
    if cp == 1:
        return
    _require(
        not args.use_legacy_models,
        f"--context-parallel-size {cp} needs the mcore stack (the legacy model has no context-parallel "
        "attention); drop --use-legacy-models",
    )
    splits = 2 * cp * (args.tensor_model_parallel_size if args.sequence_parallel else 1)
    _require(
        args.seq_length is not None and args.seq_length % splits == 0,
        f"--seq-length {args.seq_length} is not divisible by 2 x --context-parallel-size"
        f"{' x --tensor-model-parallel-size (sequence parallel)' if args.sequence_parallel else ''} = {splits}; "
        "choose a multiple of it",
    )
    document_resets = (("--reset-attention-mask", args.reset_attention_mask), ("--reset-position-ids", args.reset_position_ids))
    for flag, used in document_resets:
        _require(
            not used,
            f"{flag} with --context-parallel-size {cp} is not supported: context-parallel attention is causal over "
            f"whole sequences; drop {flag}",
        )
    _require(
        args.attention_dropout == 0.0,
        f"--context-parallel-size {cp}: context-parallel attention has no dropout; set --attention-dropout 0",
    )


def _cp_comm_types(args):
    """--cp-comm-type, or its MindSpeed alias --context-parallel-algo, as a list of names (default ["p2p"])."""
    algorithm = args.context_parallel_algo
    if algorithm is None:
        return args.cp_comm_type or ["p2p"]
    _require(
        algorithm in MINDSPEED_CP_ALGORITHMS,
        f"--context-parallel-algo {algorithm} is not supported; choose one of {', '.join(MINDSPEED_CP_ALGORITHMS)}",
    )
    comm_type = MINDSPEED_CP_ALGORITHMS[algorithm]
    _require(
        args.cp_comm_type in (None, [comm_type]),
        f"--context-parallel-algo {algorithm} means --cp-comm-type {comm_type}, but --cp-comm-type is "
        f"{' '.join(args.cp_comm_type or [])}; give one of them",
    )
    return [comm_type]


def validate_mtp_args(args):
    """Layouts multi-token prediction does not run in yet (training and converted checkpoints): one line each."""
    if args.mtp_num_layers is None:
        return
    unsupported = {
        "--use-legacy-models": args.use_legacy_models,
        "--pipeline-model-parallel-size > 1 without --untie-embeddings-and-output-weights": (
            args.pipeline_model_parallel_size > 1 and not args.untie_embeddings_and_output_weights
        ),
        "--context-parallel-size > 1": getattr(args, "context_parallel_size", 1) > 1,
        "--calculate-per-token-loss": getattr(args, "calculate_per_token_loss", False),
    }
    for setting, used in unsupported.items():
        _require_model(not used, f"--mtp-num-layers does not run with {setting} yet; drop one of them")


MODEL_FLAG_GROUPS = (
    add_network_size_args, add_model_regularization_args, add_model_stack_args, _add_moe_args, add_mla_args, add_mtp_args,
)


def model_flag_parser(*extra_groups) -> argparse.ArgumentParser:
    """A parser of the flags that describe the model (plus `extra_groups`), for the tools that read or write
    a model without training it."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for add_group in (*MODEL_FLAG_GROUPS, *extra_groups):
        add_group(parser)
    return parser


ARGUMENT_GROUPS = [
    add_tokenizer_args,
    _add_training_args,
    _add_initialization_args,
    _add_learning_rate_args,
    _add_regularization_args,
    _add_checkpointing_args,
    _add_mixed_precision_args,
    _add_distributed_args,
    _add_data_parallel_args,
    _add_validation_args,
    _add_logging_args,
    add_network_size_args,
    add_model_regularization_args,
    add_model_stack_args,
    add_data_args,
    _add_pipeline_args,
    _add_megatron_api_args,
    _add_moe_args,
    _add_context_parallel_args,
    add_performance_args,
    add_mla_args,
    add_mtp_args,
]
