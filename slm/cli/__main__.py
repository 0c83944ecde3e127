"""``python -m slm.cli`` (what ``accelerate launch -m slm.cli`` and ``torchrun -m slm.cli`` run): slm-train."""

from slm.cli.slm_train import main_train

main_train()
