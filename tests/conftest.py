import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
if not torch.cuda.is_available():  # the triton head backend's kernels run on CPU in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from support.archs import VOCAB  # noqa: E402


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 12), generator=g)
    am = torch.ones_like(ids)
    am[1, -4:] = 0  # right padding
    labels = ids.clone()
    labels[am == 0] = -100
    labels[2, 3:6] = -100  # masked span inside a sequence
    return ids, am, labels


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state: a test that builds a trainer in bf16 (TRL's default) would
    otherwise refuse every later Accelerator of another precision in this process."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
