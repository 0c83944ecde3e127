"""How reference stores scale with the corpus: slm-score's wall time and peak memory, the store's size
on disk, and the wall time and peak memory of a 1-step slm-train that opens the store.

    python scripts/store_scaling.py OUT 2 8 32        # corpus sizes in millions of tokens

Each size gets a generated text corpus (the built-in character tokenizer: one token per character,
256-token blocks), is packed once (not timed), scored by a tiny reference (``reference=live``),
timed while it opens the store (what a training start does with it), and trained for one step on
the store (that wall time includes the eval at steps 0 and 1 on a validation split of 0.1% of the
corpus). Peak memory is the peak resident set size of the whole command (``/usr/bin/time``).
Prints a Markdown table and writes it to OUT/store_scaling.md.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
WORDS = ("the of and to in is was for on that with as by at from his her are be this which or an had not but "
         "were they their have one all been has more when who will no would there what so out up into about "
         "than them can only other new some time could these two may then first any like now my over such our "
         "man me even most made after also did many before must through back years where much your way well "
         "down should because each just those people how too little state good very make world still own see"
         ).split()  # fmt: skip
MODEL = ["model.config.hidden_size=64", "model.config.intermediate_size=128", "model.config.num_attention_heads=2",
         "model.config.num_key_value_heads=2"]  # fmt: skip


def corpus(path: Path, n_tokens: int) -> None:
    rng = random.Random(0)
    with path.open("w") as f:
        written = 0
        while written < n_tokens:
            doc = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200))) + ".\n\n"
            f.write(doc)
            written += len(doc)


def timed(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of ``cmd``."""
    out = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    wall, kib = out.stderr.strip().splitlines()[-1].split()
    return float(wall), int(kib) / 1024


def main() -> None:
    out, sizes = Path(sys.argv[1]).resolve(), [float(s) for s in sys.argv[2:]] or [2, 8, 32]
    out.mkdir(parents=True, exist_ok=True)
    from transformers import AutoConfig, AutoModelForCausalLM

    from slm.data import DataConfig, build, builtin_tokenizer
    from slm.reference import expected_store, load_stored

    ref = out / "reference"
    if not ref.exists():  # a tiny random reference: what is measured is the store, not the scores
        cfg = AutoConfig.for_model("llama", vocab_size=len(builtin_tokenizer()), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
        AutoModelForCausalLM.from_config(cfg).save_pretrained(ref)
        builtin_tokenizer().save_pretrained(ref)  # a live reference comes with its tokenizer
    rows = ["| corpus (tokens) | `slm-score` wall | `slm-score` peak RSS | store on disk | bytes per token | "
            "opening the store (`load_stored`) | 1-step `slm-train` on the store: wall / peak RSS |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for m in sizes:
        n = int(m * 1e6)
        text = out / f"corpus_{m:g}M.txt"
        if not text.exists():
            corpus(text, n)
        data = ["data=files", f"data.source={text}", "data.block_size=256", f"data.cache_dir={out / 'cache'}",
                "data.val_fraction=0.001", *MODEL]  # fmt: skip
        store = out / f"store_{m:g}M"
        shutil.rmtree(store, ignore_errors=True)  # scored from scratch, never reused
        packed = DataConfig(source=str(text), block_size=256, val_fraction=0.001, cache_dir=str(out / "cache"))
        build(packed)  # packed once, not timed
        score_wall, score_rss = timed([str(BIN / "slm-score"), *data, "reference=live", f"reference.path={ref}",
                                       f"out_dir={store}", "score_batch_size=64"], out)  # fmt: skip
        size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        t0 = time.perf_counter()
        load_stored(store, expected_store(build(packed)))  # what a training start does with the store
        open_s = time.perf_counter() - t0
        one_step = ["trainer.max_steps=1", "trainer.eval_every=1000", "logger=none", "trainer.progress=false",
                    f"hydra.run.dir={out / f'run_{m:g}M'}", "trainer.overwrite=true"]  # fmt: skip
        train_wall, train_rss = timed([str(BIN / "slm-train"), *data, "reference=stored",
                                       f"reference.scores_dir={store}", *one_step], out)  # fmt: skip
        cells = [f"{m:g}M", f"{score_wall:.0f} s", f"{score_rss:.0f} MiB", f"{size / 1e6:.1f} MB", f"{size / n:.2f}",
                 f"{open_s:.3f} s", f"{train_wall:.1f} s / {train_rss:.0f} MiB"]  # fmt: skip
        rows.append("| " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    (out / "store_scaling.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
