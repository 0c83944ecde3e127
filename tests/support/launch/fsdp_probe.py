"""Run under the FSDP launch environment (2 processes) by test_scale_out.py: shards tiny models
through slm.parallel's FSDP2 path with the config's bf16 policy and checks what the issues ask of it.

Exits non-zero (an AssertionError) if a decoder layer, the embedding or the head is not in its own
shard unit, a rank holds more than its shard of the embedding or head between steps, the tied head
and embedding came apart, reference losses were rounded on their way into the forward, or a
checkpoint save materialised a tensor larger than one rank's shard.
"""

import sys
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: support and test_hf_trainer
from accelerate.utils import broadcast_object_list  # noqa: E402
from support.archs import tiny_model  # noqa: E402

import slm  # noqa: E402
from slm.parallel import Engine, make_accelerator, requested_mode  # noqa: E402


class LargestTensor(TorchDispatchMode):
    """The most elements of any floating-point tensor an op produced while active (gathers included;
    byte tensors are left out: DCP exchanges its pickled save plans as those)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if type(t) is torch.Tensor and t.is_floating_point():
                self.largest = max(self.largest, t.numel())
        return out


def shard_of(p) -> int:
    return p.to_local().numel() if type(p).__name__ == "DTensor" else p.numel()


def main() -> None:
    assert requested_mode() == "fsdp2", requested_mode()
    acc = make_accelerator("bf16", 1)
    from torch.distributed.fsdp import FSDPModule

    for arch in ("qwen2", "llama"):  # tied, then untied output layer
        model = tiny_model(arch)
        tied = arch == "qwen2"
        lm = slm.SelectiveLM(model, ratio=0.5, selector="reference_loss", scope="sequence")
        engine = Engine(acc, lm, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
                        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0), 1, 2, "bf16")  # fmt: skip
        head, emb = model.lm_head, model.model.embed_tokens
        assert all(isinstance(layer, FSDPModule) for layer in model.model.layers), "each decoder layer is a unit"
        assert isinstance(lm, FSDPModule) and isinstance(head, FSDPModule) and isinstance(emb, FSDPModule)
        assert isinstance(model.model.norm, FSDPModule), "the final norm sits in the head's unit"
        assert (head.weight is emb.weight) == tied, "the tied head and embedding came apart"

        # Reference losses 1 + (T - t) * 1e-4: distinct in float32 (keep the lowest = the last tokens), all
        # equal to 1.0 in bfloat16 (ties: the first tokens would win).
        ids = torch.randint(1, 101, (2, 12), generator=torch.Generator().manual_seed(acc.process_index))
        T = ids.shape[1]
        ref = (1.0 + (T - torch.arange(T, dtype=torch.float32)) * 1e-4).expand(2, T).contiguous()
        assert torch.equal(ref.bfloat16().float(), torch.ones_like(ref))
        for _ in range(2):
            out = engine.model(input_ids=ids, labels=ids, ref_loss=ref)
            valid = torch.ones_like(ids, dtype=torch.bool)
            valid[:, 0] = False
            expected = slm.select_tokens(-ref, 0.5, valid=valid, scope="sequence")
            assert torch.equal(out.mask, expected), (
                f"selection ranked rounded reference losses:\n{out.mask}\n{expected}"
            )
            engine.backward(out.loss / out.n_selected)
            engine.clip(1.0)
            engine.step()
            # Between steps each rank holds only its shard of the embedding and of the head.
            for name, p in (("head", head.weight), ("embedding", emb.weight)):
                assert type(p).__name__ == "DTensor", f"{name} is whole between steps"
                assert shard_of(p) <= -(-p.shape[0] // 2) * p.shape[1], f"{name}: {shard_of(p)} elements on one rank"
            assert (head.weight is emb.weight) == tied, "the tie did not survive a training step"
        assert lm.exact_head

        # A checkpoint never materialises more than one rank's shard of any tensor ...
        shard = max(shard_of(p) for p in lm.parameters())
        whole = max(p.numel() for p in lm.parameters())
        with tempfile.TemporaryDirectory() as d:
            folder = Path(broadcast_object_list([d])[0]) / "ckpt"  # rank 0's folder
            if acc.is_main_process:
                folder.mkdir()
            acc.wait_for_everyone()
            with LargestTensor() as probe:
                engine.save_checkpoint(folder)
            assert probe.largest <= shard < whole, (
                f"{arch}: saving materialised {probe.largest} elements (shard {shard})"
            )
            # ... while the consolidated export does gather (so the probe can see a gather).
            with LargestTensor() as gather:
                engine.full_state_dict()
            assert gather.largest >= whole, gather.largest
            acc.wait_for_everyone()
        print(f"fsdp probe ok on rank {acc.process_index} ({arch})", flush=True)


if __name__ == "__main__":  # a launch, not an import (collected or imported by mistake, it would run)
    main()
