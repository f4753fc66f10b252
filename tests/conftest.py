"""Test-session set-up: one intra-op thread.

CI and the dev machine have 2 cores shared by pytest and the subprocesses some tests start; with torch's default
thread pool the contention made one evaluate() 17x slower (15.6 s vs 0.9 s) and test_ngram 52 s instead of 9 s.
Results do not depend on it (the golden curve is bitwise the same with 1 or 2 threads).
"""
import torch

torch.set_num_threads(1)


import json  # noqa: E402
import lzma  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import sentencepiece as spm  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


@pytest.fixture(scope="session")
def sp():
    """The official sp1024 tokenizer shipped with the sample."""
    return spm.SentencePieceProcessor(model_file=str(SAMPLE / "fineweb_1024_bpe.model"))


@pytest.fixture(scope="session")
def sample_ids(sp):
    """sample_ids(n): the first n ids of the shipped Wikipedia sample as the shards hold them (BOS + ids per doc)."""
    def first(n: int) -> list[int]:
        out = []
        with lzma.open(SAMPLE / "sample_wiki.jsonl.xz", "rt", encoding="utf-8") as f:
            for line in f:
                out += [1] + sp.encode(json.loads(line)["text"])
                if len(out) > n:
                    break
        return out[:n]
    return first


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory):
    """Train/val shards of the shipped sample (sp1024, 2 validation documents), built once per session."""
    from tools.data import build_shards
    out = tmp_path_factory.mktemp("sample_shards")
    build_shards([SAMPLE / "sample_wiki.jsonl.xz"], SAMPLE / "fineweb_1024_bpe.model", out, val_docs=2, workers=1,
                 progress=False)
    return out
