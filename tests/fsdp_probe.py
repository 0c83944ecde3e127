"""Run under the FSDP launch environment (2 processes) by test_scale_out.py: shards a tiny model
through slm.parallel's FSDP2 path with a bf16 policy and checks what the issue asks of it.

Exits non-zero (an AssertionError) if a decoder layer is not its own shard unit, the tied head
and embedding came apart, or reference losses were rounded on their way into the forward.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_model  # noqa: E402

import slm  # noqa: E402
from slm.parallel import Engine, make_accelerator, requested_mode  # noqa: E402

assert requested_mode() == "fsdp2", requested_mode()
acc = make_accelerator("bf16", 1)
model = tiny_model("qwen2")  # tied output layer and embedding
lm = slm.SelectiveLM(model, ratio=0.5, selector="reference_loss", scope="sequence")
engine = Engine(acc, lm, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
                lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0), 1, 2, "bf16")  # fmt: skip

from torch.distributed.fsdp import FSDPModule  # noqa: E402

layers = model.model.layers
assert all(isinstance(layer, FSDPModule) for layer in layers), "each decoder layer must be its own shard unit"
assert isinstance(lm, FSDPModule) and not isinstance(model.lm_head, FSDPModule)
assert model.lm_head.weight is model.model.embed_tokens.weight, "the tied head and embedding came apart"

# Reference losses 1 + (T - t) * 1e-4: distinct in float32 (keep the lowest = the last tokens), all
# equal to 1.0 in bfloat16 (ties: the first tokens would win).
ids = torch.randint(1, 101, (2, 12), generator=torch.Generator().manual_seed(acc.process_index))
T = ids.shape[1]
ref = (1.0 + (T - torch.arange(T, dtype=torch.float32)) * 1e-4).expand(2, T).contiguous()
assert torch.equal(ref.bfloat16().float(), torch.ones_like(ref))
out = engine.model(input_ids=ids, labels=ids, ref_loss=ref)
valid = torch.ones_like(ids, dtype=torch.bool)
valid[:, 0] = False
expected = slm.select_tokens(-ref, 0.5, valid=valid, scope="sequence")
assert torch.equal(out.mask, expected), f"selection ranked rounded reference losses:\n{out.mask}\n{expected}"
engine.backward(out.loss / out.n_selected)
engine.clip_and_step(1.0)
assert model.lm_head.weight is model.model.embed_tokens.weight, "the tie did not survive a training step"
print(f"fsdp probe ok on rank {acc.process_index}", flush=True)
