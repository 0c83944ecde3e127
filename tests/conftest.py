import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 101

# Tiny configs of every architecture the selective head claims to reproduce exactly.
ARCH_KWARGS = {
    "gpt2": dict(n_layer=2, n_embd=32, n_head=4, n_positions=64),
    "gpt_neox": dict(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, tie_word_embeddings=False
    ),
    "llama": dict(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64
    ),
    "mistral": dict(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        head_dim=8,
    ),
    "qwen2": dict(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        tie_word_embeddings=True,
    ),
    "qwen3": dict(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        head_dim=8,
    ),
    "phi": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64),
    "phi3": dict(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        pad_token_id=0,
    ),
    "gemma": dict(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        head_dim=8,
    ),
    "gemma2": dict(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        head_dim=8,
        final_logit_softcapping=3.0,
    ),
    "cohere": dict(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        logit_scale=0.5,
    ),
    "granite": dict(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        logits_scaling=4.0,
    ),
    "olmo": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64),
    "olmo2": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64),
    "starcoder2": dict(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64
    ),
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
