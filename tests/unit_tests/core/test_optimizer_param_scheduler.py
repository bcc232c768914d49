"""Learning-rate and weight-decay schedules: hand-computed values, and agreement with published megatron-core."""

import json
import math

import pytest
import torch

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def _scheduler(**overrides):
    params = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.SGD([{"params": params[:1], "wd_mult": 1.0}, {"params": params[1:], "wd_mult": 0.0}], lr=0.0)
    settings = dict(
        init_lr=0.0,
        max_lr=1.0,
        min_lr=0.1,
        lr_warmup_steps=10,
        lr_decay_steps=110,
        lr_decay_style="linear",
        start_wd=0.1,
        end_wd=0.1,
        wd_incr_steps=110,
        wd_incr_style="constant",
    )
    settings.update(overrides)
    return OptimizerParamScheduler(optimizer, **settings), optimizer


def _lr_after(scheduler, optimizer, steps):
    scheduler.step(steps - scheduler.num_steps)
    return optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize(
    "style, expected",
    [
        # warmup 0 -> 1 over 10 steps, then decay over 100 steps to 0.1
        ("constant", {0: 0.0, 5: 0.5, 10: 1.0, 60: 1.0, 200: 1.0}),
        ("linear", {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.55, 110: 0.1, 200: 0.1}),
        ("cosine", {5: 0.5, 10: 1.0, 60: 0.55, 35: 0.1 + 0.9 * 0.5 * (math.cos(math.pi / 4) + 1), 110: 0.1}),
        ("inverse-square-root", {5: 0.5, 10: 1.0, 40: 0.5, 90: 1 / 3, 200: 0.1}),
    ],
)
def test_lr_decay_styles(style, expected):
    scheduler, optimizer = _scheduler(lr_decay_style=style)
    for step, lr in sorted(expected.items()):
        assert _lr_after(scheduler, optimizer, step) == pytest.approx(lr, abs=1e-12), step


@pytest.mark.parametrize(
    "wsd_style, coeff_at_half",
    [("linear", 0.5), ("cosine", 0.5), ("exponential", 2 * 0.5**0.5 - 1), ("minus_sqrt", 1 - 0.5**0.5)],
)
def test_wsd_is_stable_then_anneals(wsd_style, coeff_at_half):
    scheduler, optimizer = _scheduler(lr_decay_style="WSD", wsd_decay_steps=20, lr_wsd_decay_style=wsd_style)
    assert _lr_after(scheduler, optimizer, 50) == 1.0
    assert _lr_after(scheduler, optimizer, 90) == 1.0
    assert _lr_after(scheduler, optimizer, 100) == pytest.approx(0.1 + 0.9 * coeff_at_half)
    assert _lr_after(scheduler, optimizer, 110) == pytest.approx(0.1)


@pytest.mark.parametrize("style, halfway", [("linear", 0.05), ("cosine", 0.05)])
def test_weight_decay_increment_and_no_decay_group(style, halfway):
    scheduler, optimizer = _scheduler(start_wd=0.0, end_wd=0.1, wd_incr_style=style)
    scheduler.step(55)
    decayed, not_decayed = optimizer.param_groups
    assert decayed["weight_decay"] == pytest.approx(halfway)
    assert not_decayed["weight_decay"] == 0.0
    scheduler.step(100)
    assert decayed["weight_decay"] == pytest.approx(0.1)


def test_state_dict_round_trip_and_mismatch():
    scheduler, optimizer = _scheduler(lr_decay_style="cosine")
    scheduler.step(37)
    resumed, resumed_optimizer = _scheduler(lr_decay_style="cosine")
    resumed.load_state_dict(scheduler.state_dict())
    assert resumed.num_steps == 37
    assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]

    longer, _ = _scheduler(lr_decay_style="cosine", lr_decay_steps=220, use_checkpoint_opt_param_scheduler=False)
    with pytest.raises(ValueError, match="decay steps .*--override-opt_param-scheduler"):
        longer.load_state_dict(scheduler.state_dict())


def test_rejects_warmup_not_shorter_than_decay():
    with pytest.raises(ValueError, match="warmup steps"):
        _scheduler(lr_warmup_steps=110)


def test_matches_published_megatron_core(run_reference_megatron):
    cases = [
        dict(style="linear", wsd=None),
        dict(style="cosine", wsd=None),
        dict(style="inverse-square-root", wsd=None),
        dict(style="WSD", wsd="exponential"),
        dict(style="WSD", wsd="minus_sqrt"),
    ]
    steps = [0, 3, 10, 11, 47, 64, 99, 100, 109, 110, 111, 150]
    script = """
import json, torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
cases = json.loads('CASES')
out = []
for case in cases:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    s = OptimizerParamScheduler(opt, init_lr=0.01, max_lr=1.0, min_lr=0.1, lr_warmup_steps=10, lr_decay_steps=110,
        lr_decay_style=case['style'], start_wd=0.0, end_wd=0.1, wd_incr_steps=110, wd_incr_style='cosine',
        wsd_decay_steps=30, lr_wsd_decay_style=case['wsd'])
    values = []
    for step in STEPS:
        s.step(step - s.num_steps)
        values.append([opt.param_groups[0]['lr'], opt.param_groups[0]['weight_decay']])
    out.append(values)
print(json.dumps(out))
""".replace("CASES", json.dumps(cases)).replace("STEPS", repr(steps))
    reference = json.loads(run_reference_megatron(script))
    for case, expected in zip(cases, reference):
        scheduler, optimizer = _scheduler(
            init_lr=0.01,
            lr_decay_style=case["style"],
            start_wd=0.0,
            end_wd=0.1,
            wd_incr_style="cosine",
            wsd_decay_steps=30,
            lr_wsd_decay_style=case["wsd"],
        )
        for step, (lr, weight_decay) in zip(steps, expected):
            scheduler.step(step - scheduler.num_steps)
            assert optimizer.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12, abs=1e-15), (case, step)
            assert optimizer.param_groups[0]["weight_decay"] == pytest.approx(weight_decay, rel=1e-12, abs=1e-15)
