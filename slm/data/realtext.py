"""The built-in real-text corpus: English prose that ships with Python, mixed with web-style junk.

The prose is the Python language reference's help topics (``pydoc_data``) and the standard
library's docstrings (read with ``ast``, nothing imported): real English, on every machine that
runs slm, no download. ``prose`` picks both (``all``), the help topics alone (``topics``: the
continued-pretraining demo's domain) or the docstrings alone (``docstrings``: its base model's general
text); ``piece_chars`` cuts long documents at paragraph breaks into pieces of about that many
characters (the 79 help topics become a few hundred documents to deal). Documents are dealt to splits
by a seeded shuffle:

* ``clean`` (a quarter of the documents): the reference's training text;
* ``validation`` (5%, held out): clean prose to judge every run on;
* ``train`` (the rest): each document's paragraphs, in order, with junk segments between them, so
  that about ``junk`` of the characters are junk: base64 and hex blobs, random characters,
  word-shuffled sentences (real words, no grammar), boilerplate (cookie banners, navigation,
  legal lines) and near-duplicate lines (one line repeated with small edits).

Only printable ASCII, tab and newline: the built-in character tokenizer covers all of it. The
prose differs a little between Python versions, which the corpus identity records.
"""

from __future__ import annotations

import ast
import base64
import functools
import os
import random
import re
import string
import sys
import sysconfig
from dataclasses import asdict, dataclass

VERSION = 2
PROSE = ("all", "topics", "docstrings")
SPLITS = ("train", "clean", "validation")
JUNK_KINDS = ("base64", "hex", "random_chars", "shuffled_words", "boilerplate", "near_duplicates")
_PRINTABLE = set(string.printable) - {"\x0b", "\x0c", "\r"}
_SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3", "ensurepip", "turtledemo"}
BOILERPLATE = (
    "We use cookies to improve your experience. By continuing to browse you agree to our use of cookies. "
    "Accept all | Reject all | Manage preferences",
    "Home | About us | Products | Blog | Careers | Contact | Privacy Policy | Terms of Service | Sitemap",
    "Copyright (c) {year} {company}. All rights reserved. Reproduction without permission is prohibited.",
    "Subscribe to our newsletter! Enter your email address to get the latest news, offers and updates.",
    "Share this article: Facebook Twitter LinkedIn Reddit Email Print | {n} comments | Report abuse",
    "You are here: Home > {section} > Article #{n} | Previous | Next | Back to top",
)


@dataclass(frozen=True)
class RealTextConfig:
    junk: float = 0.5  # share of the training text's characters that are junk
    clean_share: float = 0.25
    validation_share: float = 0.05
    min_chars: int = 200  # documents shorter than this are left out
    seed: int = 1234
    prose: str = "all"  # all | topics (the language reference's help topics) | docstrings (the standard library's)
    piece_chars: int = 0  # 0: whole documents; else cut at paragraph breaks into pieces of about this many characters

    def __post_init__(self):
        if self.prose not in PROSE:
            raise ValueError(f"data.realtext.prose must be one of {PROSE}, got {self.prose!r}")
        if int(self.piece_chars) < 0:
            raise ValueError(f"data.realtext.piece_chars must be >= 0 (0: whole documents), got {self.piece_chars}")
        if not 0.0 <= self.junk < 1.0:
            raise ValueError(f"data.realtext.junk must be in [0, 1), got {self.junk}")
        if not (0 < self.clean_share and 0 < self.validation_share and self.clean_share + self.validation_share < 1):
            raise ValueError("data.realtext needs clean_share > 0, validation_share > 0 and their sum below 1")

    def identity(self) -> dict:
        fields = asdict(self)
        for name, default in (("prose", "all"), ("piece_chars", 0)):  # corpora made before them keep their hash
            if fields[name] == default:
                del fields[name]
        return {"version": VERSION, "python": f"{sys.version_info[0]}.{sys.version_info[1]}", **fields}


def _ascii(text: str) -> str | None:
    """The text if (nearly) all of it is printable ASCII, with the rest dropped; else None."""
    kept = "".join(c for c in text.expandtabs(4) if c in _PRINTABLE)
    return kept if len(kept) >= 0.99 * len(text) else None


@functools.lru_cache(maxsize=3)
def prose_documents(min_chars: int = 200, prose: str = "all") -> tuple[str, ...]:
    """The prose documents, in a fixed order: help topics, then docstrings by file and position (``prose``:
    all, or the topics or docstrings alone)."""
    import pydoc_data.topics

    topics = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    found = topics + _docstrings() if prose != "topics" else topics
    if prose == "docstrings":
        found = found[len(topics) :]
    out, seen = [], set()
    for doc in found:
        doc = _ascii(doc.strip())
        key = " ".join(doc.split())[:200] if doc else None  # near-duplicates (a docstring per platform) count once
        if doc and len(doc) >= min_chars and key not in seen:
            seen.add(key)
            out.append(doc)
    return tuple(out)


