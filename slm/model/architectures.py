"""HF causal LMs: build one from a config, and find what the selective head needs in one.

Which architectures' logits the head reproduces exactly, where a model's head and decoder are
(a PEFT model's base model included), and how DeepSpeed ZeRO-3's partitioned head parameters
are gathered for the head, which never calls the output layer's own forward.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from slm.head import OutputHead

# Architectures whose causal LM computes ``logits = lm_head(last_hidden_state)`` (the final norm
# inside ``model.base_model``), then at most the transform named below, and HF's standard causal-LM
# loss: ``cap(scale * (final_hidden @ W.T + b))``. Each is checked against HF's own loss and
# gradients in the tests (tests/conftest.py ARCH_KWARGS).
_PLAIN_HEADS = {
    "gpt2",
    "gpt_neox",
    "gpt_neo",
    "gptj",
    "gpt_bigcode",
    "codegen",
    "bloom",
    "opt",
    "falcon",
    "persimmon",
    "stablelm",
    "llama",
    "mistral",
    "ministral",
    "qwen2",
    "qwen3",
    "phi",
    "phi3",
    "gemma",
    "olmo",
    "olmo2",
    "olmo3",
    "starcoder2",
    "smollm3",
    "glm",
    "glm4",
    "exaone4",
    "helium",
    "seed_oss",
    "apertus",
    "arcee",
    "ernie4_5",
    "hunyuan_v1_dense",
    "nemotron",
    # mixtures of experts: their loss is this cross-entropy while the router's auxiliary loss is off
    # (config.output_router_logits, off by default; SelectiveLM refuses it on for the models whose
    # loss adds it, see check_no_router_loss)
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "phimoe",
    "minimax",
    "glm4_moe",
    "hunyuan_v1_moe",
    "flex_olmo",
    # Gemma 3's image-text model (4B and up) trained on text: unlike gemma3_text, its logits are not
    # soft-capped (HF's Gemma3ForConditionalGeneration ignores text_config.final_logit_softcapping)
    "gemma3",
}
_SOFTCAPPED = {"gemma2", "gemma3_text", "vaultgemma"}  # tanh cap at config.final_logit_softcapping (None: none)
_SCALED = {"cohere": "logit_scale", "cohere2": "logit_scale"}  # logits * config.<attribute>
_DIVIDED = {"granite": "logits_scaling", "granitemoe": "logits_scaling"}  # logits / config.<attribute>
_EXACT_HEADS = _PLAIN_HEADS | _SOFTCAPPED | set(_SCALED) | set(_DIVIDED)


def check_no_router_loss(model: nn.Module) -> None:
    """Refuse a mixture of experts whose HF loss adds the router's load-balancing term (its config's
    ``output_router_logits``): SelectiveLM trains cross-entropy only and must not drop it silently."""
    lm = causal_lm(model)
    if getattr(lm.config, "output_router_logits", False) and hasattr(lm, "router_aux_loss_coef"):
        raise ValueError(
            "SelectiveLM: this model's config has output_router_logits=True: its own loss adds the router's "
            "load-balancing loss (router_aux_loss_coef x aux), which SelectiveLM does not compute (it trains the "
            "selected tokens' cross-entropy). Set model.config.output_router_logits = False, and add the "
            "balancing loss yourself if you need it."
        )


def causal_lm(model: nn.Module) -> nn.Module:
    """The HF causal LM inside ``model``: itself, or a PEFT model's base model (LoRA layers injected)."""
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        config = model.peft_config.get(getattr(model, "active_adapter", "default"))
        if config is not None and getattr(config, "is_prompt_learning", False):
            raise ValueError(
                f"SelectiveLM supports PEFT adapters that change weights (LoRA and similar), not prompt learning "
                f"({type(config).__name__}): its virtual tokens would shift the labels"
            )
        return model.get_base_model()
    return model


