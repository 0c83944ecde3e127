import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 101

# Tiny configs of every architecture the selective head claims to reproduce exactly: a shared
# decoder shape (grouped-query attention where the architecture has it) plus what sets each apart.
_DECODER = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64)
_GQA = dict(_DECODER, num_key_value_heads=2)
ARCH_KWARGS = {
    "gpt2": dict(n_layer=2, n_embd=32, n_head=4, n_positions=64),
    "gpt_neox": dict(_DECODER, tie_word_embeddings=False),
    "llama": _GQA,
    "mistral": dict(_GQA, head_dim=8),
    "qwen2": dict(_GQA, tie_word_embeddings=True),
    "qwen3": dict(_GQA, head_dim=8),
    "phi": _DECODER,  # output-layer bias
    "phi3": dict(_DECODER, num_key_value_heads=4, pad_token_id=0),
    "gemma": dict(_GQA, head_dim=8),
    "gemma2": dict(_GQA, head_dim=8, final_logit_softcapping=3.0),
    "cohere": dict(_GQA, logit_scale=0.5),
    "granite": dict(_GQA, logits_scaling=4.0),
    "olmo": _DECODER,
    "olmo2": _DECODER,
    "starcoder2": _GQA,
}
ARCHS = list(ARCH_KWARGS)


def tiny_model(arch: str, seed: int = 0, vocab: int = VOCAB):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(ARCH_KWARGS.get(arch, {}))
    cfg = AutoConfig.for_model(arch, vocab_size=vocab, **kwargs)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(cfg, name, None) is not None and not 0 <= getattr(cfg, name) < vocab:
            setattr(cfg, name, 0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # random non-zero biases so that a dropped bias cannot go unnoticed
        out = model.get_output_embeddings()
        if out.bias is not None:
            out.bias.normal_()
    return model.float().eval()


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
