"""One run over processes: DDP, FSDP2 and DeepSpeed behind one Engine. Imports slm.model.

launch.py       the mode the launcher asks for, mixed precision and master weights, the Accelerator, building
                models under ZeRO-3,
                SLURM's distributed environment, quiet processes other than the main one
engine.py       Engine: prepare, backward (loss already normalised), step, sharded save/load, final export
fsdp2.py        FSDP2 shard units: each decoder layer, the embedding, the head unit kept gathered through a step
state.py        what a checkpoint holds per mode (torch.distributed.checkpoint, DeepSpeed's own)
"""

from slm.parallel.engine import Engine
from slm.parallel.fsdp2 import reshard_fsdp2, shard_fsdp2
from slm.parallel.launch import (
    MODES,
    PRECISIONS,
    export_slurm_distributed_env,
    make_accelerator,
    master_weights,
    model_init,
    param_dim,
    quiet_other_processes,
    requested_mode,
    resolve_mixed_precision,
)
from slm.parallel.state import CheckpointRefused

__all__ = [
    "CheckpointRefused",
    "Engine",
    "MODES",
    "PRECISIONS",
    "export_slurm_distributed_env",
    "make_accelerator",
    "master_weights",
    "model_init",
    "param_dim",
    "quiet_other_processes",
    "requested_mode",
    "reshard_fsdp2",
    "resolve_mixed_precision",
    "shard_fsdp2",
]
