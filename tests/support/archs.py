"""Tiny models of every architecture the selective head claims to reproduce exactly, and a reference
folder as slm-score and reference=live expect it."""

import torch

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
    "gpt_neo": dict(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        attention_types=[[["global", "local"], 1]],
        window_size=8,
    ),
    "gptj": dict(n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64, rotary_dim=4),  # output-layer bias
    "gpt_bigcode": dict(n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64),
    "codegen": dict(n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64, rotary_dim=4),  # output-layer bias
    "bloom": dict(hidden_size=32, n_layer=2, n_head=4),
    "opt": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32),
    "falcon": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    "persimmon": _DECODER,
    "stablelm": dict(_GQA, head_dim=8, max_position_embeddings=64),
    "ministral": dict(_GQA, head_dim=8),
    "olmo3": _DECODER,
    "smollm3": _GQA,
    "glm": dict(_GQA, head_dim=8, max_position_embeddings=64),
    "glm4": dict(_GQA, head_dim=8, max_position_embeddings=64),
    "exaone4": dict(_GQA, head_dim=8),
    "helium": dict(_GQA, head_dim=8),
    "seed_oss": dict(_GQA, head_dim=8),
    "apertus": _GQA,
    "arcee": _GQA,
    "ernie4_5": dict(_GQA, head_dim=8),
    "hunyuan_v1_dense": dict(_GQA, head_dim=8),
    "nemotron": dict(_GQA, head_dim=8),
    "gemma3_text": dict(_GQA, head_dim=8, final_logit_softcapping=3.0),
    "vaultgemma": dict(_GQA, head_dim=8, final_logit_softcapping=3.0),
    "cohere2": dict(_GQA, logit_scale=0.5),
    # mixtures of experts (exact with the router's auxiliary loss off, their default)
    "mixtral": dict(_GQA, head_dim=8, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        _GQA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32
    ),
    "qwen3_moe": dict(_GQA, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "olmoe": dict(_GQA, num_experts=4, num_experts_per_tok=2),
    "phimoe": dict(_GQA, num_local_experts=4, num_experts_per_tok=2),
    "granitemoe": dict(_GQA, num_local_experts=4, num_experts_per_tok=2, logits_scaling=4.0),
    "minimax": dict(_GQA, head_dim=8, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64),
    "glm4_moe": dict(
        _GQA,
        head_dim=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        max_position_embeddings=64,
    ),
    "hunyuan_v1_moe": dict(_GQA, head_dim=8, num_experts=4, moe_topk=2, max_position_embeddings=64),
    "flex_olmo": dict(_GQA, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64),
    # Gemma 3's image-text model, trained on text (its text config's soft-cap is set and must be ignored)
    "gemma3": dict(
        text_config=dict(_GQA, head_dim=8, final_logit_softcapping=3.0, max_position_embeddings=64),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        mm_tokens_per_image=4,
        image_token_index=VOCAB - 1,
        boi_token_index=VOCAB - 2,
        eoi_token_index=VOCAB - 3,
    ),
}
ARCHS = list(ARCH_KWARGS)


def tiny_model(arch: str, seed: int = 0, vocab: int = VOCAB):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(ARCH_KWARGS.get(arch, {}))
    if "text_config" in kwargs:  # an image-text model: the vocabulary is its text model's
        kwargs["text_config"] = dict(kwargs["text_config"], vocab_size=vocab)
    else:
        kwargs["vocab_size"] = vocab
    cfg = AutoConfig.for_model(arch, **kwargs)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # some configs list several end tokens
        ids = getattr(cfg, name, None)
        if ids is not None and not all(0 <= i < vocab for i in (ids if isinstance(ids, list) else [ids])):
            setattr(cfg, name, 0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # random non-zero biases so that a dropped bias cannot go unnoticed
        out = model.get_output_embeddings()
        if out.bias is not None:
            out.bias.normal_()
    return model.float().eval()


def save_reference(model, path, tokenizer=None):
    """A reference folder as slm-score and reference=live expect it: the model and its tokenizer."""
    from slm.data import builtin_tokenizer

    model.save_pretrained(path)
    (tokenizer or builtin_tokenizer()).save_pretrained(path)