def _zero3_head_params(module: nn.Module) -> list[Tensor]:
    out = causal_lm(module).get_output_embeddings()
    return [p for p in (out.weight, out.bias) if p is not None and hasattr(p, "ds_id")]


def register_zero3_head(module: nn.Module) -> None:
    """Under DeepSpeed ZeRO-3 the head's parameters are partitioned and gathered only around
    lm_head's own forward, which the selective head never calls: register them as external
    parameters of ``module`` (the SelectiveLM the engine runs) so that ZeRO-3 gathers them for its
    forward and backward. Call once the parameters are partitioned (after ``deepspeed.initialize``
    or Accelerate's ``prepare``; a model built under ``zero.Init`` already is)."""
    params = _zero3_head_params(module)
    if not params:
        return
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    known = getattr(module, "_external_params", {})
    for p in params:
        if id(p) not in known:
            register_external_parameter(module, p)


_warned_zero3_fallback = False


def zero3_ready(module: nn.Module) -> bool:
    """Whether ZeRO-3 has gathered the head's parameters for this forward (True without ZeRO-3).
    Parameters not registered yet (an engine set up outside slm) are registered now, and this one
    call runs HF's full logits, with a warning."""
    params = _zero3_head_params(module)
    if not params:
        return True
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    registered_before = all(id(p) in getattr(module, "_external_params", {}) for p in params)
    register_zero3_head(module)
    ready = all(p.ds_status != ZeroParamStatus.NOT_AVAILABLE for p in params)
    if registered_before and not ready:
        raise RuntimeError(
            "ZeRO-3 did not gather the output layer's weight for SelectiveLM's forward; call SelectiveLM (the "
            "module given to DeepSpeed) rather than its inner model"
        )
    global _warned_zero3_fallback
    if not ready and not _warned_zero3_fallback:
        _warned_zero3_fallback = True
        warnings.warn(
            "slm: ZeRO-3 had not gathered the output layer for this forward (its parameters were registered with "
            "SelectiveLM only now), so this one call ran HF's full logits; call "
            "slm.model.architectures.register_zero3_head(model) after deepspeed.initialize to avoid it",
            stacklevel=3,
        )
    return ready


def gathered(params: list[Tensor | None]):
    """Under DeepSpeed ZeRO-3 the head's parameters live partitioned outside their module's
    forward; gather them (read-only) for as long as the head needs them."""
    partitioned = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not partitioned:
        return nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    # Small parameters stay whole under ZeRO-3 (the persistence threshold): only gather the others.
    partitioned = [p for p in partitioned if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None) if partitioned else nullcontext()


def whole_numel(p: Tensor) -> int:
    """A parameter's element count, also when ZeRO-3 partitioned it (its ``ds_shape`` is the whole shape)."""
    n = 1
    for x in getattr(p, "ds_shape", p.shape):
        n *= int(x)
    return n


def no_split_layers(root: nn.Module, lm: nn.Module) -> list[nn.Module]:
    """The modules under ``root`` whose class ``lm`` names in ``_no_split_modules`` (its layers), in order."""
    names = set(getattr(lm, "_no_split_modules", None) or [])
    return [m for m in root.modules() if m is not root and type(m).__name__ in names]


