"""Named random-number streams, and activation recomputation that replays them.

Dropout inside a tensor-parallel region must differ between tensor-parallel ranks (each holds different
heads), while dropout on replicated activations must agree. The tracker keeps one named generator state
per purpose and `fork(name)` swaps it in for a block of code. Both the CPU generator and, once this process
has initialised CUDA (CUDA runs select their device before seeding), the current device's generator are
swapped, so the same code is correct on either device and a CPU run never touches CUDA.
"""

import contextlib
from typing import Dict, Optional, Tuple

import torch
import torch.utils.checkpoint

from megatron.core import parallel_state

_MODEL_PARALLEL_RNG_TRACKER_NAME = "model-parallel-rng"

# Added to the seed for the tensor-parallel stream, as in Megatron-LM, so it never equals the default one.
_TENSOR_PARALLEL_SEED_OFFSET = 2718

GeneratorStates = Tuple[torch.Tensor, Optional[torch.Tensor]]


def _current_states() -> GeneratorStates:
    cuda_state = torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda_state


def _set_states(states: GeneratorStates) -> None:
    cpu_state, cuda_state = states
    torch.set_rng_state(cpu_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state)


def _seeded_states(seed: int) -> GeneratorStates:
    """Generator states for `seed`, made without disturbing the current ones."""
    saved = _current_states()
    torch.manual_seed(seed)
    seeded = _current_states()
    _set_states(saved)
    return seeded


class CudaRNGStatesTracker:
    """Named generator states; `fork(name)` runs a block with that stream and advances it."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.states_: Dict[str, GeneratorStates] = {}
        self.seeds_ = set()

    def get_states(self) -> Dict[str, GeneratorStates]:
        """A copy of every stream's state (saved in checkpoints so a resume replays the same dropout)."""
        return dict(self.states_)

    def set_states(self, states: Dict[str, GeneratorStates]) -> None:
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already seeds another random stream")
        if name in self.states_:
            raise ValueError(f"random stream {name!r} already exists")
        self.seeds_.add(seed)
        self.states_[name] = _seeded_states(seed)

    @contextlib.contextmanager
    def fork(self, name: str = _MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise RuntimeError(
                f"random stream {name!r} is not seeded; call "
                "megatron.core.tensor_parallel.model_parallel_cuda_manual_seed(seed) first"
            )
        outside = _current_states()
        _set_states(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = _current_states()
            _set_states(outside)


_RNG_STATE_TRACKER = CudaRNGStatesTracker()


def get_cuda_rng_tracker() -> CudaRNGStatesTracker:
    return _RNG_STATE_TRACKER


def model_parallel_cuda_manual_seed(seed: int) -> None:
    """Seed the streams: the default generator gets `seed` (same on every tensor-parallel rank, for
    replicated dropout) and the tensor-parallel stream a rank-specific seed (for sharded dropout and for
    weights initialised slice by slice on each rank)."""
    tensor_parallel_seed = seed + _TENSOR_PARALLEL_SEED_OFFSET + parallel_state.get_tensor_model_parallel_rank()
    torch.manual_seed(seed)
    _RNG_STATE_TRACKER.reset()
    _RNG_STATE_TRACKER.add(_MODEL_PARALLEL_RNG_TRACKER_NAME, tensor_parallel_seed)


def _tracker_replay_contexts():
    """Contexts for torch's checkpoint: remember the tracker's streams in the forward pass and replay
    them while recomputing, so the recomputed dropout masks equal the original ones."""
    forward_states = {}

    @contextlib.contextmanager
    def remember():
        forward_states.update(_RNG_STATE_TRACKER.get_states())
        yield

    @contextlib.contextmanager
    def replay():
        current = _RNG_STATE_TRACKER.get_states()
        _RNG_STATE_TRACKER.set_states(forward_states)
        try:
            yield
        finally:
            _RNG_STATE_TRACKER.set_states(current)

    return remember(), replay()


def checkpoint(function, distribute_saved_activations: bool, *args):
    """Run `function(*args)` without keeping its activations; recompute them in the backward pass.

    `distribute_saved_activations` (Megatron's option to split the saved inputs over tensor-parallel ranks)
    is accepted, but the inputs are kept whole: the same numbers, without that memory saving.
    """
    return torch.utils.checkpoint.checkpoint(
        function, *args, use_reentrant=False, context_fn=_tracker_replay_contexts, preserve_rng_state=True
    )
