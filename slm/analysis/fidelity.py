"""``python -m slm.analysis.fidelity``: how far the sparse backward's gradient is from the exact one, per layer.

On a step of the real-text demo (its model and a batch of its noisy training text, block 256, batch
8): the model of ``--model-dir``, or the demo's model trained for ``TRAIN_STEPS`` plain steps from
its initialisation (so that the gradients are those of a model that has learned something). The
tokens are the top ``ratio`` by the model's own loss; the exact selective step and the sparse one
train the same tokens, and each parameter group's gradient is compared: cosine similarity and
``|g_sparse - g_exact| / |g_exact|``.
"""

from __future__ import annotations

import argparse
from importlib.resources import files

import torch
import yaml

from slm.data import DataConfig, build
from slm.model import ModelConfig, SelectiveLM, build_model, shifted_valid, token_losses
from slm.model.sparse_backward import decoder_layers
from slm.selection import select_tokens

TRAIN_STEPS = 100
BATCH = 8
RATIOS = (0.3, 0.6)


def _demo_model_and_batches(model_dir: str | None, seed: int):
    conf = files("slm.conf")
    model_cfg = yaml.safe_load((conf / "model" / "tiny.yaml").read_text())
    data_cfg = yaml.safe_load((conf / "data" / "realtext.yaml").read_text())
    data_cfg["tokenizer"] = model_cfg["tokenizer"]  # the config's ${model.tokenizer}
    packed = build(DataConfig(**data_cfg))
    train = packed["train"].with_format("torch")
    batches = [train[i * BATCH : (i + 1) * BATCH]["input_ids"] for i in range(TRAIN_STEPS + 1)]
    if model_dir is not None:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_dir).float().train(), batches[-1], 0
    model = build_model(ModelConfig.of(model_cfg), vocab_size=len(packed.tokenizer), seed=seed).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    for ids in batches[:-1]:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, batches[-1], TRAIN_STEPS


def _groups(model) -> dict[str, list[str]]:
    """Parameter names by layer, bottom to top: embedding, each decoder layer, the rest (final norm, head)."""
    layer_of = {}
    for i, layer in enumerate(decoder_layers(model)):
        for p in layer.parameters():
            layer_of[id(p)] = f"layer {i}"
    emb = id(model.get_input_embeddings().weight)
    groups: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        group = layer_of.get(id(p), "embedding" if id(p) == emb else "final norm + head")
        groups.setdefault(group, []).append(name)
    return groups


def _grads(model, lm, ids, mask) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    lm(input_ids=ids, labels=ids, loss_mask=mask).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(sparse: dict, exact: dict, names: list[str]) -> tuple[float, float]:
    a = torch.cat([sparse[n].flatten() for n in names if n in exact])
    b = torch.cat([exact[n].flatten() for n in names if n in exact])
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    return cos, ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def fidelity_report(model_dir: str | None = None, seed: int = 0) -> str:
    """The table: per parameter group, cosine / relative error at each ratio and depth (all, the top half)."""
    model, ids, trained = _demo_model_and_batches(model_dir, seed)
    n_layers = len(_groups(model)) - 2
    depths = {"all": True, f"top {max(1, n_layers // 2)}": max(1, n_layers // 2)}
    with torch.no_grad():
        own = token_losses(model, ids, ids)
    exact_lm = SelectiveLM(model)
    groups = _groups(model)
    source = model_dir or f"the real-text demo's model after {trained} plain steps"
    lines = [
        f"slm-bench --fidelity: {source}; a batch of {ids.shape[0]}x{ids.shape[1]} noisy training tokens; the top "
        "share by the model's own loss; sparse against exact gradients (cosine similarity / relative error)",
        "",
    ]
    cols = [f"{d}, {r}" for r in RATIOS for d in depths]
    lines += ["| parameters | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    rows: dict[str, list[str]] = {g: [] for g in [*groups, "total"]}
    for ratio in RATIOS:
        mask = select_tokens(own, ratio, shifted_valid(ids), "batch")
        exact = _grads(model, exact_lm, ids, mask)
        for depth in depths.values():
            sparse = _grads(model, SelectiveLM(model, sparse_backward=depth), ids, mask)
            for group, names in [*groups.items(), ("total", list(exact))]:
                cos, rel = _compare(sparse, exact, names)
                rows[group].append(f"{cos:.4f} / {rel:.3f}")
    lines += [f"| {g} | " + " | ".join(cells) + " |" for g, cells in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m slm.analysis.fidelity", description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default=None, help="a trained model folder (default: the demo's, trained briefly)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(fidelity_report(args.model_dir, args.seed), flush=True)


if __name__ == "__main__":
    main()