def head_support(model: nn.Module) -> str | None:
    """Why the selective head cannot reproduce ``model``'s logits exactly, or None if it can."""
    lm = causal_lm(model)
    out = lm.get_output_embeddings()
    if lm.config.model_type not in _EXACT_HEADS:
        return f"no exact selective head for model_type={lm.config.model_type!r}"
    if not isinstance(out, nn.Linear) or type(out).forward is not nn.Linear.forward:
        return f"the output layer is a {type(out).__module__}.{type(out).__name__}, not a plain nn.Linear"
    if _is_dtensor(out.weight) and not _fsdp2(out):
        return "the output layer's weight is a DTensor outside FSDP2 (tensor parallel?), which the head cannot gather"
    return None


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def _fsdp2(module: nn.Module) -> bool:
    """A module in an FSDP2 unit (``fully_shard`` makes it an ``FSDPModule``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch before 2.6
        return False
    return isinstance(module, FSDPModule)


def output_head(
    model: nn.Module, chunk_elements: int | None = None, backend: str = "auto"
) -> tuple[OutputHead | None, str]:
    """The :class:`OutputHead` that reproduces ``model``'s logits, or ``None`` and the reason.

    An output layer sharded by FSDP2 is gathered first (it stays gathered until FSDP reshards it
    after the backward), so the head always reads the whole weight, never a shard."""
    why = head_support(model)
    if why is not None:
        return None, why
    lm = causal_lm(model)
    cfg, out = lm.config, lm.get_output_embeddings()
    if _is_dtensor(out.weight):
        out.unshard()
        if _is_dtensor(out.weight):
            return None, "FSDP2 did not gather the output layer's weight"
    scale = 1.0
    if cfg.model_type in _SCALED:
        scale = float(getattr(cfg, _SCALED[cfg.model_type]))
    elif cfg.model_type in _DIVIDED:
        scale = 1.0 / float(getattr(cfg, _DIVIDED[cfg.model_type]))
    softcap = getattr(cfg, "final_logit_softcapping", None) if cfg.model_type in _SOFTCAPPED else None
    return OutputHead(out.weight, out.bias, scale, softcap, chunk_elements, backend), ""


MODEL_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    """``model.*``: the training model (and the architecture of a reference trained from scratch): a pretrained
    one (``pretrained``: a hub name or folder), else one built from ``config`` (the HF config's fields, with
    ``model_type``). ``tokenizer`` is the one the data uses by default; ``dtype`` the dtype it loads in."""

    name: str = "model"
    pretrained: str | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    config: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.dtype not in MODEL_DTYPES:
            raise ValueError(f"model.dtype must be one of {MODEL_DTYPES}, got {self.dtype!r}")
        if not self.pretrained and not (self.config or {}).get("model_type"):
            raise ValueError(
                "model: set model.pretrained=<hub name or folder>, or model.config with a model_type (and its sizes) "
                "for a model built from config"
            )
        object.__setattr__(self, "config", dict(self.config or {}))

    @classmethod
    def of(cls, settings) -> ModelConfig:
        """A :class:`ModelConfig` from itself or from a mapping of ``model.*`` settings (unknown keys named)."""
        if isinstance(settings, cls):
            return settings
        given = dict(settings)
        unknown = sorted(set(given) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"model.{unknown[0]} is not a setting of model; it has {sorted(cls.__dataclass_fields__)}")
        return cls(**given)


def build_model(mcfg, vocab_size: int, seed: int, tokenizer=None, fresh: bool = False):
    """An HF causal LM from ``mcfg`` (a :class:`ModelConfig`, or a mapping of its fields): ``pretrained`` (hub
    name or path), else built from ``config`` (the HF config's fields). A model built
    from config carries ``tokenizer``'s special token ids (generation stops at its end token).
    ``fresh=True``: a pretrained model's architecture, freshly initialised (a reference trained
    from scratch)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    mcfg = ModelConfig.of(mcfg)
    dtype = getattr(torch, mcfg.dtype)
    if mcfg.pretrained and not fresh:
        return _from_pretrained(mcfg.pretrained, dtype)
    if mcfg.pretrained:
        config = AutoConfig.from_pretrained(mcfg.pretrained)
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    kwargs = dict(mcfg.config)
    model_type = kwargs.pop("model_type")
    if tokenizer is not None:
        kwargs.update(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if tokenizer is not None and model.generation_config is not None:
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(model.generation_config, name, getattr(tokenizer, name))
    return model


def _from_pretrained(name: str, dtype):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except OSError as e:
        raise ValueError(f"model.pretrained={name!r}: could not load it ({e})") from e
