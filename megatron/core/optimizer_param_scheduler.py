"""Learning-rate and weight-decay schedules, stepped in samples (Megatron-LM's OptimizerParamScheduler).

Steps count consumed samples: iteration-based flags are converted by multiplying with the global batch
size, so a schedule stays the same when the batch size ramps up.
"""

import math

_LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
_WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
_WD_INCR_STYLES = ("constant", "linear", "cosine")


def _cosine_ramp(ratio: float) -> float:
    """1 at ratio 0 falling to 0 at ratio 1 along half a cosine."""
    return 0.5 * (math.cos(math.pi * ratio) + 1.0)


class OptimizerParamScheduler:
    """Sets `lr` and `weight_decay` of every optimizer param group from the number of samples consumed.

    lr: linear warmup from `init_lr` to `max_lr` over `lr_warmup_steps`, then decay to `min_lr` by
    `lr_decay_steps` (constant, linear, cosine, inverse-square-root, or WSD: stable, then anneal over the
    last `wsd_decay_steps`). Weight decay moves from `start_wd` to `end_wd` over `wd_incr_steps`; each group's
    value is multiplied by its `wd_mult` (0 for biases and norm weights).
    """

    def __init__(
        self,
        optimizer,
        init_lr: float,
        max_lr: float,
        min_lr: float,
        lr_warmup_steps: float,
        lr_decay_steps: float,
        lr_decay_style: str,
        start_wd: float,
        end_wd: float,
        wd_incr_steps: float,
        wd_incr_style: str,
        use_checkpoint_opt_param_scheduler: bool = True,
        override_opt_param_scheduler: bool = False,
        wsd_decay_steps: float = None,
        lr_wsd_decay_style: str = None,
    ):
        if not 0.0 <= min_lr <= max_lr or not 0.0 <= init_lr <= max_lr:
            raise ValueError(f"need 0 <= min_lr ({min_lr}) <= max_lr ({max_lr}) and 0 <= init_lr ({init_lr}) <= max_lr")
        if lr_decay_steps <= 0 or not 0 <= lr_warmup_steps < lr_decay_steps:
            raise ValueError(
                f"need 0 <= warmup steps ({lr_warmup_steps}) < decay steps ({lr_decay_steps})"
            )
        if lr_decay_style not in _LR_DECAY_STYLES:
            raise ValueError(f"unknown lr decay style {lr_decay_style!r}; choose one of {', '.join(_LR_DECAY_STYLES)}")
        if lr_decay_style == "WSD":
            if wsd_decay_steps is None or not 0 < wsd_decay_steps <= lr_decay_steps:
                raise ValueError("the WSD schedule needs 0 < wsd decay steps <= decay steps")
            if lr_wsd_decay_style not in _WSD_DECAY_STYLES:
                raise ValueError(f"unknown WSD decay style {lr_wsd_decay_style!r}")
        if wd_incr_style not in _WD_INCR_STYLES:
            raise ValueError(f"unknown weight decay increment style {wd_incr_style!r}")
        if not 0.0 <= start_wd <= end_wd:
            raise ValueError(f"need 0 <= start_wd ({start_wd}) <= end_wd ({end_wd})")
        if wd_incr_style == "constant" and start_wd != end_wd:
            raise ValueError("a constant weight decay needs start_wd == end_wd")
        if override_opt_param_scheduler and use_checkpoint_opt_param_scheduler:
            raise ValueError("override the checkpoint's schedule or use it, not both")
        self.optimizer = optimizer
        self.init_lr = init_lr
        self.max_lr = float(max_lr)
        self.min_lr = min_lr
        self.lr_warmup_steps = lr_warmup_steps
        self.lr_decay_steps = lr_decay_steps
        self.lr_decay_style = lr_decay_style
        self.wsd_decay_steps = wsd_decay_steps
        self.lr_wsd_decay_style = lr_wsd_decay_style
        self.start_wd = start_wd
        self.end_wd = end_wd
        self.wd_incr_steps = wd_incr_steps
        self.wd_incr_style = wd_incr_style
        self.use_checkpoint_opt_param_scheduler = use_checkpoint_opt_param_scheduler
        self.override_opt_param_scheduler = override_opt_param_scheduler
        self.num_steps = 0
        self.step(0)

    def get_wd(self) -> float:
        """Weight decay after `num_steps` samples."""
        if self.num_steps > self.wd_incr_steps or self.wd_incr_style == "constant":
            return self.end_wd
        ratio = self.num_steps / self.wd_incr_steps
        coeff = ratio if self.wd_incr_style == "linear" else _cosine_ramp(1.0 - ratio)
        return self.start_wd + coeff * (self.end_wd - self.start_wd)

    def get_lr(self, param_group: dict = None) -> float:
        """Learning rate after `num_steps` samples (a group may carry its own max_lr / min_lr)."""
        param_group = param_group or {}
        max_lr = param_group.get("max_lr", self.max_lr)
        min_lr = param_group.get("min_lr", self.min_lr)
        if self.lr_warmup_steps > 0 and self.num_steps <= self.lr_warmup_steps:
            return self.init_lr + (max_lr - self.init_lr) * self.num_steps / self.lr_warmup_steps
        if self.lr_decay_style == "constant":
            return max_lr
        if self.num_steps > self.lr_decay_steps:
            return min_lr
        if self.lr_decay_style == "inverse-square-root":
            lr = max_lr * math.sqrt(max(self.lr_warmup_steps, 1)) / math.sqrt(max(self.num_steps, 1))
            return max(min_lr, lr)
        ratio = (self.num_steps - self.lr_warmup_steps) / (self.lr_decay_steps - self.lr_warmup_steps)
        if self.lr_decay_style == "linear":
            coeff = 1.0 - ratio
        elif self.lr_decay_style == "cosine":
            coeff = _cosine_ramp(ratio)
        else:
            coeff = self._wsd_coeff()
        return min_lr + coeff * (max_lr - min_lr)

    def _wsd_coeff(self) -> float:
        """Warmup-stable-decay: 1 until the last `wsd_decay_steps`, then the chosen annealing shape."""
        anneal_start = self.lr_decay_steps - self.wsd_decay_steps
        if self.num_steps <= anneal_start:
            return 1.0
        ratio = (self.num_steps - anneal_start) / self.wsd_decay_steps
        if self.lr_wsd_decay_style == "linear":
            return 1.0 - ratio
        if self.lr_wsd_decay_style == "cosine":
            return _cosine_ramp(ratio)
        if self.lr_wsd_decay_style == "exponential":
            return 2.0 * math.pow(0.5, ratio) - 1.0
        return 1.0 - math.sqrt(ratio)

    def step(self, increment: int) -> None:
        """Advance by `increment` samples and write lr and weight decay into the optimizer's groups."""
        self.num_steps += increment
        weight_decay = self.get_wd()
        for group in self.optimizer.param_groups:
            group["lr"] = self.get_lr(group)
            group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)

    def state_dict(self) -> dict:
        return {
            "max_lr": self.max_lr,
            "lr_warmup_steps": self.lr_warmup_steps,
            "num_steps": self.num_steps,
            "lr_decay_style": self.lr_decay_style,
            "lr_decay_steps": self.lr_decay_steps,
            "min_lr": self.min_lr,
            "start_wd": self.start_wd,
            "end_wd": self.end_wd,
            "wd_incr_style": self.wd_incr_style,
            "wd_incr_steps": self.wd_incr_steps,
        }

    def _choose(self, current, saved, name: str):
        """The flags' value or the checkpoint's; they must agree unless one side is told to win."""
        if self.override_opt_param_scheduler:
            return current
        if not self.use_checkpoint_opt_param_scheduler and current != saved:
            raise ValueError(
                f"the checkpoint's {name} ({saved}) differs from the flags' ({current}); pass "
                "--override-opt_param-scheduler to use the flags or --use-checkpoint-opt_param-scheduler to "
                "use the checkpoint's"
            )
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue a saved schedule; its shape must match the flags unless told which one wins."""
        self.max_lr = self._choose(self.max_lr, state_dict["max_lr"], "learning rate")
        self.min_lr = self._choose(self.min_lr, state_dict["min_lr"], "minimum learning rate")
        self.lr_warmup_steps = self._choose(self.lr_warmup_steps, state_dict["lr_warmup_steps"], "warmup steps")
        self.lr_decay_steps = self._choose(self.lr_decay_steps, state_dict["lr_decay_steps"], "decay steps")
        self.lr_decay_style = self._choose(self.lr_decay_style, state_dict["lr_decay_style"], "decay style")
        if "start_wd" in state_dict:
            self.start_wd = self._choose(self.start_wd, state_dict["start_wd"], "start weight decay")
            self.end_wd = self._choose(self.end_wd, state_dict["end_wd"], "end weight decay")
            self.wd_incr_style = self._choose(self.wd_incr_style, state_dict["wd_incr_style"], "weight decay style")
            if self.wd_incr_style != "constant":  # constant decay ignores its length, which --train-iters sets
                self.wd_incr_steps = self._choose(self.wd_incr_steps, state_dict["wd_incr_steps"], "weight decay steps")
        self.num_steps = 0
        self.step(increment=state_dict["num_steps"])
