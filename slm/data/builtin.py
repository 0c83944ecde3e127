"""The built-in corpus: small arithmetic documents, with noise in the training split.

A document is a run of problems such as ``7*8=56;``. The answer (``56;``) follows
deterministically from the prompt, so a model can learn it; operands are uniform random digits
(irreducible loss that no model removes). The training split corrupts a share of problems
(``noise``): half of them get a wrong answer, the other half are replaced by junk (random
letters). A reference trained on the clean split predicts answers well and junk badly, which
is what lets excess-loss selection tell learnable tokens from noise.

Splits: ``train`` (noisy), ``clean`` (for the reference), ``validation`` (clean, with the
character spans of every answer, for the answer exact-match metric).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

VERSION = 1
OPS = "+-*"
JUNK = "abcdefghijklmnopqrstuvwxyz"
JUNK_KINDS = ("wrong_answer", "junk_problem")  # what a corrupted problem holds (the selection audit's kinds)
ALPHABET = "0123456789" + OPS + "=; \n" + JUNK  # every character the corpus can contain


@dataclass(frozen=True)
class CorpusConfig:
    n_train_docs: int = 3000
    n_clean_docs: int = 3000
    n_val_docs: int = 150
    min_problems: int = 6
    max_problems: int = 14
    max_operand: int = 9
    noise: float = 0.5  # share of corrupted problems in the training split
    seed: int = 1234

    def __post_init__(self):
        if not 0.0 <= self.noise < 1.0:
            raise ValueError(f"data.builtin.noise must be in [0, 1), got {self.noise}")
        if not 0 <= self.max_operand <= 99:
            raise ValueError(f"data.builtin.max_operand must be in [0, 99], got {self.max_operand}")
        if min(self.n_train_docs, self.n_clean_docs, self.n_val_docs) < 1:
            raise ValueError("data.builtin.n_*_docs must all be >= 1")
        if not 1 <= self.min_problems <= self.max_problems:
            raise ValueError("data.builtin needs 1 <= min_problems <= max_problems")

    def identity(self) -> dict:
        return {"version": VERSION, **asdict(self)}


def solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _problem(rng: random.Random, cfg: CorpusConfig) -> tuple[str, int]:
    """One problem's text and the offset where its answer starts."""
    op = rng.choice(OPS)
    a, b = rng.randint(0, cfg.max_operand), rng.randint(0, cfg.max_operand)
    if op == "-" and b > a:
        a, b = b, a
    prompt = f"{a}{op}{b}="
    return f"{prompt}{solve(a, op, b)};", len(prompt)


def _corrupt(rng: random.Random, text: str, answer_at: int, cfg: CorpusConfig) -> str:
    if rng.random() < 0.5:  # a wrong answer of plausible length
        right = int(text[answer_at:-1])
        wrong = right
        while wrong == right:
            wrong = rng.randint(0, cfg.max_operand * cfg.max_operand)
        return f"{text[:answer_at]}{wrong};"
    return "".join(rng.choice(JUNK) for _ in range(rng.randint(4, 12))) + ";"


def document(rng: random.Random, cfg: CorpusConfig, noise: float) -> dict:
    """``{"text", "answer_spans", "junk_spans", "clean_spans"}``: character spans of clean answers, of the
    corrupted parts (``[start, end, kind]``: 1 + the index of a wrong answer or a whole junk problem in
    ``JUNK_KINDS``), and of everything else (the selection audit)."""
    parts, spans, noisy, pos = [], [], [], 0
    for _ in range(rng.randint(cfg.min_problems, cfg.max_problems)):
        text, answer_at = _problem(rng, cfg)
        if noise and rng.random() < noise:
            text = _corrupt(rng, text, answer_at, cfg)
            wrong = text[answer_at - 1 : answer_at] == "="
            kind = 1 + JUNK_KINDS.index("wrong_answer" if wrong else "junk_problem")
            noisy.append([pos + (answer_at if wrong else 0), pos + len(text), kind])
        else:
            spans.append([pos + answer_at, pos + len(text)])
        parts.append(text)
        pos += len(text)
    clean, at = [], 0
    for start, end, _ in noisy:
        if start > at:
            clean.append([at, start])
        at = end
    if at < pos:
        clean.append([at, pos])
    return {"text": "".join(parts), "answer_spans": spans, "junk_spans": noisy, "clean_spans": clean}


def arithmetic_documents(cfg: CorpusConfig, split: str) -> list[dict]:
    """The documents of one split, reproducible from ``cfg.seed``."""
    sizes = {"train": cfg.n_train_docs, "clean": cfg.n_clean_docs, "validation": cfg.n_val_docs}
    if split not in sizes:
        raise ValueError(f"built-in corpus split must be one of {sorted(sizes)}, got {split!r}")
    rng = random.Random(f"{cfg.seed}-{split}")
    noise = cfg.noise if split == "train" else 0.0
    return [document(rng, cfg, noise) for _ in range(sizes[split])]
