"""Micro batches per step, constant and along a batch-size ramp-up, against published megatron-core."""

import json

import pytest

from megatron.core import num_microbatches_calculator as calculator


@pytest.fixture
def fresh_calculator():
    calculator.destroy_num_microbatches_calculator()
    yield calculator
    calculator.destroy_num_microbatches_calculator()


def test_constant(fresh_calculator):
    fresh_calculator.init_num_microbatches_calculator(0, None, 32, 2, 4)
    assert fresh_calculator.get_num_microbatches() == 4
    fresh_calculator.update_num_microbatches(10_000)
    assert fresh_calculator.get_current_global_batch_size() == 32


def test_rejects_indivisible_global_batch(fresh_calculator):
    with pytest.raises(ValueError, match="not divisible"):
        fresh_calculator.init_num_microbatches_calculator(0, None, 30, 4, 2)


def test_rampup_matches_published_megatron_core(fresh_calculator, run_reference_megatron):
    consumed = [0, 1, 99, 100, 150, 299, 300, 450, 599, 600, 601, 10_000]
    script = f"""
import json
from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator
c = RampupBatchsizeNumMicroBatchesCalculator(64, 2, 2, False, rank=0, start_global_batch_size=16,
                                             batch_size_increment=16, ramup_samples=600)
out = []
for n in {consumed!r}:
    c.update(n, consistency_check=True)
    out.append([c.get(), c.get_current_global_batch_size()])
print(json.dumps(out))
"""
    expected = json.loads(run_reference_megatron(script))
    fresh_calculator.init_num_microbatches_calculator(0, [16, 16, 600], 64, 2, 2)
    ours = []
    for samples in consumed:
        fresh_calculator.update_num_microbatches(samples)
        ours.append([fresh_calculator.get_num_microbatches(), fresh_calculator.get_current_global_batch_size()])
    assert ours == expected
    assert ours[0] == [4, 16] and ours[-1] == [16, 64]


def test_megatron_functions_and_running_batch_size(fresh_calculator):
    fresh_calculator.init_num_microbatches_calculator(0, None, 30, 4, 2, decrease_batch_size_if_needed=True)
    assert fresh_calculator.get_micro_batch_size() == 4
    assert fresh_calculator.get_current_global_batch_size() == 30
    assert fresh_calculator.get_current_running_global_batch_size() == 24
    assert fresh_calculator.get_num_microbatches() == 3
    with pytest.raises(RuntimeError, match="already"):
        fresh_calculator.init_num_microbatches_calculator(0, None, 32, 4, 2)
    fresh_calculator.reconfigure_num_microbatches_calculator(0, [8, 8, 100], 32, 4, 2)
    assert fresh_calculator.get_num_microbatches() == 1
    fresh_calculator.update_num_microbatches(70, consistency_check=True, verbose=True)
    assert fresh_calculator.get_current_global_batch_size() == 24
    assert fresh_calculator.get_current_running_global_batch_size() == 24
    assert fresh_calculator.get_num_microbatches() == 3
    with pytest.raises(AssertionError):  # Megatron asserts; ours is also a ValueError / UserError
        fresh_calculator.reconfigure_num_microbatches_calculator(0, [8, 5, 100], 32, 4, 2)
