"""Byte LUTs against decoding real text with both shipped tokenizers."""
import json
import lzma
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from eval.bpb import build_byte_luts

ROOT = Path(__file__).resolve().parents[1]
MODELS = [ROOT / "data/sample/fineweb_1024_bpe.model", ROOT / "data/sample/fineweb_8192_bpe.model"]
UNK_MARK = "\ue000"  # a private-use character the sample text does not contain: the decoded surface of unk


def _docs(n=30, suffix=""):
    with lzma.open(ROOT / "data/sample/sample_wiki.jsonl.xz", "rt") as f:
        return [json.loads(line)["text"][:3000] + suffix for _, line in zip(range(n), f)]


def _proto(path, no_space_piece=False, unk_surface=UNK_MARK):
    m = pb.ModelProto()
    m.ParseFromString(Path(path).read_bytes())
    m.trainer_spec.unk_surface = unk_surface
    if no_space_piece:
        for piece in m.pieces:
            if piece.piece == "\u2581":
                piece.type = pb.ModelProto.SentencePiece.UNUSED
    return spm.SentencePieceProcessor(model_proto=m.SerializeToString())


def _is_boundary(sp, i):
    return sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)


def _bytes_decoded_per_segment(sp, ids):
    """Cut the document at every boundary id and decode each run of ids alone with SentencePiece's decoder.

    The decoder drops the U+2581 of the first piece of what it decodes, the space nobody wrote before a document's
    first word; cutting at boundary ids makes it do the same after an unknown id. That is the challenge's rule
    (the README's "Metric"): boundary ids are worth 0 bytes and a leading space right after one is not counted.
    """
    total, run = 0, []
    for i in [*ids, None]:
        if i is None or _is_boundary(sp, i):
            total += len(sp.decode(run).encode("utf-8"))
            run = []
        else:
            run.append(i)
    return total


def _bytes_from_full_text(sp, ids):
    """The whole document decoded at once, unknown ids shown as UNK_MARK, minus what the rule does not count: each
    unknown character (its true bytes are gone: the tokenizer kept no trace of them) and a space right after it."""
    text = sp.decode(ids)
    assert UNK_MARK not in sp.decode([i for i in ids if not sp.is_unknown(i)])
    return len(text.replace(UNK_MARK + " ", "").replace(UNK_MARK, "").encode("utf-8"))


@pytest.mark.parametrize("model", MODELS, ids=["sp1024", "sp8192"])
@pytest.mark.parametrize("no_space_piece", [False, True])
def test_lut_bytes_equal_decoded_utf8(model, no_space_piece):
    """The LUT byte sum over a BOS-separated stream equals two independent byte counts from the decoder.

    Issue 2 (sp1024 counted 40 bytes fewer than the decoded text of these 30 docs): the shipped sp1024 has
    byte_fallback=false, so characters outside its vocabulary (in the sample: accented and Greek letters, CJK, even
    [ ] < > = + _) become the unk id 3. The metric makes unk a boundary id like BOS: worth 0 bytes, and the next
    piece's leading space does not count ("1 if has_leading_space[y] and x is not a boundary token"), exactly as
    the challenge's own train_gpt.py computes it. So "x \u2713 (a)" -> x, \u2581, <unk>, \u2581(, a, ) counts the
    space before the unknown character but not the one after it. The gap was that 1 byte for each of the 40 unks
    followed by a space-led piece, measured against text that still held those spaces; the LUTs follow the rule
    and stay as they are. With no U+2581 piece (the "20% optimistic" pitfall) sp8192 falls back to the <0x20> byte
    for spaces, while sp1024, which has no byte pieces, turns standalone spaces into unk: both references agree.
    """
    sp = _proto(model, no_space_piece)
    luts = build_byte_luts(sp)
    # byte-fallback pieces only exist in sp8192; sp1024 maps such characters to unk (0 bytes, text lost)
    docs = [sp.encode(t) for t in _docs(suffix=" 12 x" if "1024" in model.name else " 12 \u00e9\u4e2d\U0001F600 x")]
    stream = np.concatenate([np.array([sp.bos_id()] + d, dtype=np.int64) for d in docs])
    counted = luts.token_bytes(stream[:-1], stream[1:]).sum()
    assert counted == sum(_bytes_decoded_per_segment(sp, d) for d in docs)
    assert counted == sum(_bytes_from_full_text(sp, d) for d in docs)
    if "1024" in model.name:  # the sample does exercise the unk-then-space case this test is about
        unk_then_space = sum(sp.is_unknown(a) and luts.has_leading_space[b] for d in docs for a, b in zip(d, d[1:]))
        assert unk_then_space >= 10


def test_lut_rules():
    sp = spm.SentencePieceProcessor(model_file=str(MODELS[0]))
    luts = build_byte_luts(sp, 1030)
    assert luts.is_boundary[[0, 1, 2, 3, 1029]].all() and (luts.base_bytes[[0, 1, 2, 3]] == 0).all()
    space = sp.piece_to_id("\u2581the") if sp.piece_to_id("\u2581the") != 3 else sp.piece_to_id("\u2581t")
    assert luts.has_leading_space[space]
    assert luts.token_bytes(np.array([1]), np.array([space]))[0] == luts.base_bytes[space]
    assert luts.token_bytes(np.array([3]), np.array([space]))[0] == luts.base_bytes[space]  # unk is a boundary
    assert luts.token_bytes(np.array([space]), np.array([space]))[0] == luts.base_bytes[space] + 1
    if MODELS[1].exists():
        sp8 = spm.SentencePieceProcessor(model_file=str(MODELS[1]))
        l8 = build_byte_luts(sp8)
        assert l8.base_bytes[sp8.piece_to_id("<0xE4>")] == 1