def _docstrings() -> list[str]:
    found = []
    stdlib = sysconfig.get_paths()["stdlib"]
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        found.append(doc)
    return found


def _paragraphs(doc: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n\s*\n", doc) if p.strip()]


def pieces(doc: str, chars: int, min_chars: int) -> list[str]:
    """``doc`` cut at paragraph breaks into pieces of at least ``chars`` characters (a paragraph is never
    cut); a last piece shorter than ``min_chars`` joins the one before it."""
    out, current = [], []
    for para in _paragraphs(doc):
        current.append(para)
        if sum(map(len, current)) >= chars:
            out.append("\n\n".join(current))
            current = []
    if current:
        tail = "\n\n".join(current)
        if out and len(tail) < min_chars:
            out[-1] += "\n\n" + tail
        else:
            out.append(tail)
    return out


def junk_segment(rng: random.Random, length: int, words: list[str], kind: str | None = None) -> str:
    """One segment of web-style junk of about ``length`` characters."""
    kind = kind or rng.choice(JUNK_KINDS)
    length = max(20, length)
    if kind == "base64":
        blob = base64.b64encode(bytes(rng.getrandbits(8) for _ in range(length * 3 // 4))).decode()
        return "\n".join(blob[i : i + 76] for i in range(0, len(blob), 76))
    if kind == "hex":
        return " ".join(f"{rng.getrandbits(32):08x}" for _ in range(length // 9 + 1))
    if kind == "random_chars":
        pool = string.ascii_letters + string.digits + string.punctuation + " "
        return "".join(rng.choice(pool) for _ in range(length))
    if kind == "shuffled_words":
        out = []
        while sum(map(len, out)) + len(out) < length:
            out.append(rng.choice(words))
        return " ".join(out) + "."
    if kind == "boilerplate":
        lines = []
        while sum(map(len, lines)) < length:
            line = rng.choice(BOILERPLATE).format(
                year=rng.randint(1998, 2025),
                n=rng.randint(1, 999),
                company=rng.choice(("Acme Corp", "Example Media", "WebSite Ltd")),
                section=rng.choice(("News", "Tech", "Sports", "Life")),
            )
            lines.append(line)
        return "\n".join(lines)
    base = " ".join(rng.choice(words) for _ in range(rng.randint(6, 12)))
    lines = []
    while sum(map(len, lines)) < length:  # one line repeated with small edits
        lines.append(f"{base} ({rng.randint(1, 99)})" if rng.random() < 0.5 else base)
    return "\n".join(lines)


def realtext_documents(cfg: RealTextConfig, split: str) -> list[dict]:
    """The documents of one split as ``{"text": ...}`` rows (deterministic for ``cfg``)."""
    if split not in SPLITS:
        raise ValueError(f"the realtext corpus has splits {SPLITS}, not {split!r}")
    docs = list(prose_documents(cfg.min_chars, cfg.prose))
    if cfg.piece_chars:
        docs = [p for doc in docs for p in pieces(doc, cfg.piece_chars, cfg.min_chars)]
    random.Random(cfg.seed).shuffle(docs)
    n_val, n_clean = int(len(docs) * cfg.validation_share), int(len(docs) * cfg.clean_share)
    if split == "validation":
        return [{"text": d} for d in docs[:n_val]]
    if split == "clean":
        return [{"text": d} for d in docs[n_val : n_val + n_clean]]
    rng = random.Random(cfg.seed + 1)
    words = sorted({w for d in docs[n_val + n_clean :] for w in re.findall(r"[A-Za-z]{3,}", d)})
    out = []
    for doc in docs[n_val + n_clean :]:
        segments, owed = [], 0.0  # junk characters still to place to keep the mix at cfg.junk
        for para in _paragraphs(doc):
            owed += len(para) * cfg.junk / (1 - cfg.junk)
            junk = []
            while owed >= 20:
                length, kind = int(min(owed, rng.randint(60, 400))), rng.choice(JUNK_KINDS)
                junk.append((junk_segment(rng, length, words, kind), kind))
                owed -= len(junk[-1][0])
            segments += [(para, None), *junk] if rng.random() < 0.5 else [*junk, (para, None)]  # junk before or after
        text, spans, junk_spans, at = [], [], [], 0
        for i, (seg, kind) in enumerate(segments):
            if i:
                at += 2  # the paragraph break: neither clean text nor junk
            if kind is None:
                spans.append([at, at + len(seg)])
            else:
                junk_spans.append([at, at + len(seg), 1 + JUNK_KINDS.index(kind)])
            text.append(seg)
            at += len(seg)
        out.append({"text": "\n\n".join(text), "clean_spans": spans, "junk_spans": junk_spans})
    return out
