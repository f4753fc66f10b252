"""Tests for tools/data.py: build vs the reference prep_shards.py, tokenizer settings, the tune split, verify/info,
download."""
from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

import tools.data as data
from submission.data import HEADER_BYTES, ShardError, read_shard, write_shard
from tools.commands.cli import main

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
SAMPLE = REPO / "data/sample/sample_wiki.jsonl.xz"
SP1024 = REPO / "data/sample/fineweb_1024_bpe.model"
PREP = SHARED / "benchdata/prep_shards.py"
needs_shared = pytest.mark.skipif(not PREP.is_file(), reason=f"reference data {SHARED} absent (CI has it beside "
                                                             "the repo)")


def run_prep_shards(docs: Path, out: Path, split: str, shard_tokens: int = 100_000_000) -> None:
    """The reference script, in a subprocess, with its shard size optionally patched."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import prep_shards; "
            "prep_shards.SHARD = int(sys.argv[2]); prep_shards.main(*sys.argv[3:7])")
    subprocess.run([sys.executable, "-c", code, str(PREP.parent), str(shard_tokens), str(docs), str(SP1024),
                    str(out), split], check=True, capture_output=True)


def sample_lines() -> list[str]:
    with lzma.open(SAMPLE, "rt", encoding="utf-8") as f:
        return f.readlines()


def write_xz(path: Path, lines: list[str]) -> Path:
    with lzma.open(path, "wt", encoding="utf-8", preset=0) as f:  # fast: the test measures tokens, not xz
        f.writelines(lines)
    return path


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def split_docs(folder: Path, split: str) -> list[tuple[int, ...]]:
    """A split's documents read independently of tools/data.py: the shards' tokens in name order, cut before
    every BOS (1)."""
    tokens = np.concatenate([read_shard(p) for p in sorted(folder.glob(f"fineweb_{split}_*.bin"))] or [[]])
    return [tuple(d.tolist()) for d in np.split(tokens, np.flatnonzero(tokens == 1)) if d.size]


def raw_sha256(folder: Path, split: str) -> str:
    """sha256 of a split's token bytes straight from the files (everything after each header, shards in order)."""
    h = hashlib.sha256()
    for path in sorted(folder.glob(f"fineweb_{split}_*.bin")):
        h.update(path.read_bytes()[HEADER_BYTES:])
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- build

@needs_shared
def test_build_docs_val_matches_prep_shards_token_for_token(tmp_path):
    docs = SHARED / "benchdata/docs_val.jsonl.xz"
    run_prep_shards(docs, tmp_path / "ref", "val")
    report = data.build_shards([docs], SP1024, tmp_path / "ours", split="val", workers=2, progress=False)
    assert report.tokens == {"val": 1_571_521} and report.docs == {"val": 2095}
    assert files_of(tmp_path / "ours") == files_of(tmp_path / "ref")
    raw = (tmp_path / "ref/fineweb_val_000000.bin").read_bytes()[HEADER_BYTES:]
    assert report.val_fingerprint == hashlib.sha256(raw).hexdigest()


@needs_shared
def test_build_document_split_and_shard_cuts_match_prep_shards(tmp_path):
    lines = sample_lines()
    run_prep_shards(write_xz(tmp_path / "v.jsonl.xz", lines[:60]), tmp_path / "ref", "val", shard_tokens=200_000)
    run_prep_shards(write_xz(tmp_path / "t.jsonl.xz", lines[60:]), tmp_path / "ref", "train", shard_tokens=200_000)
    report = data.build_shards([SAMPLE], SP1024, tmp_path / "ours", val_docs=60, workers=2, shard_tokens=200_000,
                               progress=False)
    ref = files_of(tmp_path / "ref")
    assert len(ref) > 4  # several shards per split, so the cuts are exercised
    assert files_of(tmp_path / "ours") == ref
    assert report.docs == {"val": 60, "train": len(lines) - 60}
    assert report.shards["train"] == sorted(n for n in ref if "train" in n)


