"""FSDP2: how a SelectiveLM is cut into shard units, so that every large tensor is sharded between uses.

Each decoder layer is a unit, the input embedding is one, and the final norm with the output layer
(with the input embedding when it is tied to it: one parameter, one unit) is one that stays gathered
from the forward through the backward: the selective head reads the whole weight chunk by chunk in
the forward and again in the backward (see :func:`slm.model.architectures.output_head`). The root keeps
what is left (rotary tables, small buffers) and does not cast its inputs, so reference losses stay
float32 under a bf16 policy.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from slm.model import causal_lm
from slm.model.architectures import no_split_layers

log = logging.getLogger(__name__)


def _final_norm(base: nn.Module) -> nn.Module | None:
    """The decoder's final norm, by the names HF architectures give it (None if not found)."""
    for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f"):
        module = getattr(base, name, None)
        if isinstance(module, nn.Module) and any(True for _ in module.parameters()):
            return module
    return None


def fsdp2_units(lm: nn.Module) -> dict[str, list[nn.Module]]:
    """How FSDP2 groups ``lm``'s modules, so that every large tensor is sharded between uses:

    * ``layers``: each decoder layer (``_no_split_modules``), resharded after forward as configured;
    * ``embedding``: the input embedding alone (untied models);
    * ``head``: the final norm and the output layer (with the input embedding when it is tied to
      the output layer: one parameter, one unit), kept gathered from the forward through the
      backward, since the selective head reads the weight once per chunk;
    * the root (``lm``) keeps what is left (rotary tables, small buffers).
    """

    inner = causal_lm(getattr(lm, "model", lm))  # the HF model inside a SelectiveLM
    layers = no_split_layers(lm, lm)
    if not layers:
        raise ValueError(
            f"FSDP2: found no decoder layer to shard ({type(lm).__name__} names no _no_split_modules); every "
            "layer would sit in one unit and nothing would be sharded"
        )
    embedding, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    norm = _final_norm(inner.base_model)
    tied = head is not None and head.weight is embedding.weight
    head_unit = [m for m in ((embedding,) if tied else ()) + (norm, head) if m is not None]
    return {"layers": layers, "embedding": [] if tied else [embedding], "head": head_unit}


def shard_fsdp2(
    lm: nn.Module, device_type: str, mixed_precision: str, reshard: bool = True, activation_checkpointing: bool = False
) -> None:
    """``fully_shard`` the units of :func:`fsdp2_units`, then the root. ``reshard``: layers and the
    embedding return to their shards after the forward (the launch config's reshard setting)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    dtype = {"bf16": torch.bfloat16, "no": None}[mixed_precision]
    reduce = torch.float32 if dtype is not None else None
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=reduce)
    # The root must not cast its inputs: ref_loss is float32 and selection ranks on it.
    root_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=reduce, cast_forward_inputs=False)
    units = fsdp2_units(lm)
    if activation_checkpointing:
        lm.activation_checkpointing_enable()
    if units["embedding"]:
        fully_shard(units["embedding"][0], mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    for layer in units["layers"]:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    # Gathered once per step: the head reads it chunk by chunk in the forward and again in the backward.
    fully_shard(units["head"], mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    fully_shard(lm, mesh=mesh, mp_policy=root_policy)
    log.info(
        "fsdp2: %d decoder layer units (%s), %s, a head unit (%s) and the root; compute dtype %s",
        len(units["layers"]),
        sorted({type(m).__name__ for m in units["layers"]}),
        "an embedding unit" if units["embedding"] else "the tied embedding in the head unit",
        ", ".join(type(m).__name__ for m in units["head"]),
        dtype or "float32",
    )


def reshard_fsdp2(lm: nn.Module) -> None:
    """Return every FSDP2 unit to its shards (after an eval, whose no-grad forwards leave the head
    unit gathered: it reshards only after a backward)."""
    for m in lm.modules():
        if hasattr(m, "reshard") and type(m).__name__.startswith("FSDP"):
            m.reshard()
