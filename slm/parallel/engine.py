"""How one run is spread over processes: DDP, FSDP2 and DeepSpeed behind one Engine.

The launch mode comes from the launcher's environment (``accelerate launch --config_file
accelerate_configs/<mode>.yaml`` sets it; ``torchrun`` alone means DDP):

* ``single`` / ``ddp``: plain torch DDP (gradients averaged over processes).
* ``fsdp2``: ``fully_shard`` on every large tensor's unit (:mod:`slm.parallel.fsdp2`: each decoder layer,
  the embedding, the final norm with the output layer), the root not casting its inputs.
* ``deepspeed``: Accelerate's DeepSpeed engine (ZeRO-2 or ZeRO-3); under ZeRO-3 the head's
  parameters are registered with the SelectiveLM right after ``prepare`` and gathered for its
  forward and backward.

Every mode takes one contract from the training loop: backpropagate a loss already divided by
the step's global token count (see :meth:`Engine.backward`); nothing rescales gradients after
``backward`` (DeepSpeed has already stepped by then). Checkpoints are sharded (:mod:`slm.parallel.state`):
each process writes what it holds, and single/DDP/FSDP2 checkpoints load at any process count;
only the final ``model/`` export is consolidated.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from slm.model import register_zero3_head, save_inner_pretrained
from slm.parallel import state
from slm.parallel.fsdp2 import reshard_fsdp2, shard_fsdp2
from slm.parallel.launch import env_flag, requested_mode

log = logging.getLogger(__name__)


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if _world() > 1:
        import torch.distributed as dist

        dist.barrier()


class Engine:
    """One model's training machinery under a launch mode.

    Args:
        acc: the run's Accelerator (process setup, device, collectives, the DeepSpeed engine).
        lm: the module to train (a :class:`slm.SelectiveLM`).
        make_optimizer: ``lm -> optimizer``, called after sharding so it sees the sharded params.
        make_scheduler: ``optimizer -> LR scheduler`` stepped once per optimizer step.
        grad_accum: micro-batches per optimizer step.
        micro_batch: rows per micro-batch per process (DeepSpeed's config needs it).
        mixed_precision: ``no``, ``bf16`` or ``fp16`` (already resolved).
        mode: a launch mode; ``None`` = the requested one. A model that DeepSpeed cannot take
            (a second model in one DeepSpeed run, e.g. a reference trained first) uses ``ddp``.
        grad_clip: max gradient norm (DeepSpeed clips inside its step, so it must know it here).
    """

    def __init__(
        self,
        acc,
        lm: nn.Module,
        make_optimizer: Callable,
        make_scheduler: Callable,
        grad_accum: int,
        micro_batch: int,
        mixed_precision: str = "no",
        mode: str | None = None,
        grad_clip: float | None = None,
    ):
        self.acc, self.lm = acc, lm
        self.grad_clip = grad_clip
        self.mode = mode or requested_mode()
        if self.mode == "ddp" and _world() == 1:
            self.mode = "single"
        self.grad_accum = grad_accum
        self.precision = mixed_precision
        self.device = acc.device
        self.scaler = None
        if self.mode == "deepspeed":
            self._prepare_deepspeed(make_optimizer, make_scheduler, micro_batch)
            return
        if self.mode == "fsdp2":
            if mixed_precision == "fp16":
                raise ValueError("FSDP2 runs use trainer.mixed_precision=bf16 or no (fp16 needs a sharded loss scaler)")
            reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "0", "no_shard")
            shard_fsdp2(lm, self.device.type, mixed_precision, reshard, env_flag("FSDP_ACTIVATION_CHECKPOINTING"))
            self.model = lm
        else:
            lm.to(self.device)
            self.model = lm
            if self.mode == "ddp":
                from torch.nn.parallel import DistributedDataParallel

                ids = [self.device.index] if self.device.type == "cuda" else None
                self.model = DistributedDataParallel(lm, device_ids=ids)
            if mixed_precision == "fp16":
                self.scaler = torch.amp.GradScaler(self.device.type)
        self.opt = make_optimizer(lm)
        self.sched = make_scheduler(self.opt)

    def _prepare_deepspeed(self, make_optimizer, make_scheduler, micro_batch: int) -> None:
        cfg = self.acc.state.deepspeed_plugin.deepspeed_config
        cfg["train_micro_batch_size_per_gpu"] = micro_batch
        cfg["gradient_accumulation_steps"] = self.grad_accum
        cfg["train_batch_size"] = micro_batch * self.grad_accum * self.acc.num_processes
        cfg["gradient_clipping"] = float(self.grad_clip or 0.0)
        cfg["zero_allow_untested_optimizer"] = True
        if cfg.get("zero_optimization", {}).get("stage") == 3:
            cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
        opt = make_optimizer(self.lm)
        self.model, self.opt = self.acc.prepare(self.lm, opt)
        register_zero3_head(self.lm)  # so that the first step already runs the selective head
        # Stepped here after each optimizer step, as in every mode (Accelerate leaves a prepared
        # scheduler to the engine, which is not given one); built on the engine's param groups.
        self.sched = make_scheduler(self.opt)

    # -- one optimizer step -----------------------------------------------------------------------
    @property
    def world(self) -> int:
        return self.acc.num_processes

    def autocast(self):
        """Autocast for single/DDP mixed precision; FSDP2 and DeepSpeed cast parameters instead."""
        if self.mode in ("single", "ddp") and self.precision != "no":
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.device.type, dtype=dtype)
        return nullcontext()

    def micro_step(self, last: bool):
        """Context for one micro-batch: DDP skips its all-reduce until the step's last one; DeepSpeed
        (through Accelerate's ``sync_gradients``) accumulates and steps only after the last one."""
        if self.mode == "deepspeed":
            self.acc.sync_gradients = last
        if self.mode == "ddp" and not last:
            return self.model.no_sync()
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` = (this micro-batch's loss sum) / (tokens trained in the whole step on
        all processes). Every engine averages gradients over processes (and DeepSpeed also divides by
        the accumulation steps), so the loss is multiplied back: the summed gradient is exact."""
        if self.mode == "deepspeed":
            self.acc.backward(loss * (self.world * self.grad_accum))  # DeepSpeed steps inside on the last one
        elif self.scaler is not None:
            self.scaler.scale(loss * self.world).backward()
        else:
            (loss * self.world).backward()

    def clip(self, max_norm: float | None) -> torch.Tensor | None:
        """Unscale (fp16) and clip the gradients to ``max_norm`` (None: no clipping); their global norm, on the
        device (the caller reads it with its own reduce: no wait here). None for DeepSpeed, which clips inside
        its last backward."""
        if self.mode == "deepspeed":
            return None
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        params = [p for p in self.lm.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor of the global norm

    def step(self) -> float | None:
        """Step the optimizer and the schedule after :meth:`clip`; DeepSpeed's gradient norm (it stepped inside
        the last backward), else None."""
        if self.mode == "deepspeed":
            norm = self.model.get_global_grad_norm()
            self.sched.step()
            return None if norm is None else float(norm)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return None

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def reshard(self) -> None:
        """After no-grad forwards (eval): FSDP2 returns the head's unit to its shards."""
        if self.mode == "fsdp2":
            reshard_fsdp2(self.lm)

    # -- state --------------------------------------------------------------------------------
    def full_state_dict(self) -> dict | None:
        """The whole model's weights (keys as in ``lm.state_dict()``) on the main process, None
        elsewhere. Every process must call it (FSDP2 and ZeRO-3 gather)."""
        if self.mode == "deepspeed":
            sd = self.acc.get_state_dict(self.model)
        elif self.mode == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(self.lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            sd = {k: v.detach().cpu() for k, v in self.lm.state_dict().items()}
        return sd if _rank() == 0 else None

    def save_pretrained(self, out_dir: Path, tokenizer=None) -> None:
        """The trained model as an HF folder (``from_pretrained``-ready): consolidated weights under
        every mode, written into ``<out_dir>.tmp`` and renamed into place, so ``out_dir`` is complete
        or absent. Every process must call it; the main process writes."""
        sd = self.full_state_dict()
        error = None
        if _rank() == 0:
            out_dir = Path(out_dir)
            tmp, old = out_dir.with_name(out_dir.name + ".tmp"), out_dir.with_name(out_dir.name + ".old")
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                save_inner_pretrained(self.lm, sd, tmp, tokenizer)
                if out_dir.exists():  # a resumed run writes its model again
                    os.replace(out_dir, old)
                os.replace(tmp, out_dir)
                shutil.rmtree(old, ignore_errors=True)
            except BaseException as e:
                shutil.rmtree(tmp, ignore_errors=True)
                error = e
        failed = torch.tensor([float(error is not None)], device=self.device)
        if float(self.acc.reduce(failed, "sum")) > 0:  # every process stops, none waits for the others
            raise error or RuntimeError("writing the model failed on the main process")

    def save_checkpoint(self, path: Path) -> None:
        """Model, optimizer, schedule, loss scale and RNG into ``path`` (every process calls it). Each
        process writes only what it holds (see :mod:`slm.parallel.state`): nothing is gathered."""
        rank = _rank()
        if self.mode == "deepspeed":
            self.acc.save_state(str(path))  # the engine's (sharded) model and optimizer state
        else:
            state.save_model_and_optimizer(self.lm, self.opt, path)
        state.save_small_state(path, rank, self.sched, self.scaler)
        _barrier()

    def load_checkpoint(self, path: Path, saved: dict) -> None:
        """Load a checkpoint written by :meth:`save_checkpoint` (``saved``: its ``slm_state.json``),
        resharded to this launch's processes where the format allows, else refused naming why."""
        state.check_loadable(saved, self.mode, self.world, path)
        if self.mode == "deepspeed":
            self.acc.load_state(str(path))
        else:
            state.load_model_and_optimizer(self.lm, self.opt, path)
        state.load_small_state(path, _rank(), self.sched, self.scaler)

    @property
    def checkpoint_info(self) -> dict:
        """What ``slm_state.json`` records so that a later launch knows whether it can load it."""
        return {"format": state.checkpoint_format(self.mode), "processes": self.world, "mode": self.mode}

    def release(self) -> None:
        """Drop the engine's references (a reference model trained first, then discarded)."""
        if self.mode == "deepspeed":
            self.acc.free_memory(self.model, self.opt)
        self.model = self.opt = self.sched = None