@needs_shared
def test_build_reads_plain_and_gz_files_in_order(tmp_path):
    lines = sample_lines()
    (tmp_path / "a.jsonl").write_text("".join(lines[:100]), encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(lines[100:])
    run_prep_shards(SAMPLE, tmp_path / "ref", "train")
    data.build_shards([tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"], SP1024, tmp_path / "ours", split="train",
                      workers=1, progress=False)
    assert files_of(tmp_path / "ours") == files_of(tmp_path / "ref")


def test_build_val_fraction_is_a_document_split(tmp_path):
    report = data.build_shards([SAMPLE], SP1024, tmp_path, val_fraction=0.1, workers=1, progress=False)
    assert report.docs == {"val": 25, "train": 222}  # round(0.1 * 247)
    sp = spm.SentencePieceProcessor(model_file=str(SP1024))
    texts = [json.loads(line)["text"] for line in sample_lines()]
    expected_val = np.concatenate([[1] + sp.encode(t) for t in texts[:25]])
    np.testing.assert_array_equal(read_shard(tmp_path / "fineweb_val_000000.bin"), expected_val)
    train = read_shard(tmp_path / "fineweb_train_000000.bin")
    assert train[0] == 1 and (train == 1).sum() == 222


def test_build_bad_input_names_file_and_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    good = json.dumps({"text": "hello world"})
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(f"{good}\n\n{{\"text\": \"unterminated\n{good}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON"):
        data.build_shards([bad_json], SP1024, out, split="train", workers=1, progress=False)
    no_text = tmp_path / "notext.jsonl"
    no_text.write_text(f'{good}\n{{"body": "x"}}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r'notext\.jsonl:2: no "text"'):
        data.build_shards([SAMPLE, no_text], SP1024, out, split="val", workers=2, progress=False)
    (tmp_path / "broken.jsonl.xz").write_bytes(b"not xz data")
    with pytest.raises(ValueError, match=r"broken\.jsonl\.xz: unreadable after line 0"):
        data.build_shards([tmp_path / "broken.jsonl.xz"], SP1024, out, val_fraction=0.5, progress=False)
    with pytest.raises(ValueError, match="hold only 247 documents"):
        data.build_shards([SAMPLE], SP1024, out, val_docs=300, workers=1, progress=False)
    assert list(out.iterdir()) == []  # no shard, no staging folder


def test_build_refuses_existing_shards_unless_overwrite(tmp_path):
    data.build_shards([SAMPLE], SP1024, tmp_path, split="train", shard_tokens=500_000, workers=1, progress=False)
    assert len(list(tmp_path.glob("fineweb_train_*.bin"))) == 3
    with pytest.raises(ValueError, match="--overwrite"):
        data.build_shards([SAMPLE], SP1024, tmp_path, split="train", workers=1, progress=False)
    data.build_shards([SAMPLE], SP1024, tmp_path, split="train", overwrite=True, workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fineweb_train_000000.bin"]  # stale cuts removed


def test_build_cli_prints_fingerprint(tmp_path, capsys):
    rc = main(["data", "build", str(SAMPLE), "--tokenizer", str(SP1024), "--out", str(tmp_path), "--val-docs", "10",
               "--workers", "1", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "build:ok" in out and "val_docs:10" in out and "train_docs:237" in out
    raw = (tmp_path / "fineweb_val_000000.bin").read_bytes()[HEADER_BYTES:]
    assert f"val_fingerprint:{hashlib.sha256(raw).hexdigest()}" in out
    rc = main(["data", "build", str(tmp_path / "missing.jsonl"), "--tokenizer", str(SP1024), "--out",
               str(tmp_path), "--split", "val"])
    assert rc == 2 and "missing.jsonl not found" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["download", "build", "tokenizer", "split", "verify", "info"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", command, "--help"])
    assert exit_info.value.code == 0 and len(capsys.readouterr().out) > 400


# ---------------------------------------------------------------------------------------------------- tune split

def test_build_tune_docs_are_the_documents_after_val_and_not_in_train(tmp_path):
    report = data.build_shards([SAMPLE], SP1024, tmp_path, val_docs=10, tune_docs=20, shard_tokens=200_000, workers=1,
                               progress=False)
    sp = spm.SentencePieceProcessor(model_file=str(SP1024))
    expected = [tuple([1] + sp.encode(json.loads(line)["text"])) for line in sample_lines()]
    val, tune, train = (split_docs(tmp_path, s) for s in ("val", "tune", "train"))
    assert (val, tune, train) == (expected[:10], expected[10:30], expected[30:])
    assert not set(tune) & set(train) and not set(tune) & set(val)
    assert report.docs == {"val": 10, "train": 217, "tune": 20}
    assert report.tokens["tune"] == sum(map(len, tune)) and report.shards["tune"] == ["fineweb_tune_000000.bin"]
    assert report.tune_fingerprint == raw_sha256(tmp_path, "tune") != report.val_fingerprint
    assert len(report.shards["train"]) > 1  # the train shards are cut as before, after the tune documents


def test_build_tune_docs_errors_and_stale_tune_shards(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="tune_docs -1 must be >= 0"):
        data.build_shards([SAMPLE], SP1024, out, val_docs=10, tune_docs=-1, workers=1, progress=False)
    with pytest.raises(ValueError, match="with split 'val'"):
        data.build_shards([SAMPLE], SP1024, out, split="val", tune_docs=5, workers=1, progress=False)
    with pytest.raises(ValueError, match=r"--tune-docs 10 after 240 val documents needs 250 documents but \S*"
                                         r"sample_wiki\.jsonl\.xz hold only 247; pass --tune-docs 7 or fewer"):
        data.build_shards([SAMPLE], SP1024, out, val_docs=240, tune_docs=10, workers=1, progress=False)
    assert list(out.iterdir()) == []  # nothing written, no staging folder
    data.build_shards([SAMPLE], SP1024, out, val_docs=10, tune_docs=5, workers=1, progress=False)
    # A train split rebuilt beside old tune shards would share documents with them: they count as existing shards.
    with pytest.raises(ValueError, match="already has 3 val/train/tune shards"):
        data.build_shards([SAMPLE], SP1024, out, val_docs=10, workers=1, progress=False)
    report = data.build_shards([SAMPLE], SP1024, out, val_docs=10, overwrite=True, workers=1, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    assert report.tune_fingerprint is None and "tune" not in report.docs
    plain = tmp_path / "plain"
    data.build_shards([SAMPLE], SP1024, plain, val_docs=10, tune_docs=0, workers=1, progress=False)
    assert files_of(plain) == files_of(out)  # tune_docs=0 changes nothing


def test_split_moves_the_last_train_documents_into_tune(tmp_path):
    data.build_shards([SAMPLE], SP1024, tmp_path, val_docs=10, shard_tokens=200_000, workers=1, progress=False)
    before, val_files = split_docs(tmp_path, "train"), (tmp_path / "fineweb_val_000000.bin").read_bytes()
    train_shards = sorted(p.name for p in tmp_path.glob("fineweb_train_*.bin"))
    last_shard_docs = np.count_nonzero(read_shard(tmp_path / train_shards[-1]) == 1)
    n = 60
    assert n > last_shard_docs + 1  # the cut lies in an earlier shard than the last
    report = data.split_tune(tmp_path, n, shard_tokens=200_000)
    train, tune = split_docs(tmp_path, "train"), split_docs(tmp_path, "tune")
    assert train + tune == before and tune == before[-n:] and len(train) == 237 - n
    assert (report.tune_docs, report.train_docs) == (n, 237 - n)
    assert report.tune_tokens == sum(map(len, tune)) and report.train_tokens == sum(map(len, train))
    assert report.tune_fingerprint == raw_sha256(tmp_path, "tune")
    assert report.removed == [train_shards[-1]] and report.rewritten == [train_shards[-2]]
    assert report.train_shards == train_shards[:-1] == sorted(p.name for p in tmp_path.glob("fineweb_train_*.bin"))
    assert report.tune_shards == ["fineweb_tune_000000.bin", "fineweb_tune_000001.bin"]  # 200,000 tokens each
    assert (tmp_path / "fineweb_val_000000.bin").read_bytes() == val_files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder or temp file left
    verified = data.verify_dataset(tmp_path, progress=False)
    assert verified.ok and verified.tune.docs == n and verified.tune_fingerprint == report.tune_fingerprint
    snapshot = files_of(tmp_path)
    with pytest.raises(ValueError, match="already has 2 tune shards .*delete fineweb_tune_"):
        data.split_tune(tmp_path, 5)
    assert files_of(tmp_path) == snapshot


def test_split_cuts_at_a_document_start_across_shard_boundaries(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", [1, 2, 3, 1, 4])  # [1, 4] continues in the next shard
    write_shard(tmp_path / "fineweb_train_000001.bin", [5, 6, 1, 7])
    report = data.split_tune(tmp_path, 2)
    assert read_shard(tmp_path / "fineweb_tune_000000.bin").tolist() == [1, 4, 5, 6, 1, 7]
    assert read_shard(tmp_path / "fineweb_train_000000.bin").tolist() == [1, 2, 3]
    assert not (tmp_path / "fineweb_train_000001.bin").exists()
    assert (report.rewritten, report.removed, report.train_docs, report.train_tokens) == (
        ["fineweb_train_000000.bin"], ["fineweb_train_000001.bin"], 1, 3)

    cut_at_start = tmp_path / "b"
    cut_at_start.mkdir()
    for i, part in enumerate([[1, 2, 3], [1, 4, 5], [1, 6]]):
        write_shard(cut_at_start / f"fineweb_train_{i:06d}.bin", part)
    report = data.split_tune(cut_at_start, 2)  # the cut is shard 1's first token: that shard goes whole
    assert sorted(p.name for p in cut_at_start.iterdir()) == ["fineweb_train_000000.bin", "fineweb_tune_000000.bin"]
    assert read_shard(cut_at_start / "fineweb_tune_000000.bin").tolist() == [1, 4, 5, 1, 6]
    assert report.rewritten == [] and report.removed == ["fineweb_train_000001.bin", "fineweb_train_000002.bin"]


def test_split_refuses_to_empty_train_and_leaves_the_files_unchanged(tmp_path):
    data.build_shards([SAMPLE], SP1024, tmp_path, val_docs=10, shard_tokens=200_000, workers=1, progress=False)
    snapshot = files_of(tmp_path)
    for n in (237, 500):
        with pytest.raises(ValueError, match=r"--tune-docs \d+ but the train split in \S+ holds 237 documents "
                                             r"\(BOS 1\) and must keep at least one; pass --tune-docs 236 or fewer"):
            data.split_tune(tmp_path, n)
    with pytest.raises(ValueError, match="--tune-docs 0 must be >= 1"):
        data.split_tune(tmp_path, 0)
    assert files_of(tmp_path) == snapshot  # no shard changed, no staging folder
    cut = tmp_path / "cut"
    cut.mkdir()
    write_shard(cut / "fineweb_train_000000.bin", [5, 6, 1, 7, 8, 1, 9])  # starts inside a document
    with pytest.raises(ValueError, match="holds 2 documents"):
        data.split_tune(cut, 2)  # train would keep only the cut-off [5, 6]
    data.split_tune(cut, 1)
    assert read_shard(cut / "fineweb_train_000000.bin").tolist() == [5, 6, 1, 7, 8]


def test_verify_reports_tune_and_fails_on_tune_overlap(tmp_path, capsys):
    build = data.build_shards([SAMPLE], SP1024, tmp_path, val_docs=10, tune_docs=20, workers=1, progress=False)
    report = data.verify_dataset(tmp_path, progress=False)
    assert (report.tune.docs, report.tune.tokens, report.tune.shards) == (20, build.tokens["tune"],
                                                                          ["fineweb_tune_000000.bin"])
    assert report.tune_fingerprint == build.tune_fingerprint and report.ok
    assert (report.tune_train_overlap_docs, report.tune_val_overlap_docs, report.overlap_docs) == (0, 0, 0)

    tune_path, train_path = tmp_path / "fineweb_tune_000000.bin", tmp_path / "fineweb_train_000000.bin"
    tune, train = read_shard(tune_path), read_shard(train_path)
    starts = np.flatnonzero(tune == 1)
    cut = np.flatnonzero(train == 1)[50]
    write_shard(train_path, np.concatenate([train[:cut], tune[starts[3]:starts[4]], train[cut:]]))
    report = data.verify_dataset(tmp_path, progress=False)
    assert (report.tune_train_overlap_docs, report.tune_val_overlap_docs, report.overlap_docs) == (1, 0, 0)
    assert not report.ok and "1 of 20 tune documents also appear verbatim in train" in report.problems[0]
    assert data.verify_dataset(tmp_path, max_overlap_docs=1, progress=False).ok
    assert main(["data", "verify", str(tmp_path), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "tune_docs:20" in captured.out and "tune_train_overlap_docs:1" in captured.out
    assert f"tune_fingerprint:{build.tune_fingerprint}" in captured.out and "verify:fail" in captured.out
    assert "tune documents also appear verbatim in train" in captured.err

    write_shard(train_path, train)
    val = read_shard(tmp_path / "fineweb_val_000000.bin")
    write_shard(tune_path, np.concatenate([tune, val[np.flatnonzero(val == 1)[2]:np.flatnonzero(val == 1)[3]]]))
    report = data.verify_dataset(tmp_path, progress=False)
    assert (report.tune_train_overlap_docs, report.tune_val_overlap_docs, report.tune.docs) == (0, 1, 21)
    assert not report.ok and "1 of 21 tune documents also appear verbatim in val" in report.problems[0]
    assert main(["data", "info", str(tmp_path), "--quiet", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tune_val_overlap_docs"] == 1 and info["tune"]["docs"] == 21 and info["ok"] is False


def test_the_trainer_never_reads_tune_shards(tmp_path, monkeypatch):
    """The trainer's own shard pattern (captured from submission.train) matches train shards only, so a folder with
    a tune split trains on exactly the batches of the same folder without it."""
    import submission.train as trainer
    from submission.config import ModelConfig, TrainConfig
    from submission.data import TokenLoader

    with_tune = tmp_path / "with_tune"
    data.build_shards([SAMPLE], SP1024, with_tune, val_docs=10, shard_tokens=200_000, workers=1, progress=False)
    data.split_tune(with_tune, 40)
    without = tmp_path / "without"
    without.mkdir()
    for path in with_tune.glob("fineweb_[vt][ar]*_*.bin"):  # val and train, not tune
        shutil.copyfile(path, without / path.name)
    assert len(list(with_tune.glob("fineweb_tune_*.bin"))) == 1 and not list(without.glob("fineweb_tune_*"))

    patterns = []

    class Captured(Exception):
        pass

    class Recording(TokenLoader):
        def __init__(self, pattern, *args, **kwargs):
            patterns.append(pattern)
            raise Captured

    monkeypatch.setattr(trainer, "TokenLoader", Recording)
    with pytest.raises(Captured):
        trainer.train(ModelConfig(vocab_size=1024, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2,
                                  xsa_last_n=4, rope_dims=8, loop_layers=(1, 2), parallel_last_n=2),
                      TrainConfig(data_dir=str(with_tune), tokenizer_path=str(SP1024), run_dir=str(tmp_path / "run"),
                                  seq_len=64, train_batch_tokens=1024, micro_batch_tokens=1024, max_steps=1))
    pattern = patterns[0]
    assert pattern.startswith(str(with_tune))
    loaders = [TokenLoader(pattern.replace(str(with_tune), str(folder), 1), 4096, 64, shuffle=shuffle)
               for folder in (with_tune, without) for shuffle in (False, True)]
    assert [Path(p).name for p in loaders[0].paths] == sorted(p.name for p in without.glob("fineweb_train_*"))
    for a, b in ((loaders[0], loaders[2]), (loaders[1], loaders[3])):
        for _ in range(300):  # in order: 300 * 4097 tokens, past the train split's end (the loader wraps around)
            for (xa, ya), (xb, yb) in zip(a.next_batch(), b.next_batch(), strict=True):
                np.testing.assert_array_equal(xa, xb)
                np.testing.assert_array_equal(ya, yb)


def test_tune_cli_build_split_and_verify(tmp_path, capsys):
    built = tmp_path / "built"
    assert main(["data", "build", str(SAMPLE), "--tokenizer", str(SP1024), "--out", str(built), "--split", "train",
                 "--tune-docs", "5", "--workers", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "tune_docs:5" in out and "train_docs:242" in out and "val_docs" not in out
    assert f"tune_fingerprint:{raw_sha256(built, 'tune')}" in out
    assert main(["data", "split", str(built), "--tune-docs", "3"]) == 2
    assert "already has 1 tune shards" in capsys.readouterr().err
    assert main(["data", "build", str(SAMPLE), "--tokenizer", str(SP1024), "--out", str(tmp_path / "x"), "--split",
                 "val", "--tune-docs", "5", "--quiet"]) == 2
    assert "with split 'val'" in capsys.readouterr().err

    folder = tmp_path / "downloaded"
    data.build_shards([SAMPLE], SP1024, folder, val_docs=10, workers=1, progress=False)
    assert main(["data", "split", str(folder), "--tune-docs", "0"]) == 2
    assert "--tune-docs 0 must be >= 1" in capsys.readouterr().err
    assert main(["data", "split", str(folder), "--tune-docs", "4", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "tune_docs:4\n" in out and "train_docs:233\n" in out and "split:ok" in out
    assert f"tune_fingerprint:{raw_sha256(folder, 'tune')}" in out
    assert "train_shard_rewritten:fineweb_train_000000.bin" in out
    assert main(["data", "verify", str(folder), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "tune_docs:4\n" in out and "tune_train_overlap_docs:0" in out and "verify:ok" in out


# ---------------------------------------------------------------------------------------------------- tokenizer

def test_train_tokenizer_has_challenge_settings_and_roundtrips(tmp_path):
    from sentencepiece import sentencepiece_model_pb2

    report = data.train_tokenizer([SAMPLE], tmp_path / "tok", data.TokenizerSpec(vocab_size=512), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.model", "tok.vocab"]
    long_docs = sum(len(json.loads(line)["text"].strip().encode()) > 4192 for line in sample_lines())
    assert (report.vocab_size, report.docs, report.docs_over_max_length) == (512, 247, long_docs)

    def spec(path):
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(Path(path).read_bytes())
        t, n = proto.trainer_spec, proto.normalizer_spec
        return dict(model_type=t.model_type, coverage=round(t.character_coverage, 6), byte_fallback=t.byte_fallback,
                    split_digits=t.split_digits, normalizer=n.name, dummy_prefix=n.add_dummy_prefix,
                    ids=(t.pad_id, t.bos_id, t.eos_id, t.unk_id))

    ours = spec(report.model)
    assert ours == dict(model_type=sentencepiece_model_pb2.TrainerSpec.BPE, coverage=0.999, byte_fallback=True,
                        split_digits=True, normalizer="nmt_nfkc", dummy_prefix=False, ids=(0, 1, 2, 3))
    reference = REPO / "data/sample/fineweb_8192_bpe.model"  # the official sp8192: the challenge's settings
    assert ours == spec(reference)

    sp = spm.SentencePieceProcessor(model_file=report.model)
    text = "The 2015 census counted 12345 people in \u4e2d\u6587 towns."
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    pieces = sp.encode("12345", out_type=str)
    assert [p for p in pieces if p.strip("\u2581")] == list("12345")  # split_digits
    assert "<0xE4>" in sp.encode("\u4e2d", out_type=str)  # byte_fallback for an unseen character


def test_tokenizer_cli_passes_sampling_cap(tmp_path, capsys):
    from sentencepiece import sentencepiece_model_pb2

    rc = main(["data", "tokenizer", str(SAMPLE), "--vocab-size", "700", "--out", str(tmp_path / "t"),
               "--input-sentence-size", "150", "--max-sentence-length", "100000", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "tokenizer:ok" in out and "docs_over_max_length:0" in out
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((tmp_path / "t.model").read_bytes())
    assert proto.trainer_spec.input_sentence_size == 150 and proto.trainer_spec.max_sentence_length == 100000
    with pytest.raises(ValueError, match="must be 0 .all documents. or > 100"):
        data.TokenizerSpec(vocab_size=700, input_sentence_size=50)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello"}\n{"text": \n', encoding="utf-8")
    assert main(["data", "tokenizer", str(bad), "--vocab-size", "300", "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "bad.jsonl:2: invalid JSON" in capsys.readouterr().err
    assert not list(tmp_path.glob("*b.*"))  # no model, vocab or temp file


# ---------------------------------------------------------------------------------------------------- verify / info

def test_val_fingerprint_equals_sha256_of_token_bytes(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        tokens = rng.integers(2, 1024, 5000)
        tokens[::97] = 1
        write_shard(tmp_path / f"fineweb_val_{i:06d}.bin", tokens)
    report = data.verify_dataset(tmp_path, progress=False)
    expected = hashlib.sha256()
    for i in range(2):
        expected.update((tmp_path / f"fineweb_val_{i:06d}.bin").read_bytes()[HEADER_BYTES:])
    assert report.val_fingerprint == expected.hexdigest()
    assert report.val.tokens == 10_000 and report.val.docs == 2 * len(range(0, 5000, 97)) and report.ok


def test_overlap_found_across_shard_boundaries(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 5, 6, 7, 1, 8, 9, 1, 10, 11, 12, 13])
    # train docs: [1,20,21], [1,8,9] (cut by the shard boundary), [1,8,9,30] (longer: no match), [1,5,6,7] (last)
    for i, part in enumerate([[1, 20, 21, 1, 8], [9, 1, 8, 9, 30], [1, 5, 6, 7]]):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", part)
    report = data.verify_dataset(tmp_path, progress=False)
    assert (report.val.docs, report.train.docs, report.train.tokens) == (3, 4, 14)
    assert report.overlap_docs == 2 and not report.ok
    assert [(e.val_doc, e.train_shard, e.train_offset, e.tokens) for e in report.overlap_examples] == [
        (1, "fineweb_train_000000.bin", 3, 3), (0, "fineweb_train_000002.bin", 0, 4)]
    assert data.verify_dataset(tmp_path, max_overlap_docs=2, progress=False).ok


def test_injected_duplicate_document_fails_verify(tmp_path, capsys):
    data.build_shards([SAMPLE], SP1024, tmp_path, val_docs=40, workers=1, progress=False)
    assert data.verify_dataset(tmp_path, progress=False).overlap_docs == 0
    val = read_shard(tmp_path / "fineweb_val_000000.bin")
    starts = np.flatnonzero(val == 1)
    doc = val[starts[4]:starts[5]]  # the fifth val document
    train_path = tmp_path / "fineweb_train_000000.bin"
    train = read_shard(train_path)
    cut = np.flatnonzero(train == 1)[100]
    write_shard(train_path, np.concatenate([train[:cut], doc, train[cut:]]))

    report = data.verify_dataset(tmp_path, progress=False)
    assert report.overlap_docs == 1 and report.train.docs == 247 - 40 + 1
    assert (report.overlap_examples[0].val_doc, report.overlap_examples[0].train_offset) == (4, cut)
    assert main(["data", "verify", str(tmp_path), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "overlap_docs:1" in captured.out and "verify:fail" in captured.out and "leak" in captured.err
    assert main(["data", "info", str(tmp_path), "--quiet", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["overlap_docs"] == 1 and info["ok"] is False and info["val"]["docs"] == 40


def test_corrupt_and_foreign_shards_are_named(tmp_path, capsys):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(1, 600))
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(1, 600))
    bad_magic = tmp_path / "fineweb_train_000001.bin"
    write_shard(bad_magic, np.arange(1, 600))
    with open(bad_magic, "r+b") as f:
        f.write(b"\0\0\0\0")
    truncated = tmp_path / "fineweb_train_000002.bin"
    write_shard(truncated, np.arange(1, 600))
    truncated.write_bytes(truncated.read_bytes()[:-1])
    with pytest.raises(ShardError) as err:
        data.verify_dataset(tmp_path, progress=False)
    assert "fineweb_train_000001.bin: header magic 0" in str(err.value)
    assert "fineweb_train_000002.bin" in str(err.value) and "truncated" in str(err.value)

    foreign = tmp_path / "text"
    foreign.mkdir()
    (foreign / "fineweb_val_000000.bin").write_text("this is a text file, not a shard\n" * 100)
    assert main(["data", "info", str(foreign), "--quiet"]) == 2
    message = capsys.readouterr().err
    assert "fineweb_val_000000.bin" in message and "not a challenge shard" in message


def test_verify_flags_unusable_val_and_points_to_download_layout(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", [7, 8, 1, 5, 6])
    report = data.verify_dataset(tmp_path, progress=False)
    assert report.val.tokens_before_first_bos == 2 and "first document is cut" in report.problems[0]
    assert "no BOS token 2" in data.verify_dataset(tmp_path, bos_id=2, progress=False).problems[0]
    (tmp_path / "root/datasets/fineweb10B_sp1024").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="datasets/fineweb10B_sp1024"):
        data.verify_dataset(tmp_path / "root", progress=False)


# ---------------------------------------------------------------------------------------------------- download

class FakeHub:
    """Stand-in for hf_hub_download over a folder of repos, recording every request."""

    def __init__(self, root: Path):
        self.root = root
        self.calls: list[tuple[str, str]] = []

    def add(self, repo_id: str, filename: str, content: bytes) -> None:
        path = self.root / repo_id / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)

    def publish(self, repo_id: str, variant: str, val: int, train: int, manifest: bool = True,
                entry: bool = True) -> None:
        vocab = variant[2:]
        folder = f"datasets/datasets/fineweb10B_{variant}"
        rng = np.random.default_rng(len(self.calls))
        for split, count in (("val", val), ("train", train)):
            for i in range(count):
                tokens = rng.integers(2, 1000, 3000 + 100 * i)
                tokens[::50] = 1
                path = self.root / repo_id / folder / f"fineweb_{split}_{i:06d}.bin"
                path.parent.mkdir(parents=True, exist_ok=True)
                write_shard(path, tokens)
        self.add(repo_id, f"datasets/tokenizers/fineweb_{vocab}_bpe.model", SP1024.read_bytes())
        self.add(repo_id, f"datasets/tokenizers/fineweb_{vocab}_bpe.vocab", b"<unk>\t0\n")
        if manifest:
            datasets = [{"name": f"fineweb10B_{variant}", "tokenizer_name": f"sp_bpe_{vocab}",
                         "stats": {"files_val": val, "files_train": train}}] if entry else []
            tokenizers = [{"name": f"sp_bpe_{vocab}", "model_path": f"tokenizers/fineweb_{vocab}_bpe.model",
                           "vocab_path": f"tokenizers/fineweb_{vocab}_bpe.vocab"}]
            self.add(repo_id, "datasets/manifest.json",
                     json.dumps({"datasets": datasets, "tokenizers": tokenizers}).encode())

    def download(self, repo_id, filename, *, repo_type=None, local_dir=None, **kwargs):
        assert repo_type == "dataset" and local_dir is not None
        self.calls.append((repo_id, filename))
        source = self.root / repo_id / filename
        if not source.is_file():
            raise EntryNotFoundError(f"404: {repo_id}/{filename}")
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return str(target)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(data, "hf_hub_download", fake.download)
    return fake


def test_download_follows_manifest_and_train_shard_limit(hub, tmp_path):
    hub.publish("willdepueoai/parameter-golf", "sp1024", val=1, train=3)
    out = tmp_path / "data"
    report = data.download("sp1024", 2, out, progress=False)
    shard_dir = out / "datasets/fineweb10B_sp1024"
    assert sorted(p.name for p in shard_dir.iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"]
    assert sorted(p.name for p in (out / "tokenizers").iterdir()) == [
        "fineweb_1024_bpe.model", "fineweb_1024_bpe.vocab"]
    remote = hub.root / "willdepueoai/parameter-golf/datasets/datasets/fineweb10B_sp1024"
    for path in shard_dir.iterdir():
        assert path.read_bytes() == (remote / path.name).read_bytes()
    assert not any("train_000002" in f for _, f in hub.calls)
    assert (report.val_shards, report.train_shards, report.val_tokens, report.train_tokens) == (1, 2, 3000, 6100)
    assert report.notes == [] and len(report.fetched) == 6
    assert sorted(p.name for p in (out / "datasets").iterdir()) == [
        "fineweb10B_sp1024", "manifest--willdepueoai--parameter-golf.json"]  # staging removed
    with pytest.raises(ValueError, match="has 3 sp1024 train shards, asked for 4"):
        data.download("sp1024", 4, out, progress=False)


def test_download_resumes_and_refetches_truncated_files(hub, tmp_path):
    hub.publish("willdepueoai/parameter-golf", "sp1024", val=1, train=3)
    out = tmp_path / "data"
    data.download("sp1024", 2, out, progress=False)
    hub.calls.clear()
    report = data.download("sp1024", 2, out, progress=False)
    assert hub.calls == [] and report.fetched == [] and len(report.skipped) == 6
    shard = out / "datasets/fineweb10B_sp1024/fineweb_train_000001.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[:-10])
    report = data.download("sp1024", 2, out, progress=False)
    assert hub.calls == [("willdepueoai/parameter-golf",
                          "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin")]
    assert shard.read_bytes() == good and "re-fetching" in report.notes[0]


def test_download_repo_defaults_and_override(hub, tmp_path):
    hub.publish("kevclark/parameter-golf", "sp8192", val=1, train=1)
    hub.publish("someone/golf-data", "sp1024", val=1, train=1)
    data.download("sp8192", 1, tmp_path / "a", progress=False)
    assert {repo for repo, _ in hub.calls} == {"kevclark/parameter-golf"}
    assert (tmp_path / "a/tokenizers/fineweb_8192_bpe.model").is_file()
    hub.calls.clear()
    report = data.download("sp1024", 1, tmp_path / "b", repo_id="someone/golf-data", progress=False)
    assert {repo for repo, _ in hub.calls} == {"someone/golf-data"} and report.repo_id == "someone/golf-data"
    with pytest.raises(FileNotFoundError, match="no datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin"):
        data.download("sp1024", 1, tmp_path / "c", repo_id="kevclark/parameter-golf", progress=False)


@pytest.mark.parametrize("manifest", ["no entry", "no manifest"])
def test_download_falls_back_to_naming_pattern(hub, tmp_path, manifest):
    hub.publish("willdepueoai/parameter-golf", "sp1024", val=2, train=2, manifest=manifest == "no entry",
                entry=False)
    report = data.download("sp1024", 1, tmp_path, progress=False)
    assert report.val_shards == 2 and report.train_shards == 1
    assert len(report.notes) == 1 and "naming pattern" in report.notes[0]
    assert (report.manifest is None) == (manifest == "no manifest")
    assert sorted(p.name for p in (tmp_path / "tokenizers").iterdir()) == [
        "fineweb_1024_bpe.model", "fineweb_1024_bpe.vocab"]
    with pytest.raises(FileNotFoundError, match="it holds 2 train shards"):
        data.download("sp1024", 3, tmp_path, progress=False)


def test_download_rejects_corrupt_remote_shard_and_offline_hub(hub, tmp_path, monkeypatch):
    hub.publish("willdepueoai/parameter-golf", "sp1024", val=1, train=1)
    remote = hub.root / "willdepueoai/parameter-golf/datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin"
    remote.write_bytes(remote.read_bytes()[:-2])
    with pytest.raises(ShardError, match="fineweb_train_000000.bin is invalid"):
        data.download("sp1024", 1, tmp_path, progress=False)
    assert not (tmp_path / "datasets/fineweb10B_sp1024/fineweb_train_000000.bin").exists()

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("connection error")

    monkeypatch.setattr(data, "hf_hub_download", offline)
    with pytest.raises(RuntimeError, match="cannot reach the Hugging Face hub"):
        data.download("sp1024", 1, tmp_path / "offline", progress=False)


def test_download_cli(hub, tmp_path, capsys):
    """The default variant is the default recipe's vocabulary (sp8192)."""
    hub.publish("kevclark/parameter-golf", "sp8192", val=1, train=2)
    rc = main(["data", "download", "--train-shards", "1", "--out", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "download:ok fetched:5" in out and "train_shards:1" in out
    shard_dir = tmp_path / "datasets/fineweb10B_sp8192"
    assert main(["data", "verify", str(shard_dir), "--quiet"]) == 0
    assert "verify:ok" in capsys.readouterr().out


def test_sp8192_build_verify_and_byte_counts_on_the_sample(tmp_path):
    """The 8192-token vocabulary end to end on the shipped sample: build, verify, every id inside the vocabulary (ids
    >= 1024 appear, so no 1024-wide table could hold them), and the BPB byte tables count exactly the UTF-8 bytes of
    the decoded val documents."""
    from eval.bpb import build_byte_luts
    sp8192 = REPO / "data/sample/fineweb_8192_bpe.model"
    build = data.build_shards([SAMPLE], sp8192, tmp_path, val_docs=5, workers=1, progress=False)
    report = data.verify_dataset(tmp_path, progress=False)
    assert report.overlap_docs == 0 and not report.problems and build.docs["val"] == 5
    sp = spm.SentencePieceProcessor(model_file=str(sp8192))
    val = read_shard(tmp_path / "fineweb_val_000000.bin").astype(np.int64)
    train = read_shard(tmp_path / "fineweb_train_000000.bin")
    assert val.max() < 8192 and train.max() < 8192 and (train >= 1024).mean() > 0.2
    with lzma.open(SAMPLE, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(5), f)]
    docs = [sp.decode(d[1:].tolist()) for d in np.split(val, np.flatnonzero(val == 1))[1:]]
    assert docs == [sp.decode(sp.encode(t)) for t in texts]  # the first 5 documents, in order (as normalized)
    luts = build_byte_luts(sp)
    assert luts.token_bytes(val[:-1], val[1:]).sum() == sum(len(d.encode("utf-8")) for d in docs)


def test_ids_outside_the_vocabulary_fail_verify_and_loading(tmp_path, capsys):
    """Shards tokenized with sp8192 in a folder for an sp1024 model: verify fails naming the id and the vocabulary
    (from --tokenizer, --vocab-size or a fineweb10B_spN folder name), and the trainer's loaders refuse them before a
    batch reaches the model (an IndexError on the CPU, a device-side assert on the GPU)."""
    from submission.data import TokenLoader, load_tokens
    folder = tmp_path / "fineweb10B_sp1024"
    data.build_shards([SAMPLE], REPO / "data/sample/fineweb_8192_bpe.model", folder, val_docs=5, workers=1,
                      progress=False)
    assert main(["data", "verify", str(folder), "--quiet"]) == 1  # the folder name says 1024
    captured = capsys.readouterr()
    assert "outside the vocabulary of 1024" in captured.err and "vocab_checked:1024 (from the folder name)" in \
        captured.out
    assert main(["data", "verify", str(folder), "--quiet", "--tokenizer", str(REPO / "data/sample/fineweb_8192_bpe"
                                                                            ".model")]) == 0
    assert "vocab_checked:8192" in capsys.readouterr().out
    assert main(["data", "verify", str(folder), "--quiet", "--vocab-size", "1024"]) == 1
    other = tmp_path / "mine"
    folder.rename(other)
    assert main(["data", "verify", str(other), "--quiet"]) == 0  # nothing says which vocabulary: not checked
    assert "vocab_checked:no" in capsys.readouterr().out
    with pytest.raises(ShardError, match=r"fineweb_val_000000.bin: token id \d+ at position \d+ is outside the "
                                         r"model's vocabulary of 1024"):
        load_tokens(str(other / "fineweb_val_*.bin"), 1024)
    loader = TokenLoader(str(other / "fineweb_train_*.bin"), 2048, 64, vocab_size=1024)
    with pytest.raises(ShardError, match="outside the model's vocabulary of 1024"):
        loader.next_batch()
    assert load_tokens(str(other / "fineweb_val_*.bin"), 8192).max() >= 1024


def test_a_path_of_the_wrong_kind_is_named_as_such(tmp_path):
    shard = tmp_path / "fineweb_val_000000.bin"
    write_shard(shard, np.arange(1, 10))
    with pytest.raises(NotADirectoryError, match="dataset directory .* is a file, expected a folder"):
        data.verify_dataset(shard, progress=False)
    with pytest.raises(IsADirectoryError, match="is a folder, expected a file"):
        data.build_shards([tmp_path], SP1024, tmp_path / "out", split="val", workers=1, progress=False)


def test_shuffled_windows_cover_each_epoch_once_and_are_the_same_global_batch_for_any_world_size(tmp_path):
    """SHUFFLE_WINDOWS: every window of an epoch is seq_len + 1 consecutive tokens of one shard, each start once per
    epoch (a new phase the next epoch); seeded; the union of all ranks' micro-batches of a step does not depend on
    how the global batch is split into ranks and accumulation steps."""
    from submission.data import TokenLoader
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(1000) % 60000)
    write_shard(tmp_path / "fineweb_train_000001.bin", 10_000 + np.arange(700))
    pattern, seq = str(tmp_path / "fineweb_train_*.bin"), 16

    def steps(world: int, accum: int, seed: int = 3, n: int = 5) -> list[np.ndarray]:
        loaders = [TokenLoader(pattern, 8 * seq, seq, r, world, accum, shuffle=True, seed=seed) for r in range(world)]
        out = []
        for _ in range(n):
            rows = [np.concatenate([x, y[:, -1:]], 1) for ld in loaders for x, y in ld.next_batch()]
            out.append(np.concatenate(rows))
        return out

    one = steps(1, 1)
    for world, accum in ((2, 1), (4, 2), (1, 8)):
        for a, b in zip(one, steps(world, accum)):
            assert sorted(map(tuple, a)) == sorted(map(tuple, b))
    loader = TokenLoader(pattern, 8 * seq, seq, shuffle=True, seed=3)
    windows = np.concatenate([loader.next_batch()[0][0] for _ in range(12)])  # 96 windows: the first epoch's ~104
    assert ((windows[:, 1:] - windows[:, :-1]) == 1).all()  # consecutive tokens, never across the two shards
    starts = windows[:, 0]
    assert len(set(starts.tolist())) == len(starts)  # no window twice within the epoch
    assert len(set((starts % 10_000 % seq).tolist())) == 1  # one phase per epoch
    assert not np.array_equal(np.concatenate(one), np.concatenate(steps(1, 1, seed=4)))
    loader.close()
    with pytest.raises(Exception, match="after the training cap"):
        loader.next_batch()
