"""tools.pack.artifact (and tools.pack.size, `pgolf size`): bit-exact round trip, corruption errors, the decimal cap,
budget fitting, size."""
from __future__ import annotations

import argparse
import io
import json
import lzma
import struct
import zlib

import numpy as np
import pytest
import torch

import tools.pack.artifact as artifact
from tools.commands.size import add_commands
from tools.pack.artifact import (CHUNK_ENTRY, CODE_FILENAME, COMPRESSOR_IDS, DECIMAL_CAP, MODEL_FILENAME, PREFIX,
                                 ArtifactError, check_budget, compress, compress_chunks, decompress_chunks,
                                 fit_to_budget, pack_artifact, read_artifact, read_contents, to_state_dict,
                                 unpack_artifact, write_artifact)
from tools.pack.size import size_report
from tools.quant.gptq import QuantConfig, QuantTensor, gptq_quantize, rtn_quantize

MODEL_CONFIG = {"num_layers": 2, "model_dim": 64, "mlp_mult": 3.0, "adam_betas": [0.9, 0.95], "name": "tiny",
                "tie_embeddings": True, "lm_head": None}
QUANT_CONFIG = {"matrix_bits": 6, "embed_bits": 8, "clip_sigmas": [3.0, 12.85]}


def gptq_like(rows: int, cols: int, seed: int, bits: int = 6) -> QuantTensor:
    """Codes from GPTQ on heavy-tailed weights with correlated inputs: the statistics real artifacts hold."""
    g = torch.Generator().manual_seed(seed)
    chi2 = (torch.randn(5, rows, cols, generator=g) ** 2).mean(0)  # seeded: Chi2.sample uses the global RNG
    W = 0.02 * torch.randn(rows, cols, generator=g) / torch.sqrt(chi2)
    W = W * torch.exp(0.3 * torch.randn(rows, 1, generator=g))
    X = torch.randn(4 * cols, 16, generator=g) @ torch.randn(16, cols, generator=g) + torch.randn(4 * cols, cols,
                                                                                               generator=g)
    codes, scales, _ = gptq_quantize(W, X.T @ X, bits, QuantConfig(clip_sigmas=(4.0, 6.0, 10.0)))
    return QuantTensor(codes, scales, bits)


@pytest.fixture(scope="module")
def tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "blocks.0.attn.c_q.weight": gptq_like(64, 64, seed=1),
        "blocks.0.mlp.c_fc.weight": gptq_like(192, 64, seed=2),
        "tok_emb.weight": QuantTensor(*rtn_quantize(torch.randn(100, 64, generator=g) * 0.05, 8)[:2], 8),
        "blocks.0.attn_scale": (1 + 0.1 * torch.randn(64, generator=g)).half(),
        "blocks.0.resid_mix": torch.randn(2, 64, generator=g),                     # float32 passthrough
        "skip_weights": torch.randn(1, 64, generator=g).bfloat16(),
        "smear.gate": torch.tensor(-3.0),                                            # 0-d
        "step": torch.tensor([7, -1], dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }


def assert_same(a: dict, b: dict):
    assert list(a) == list(b)
    for name, x in a.items():
        y = b[name]
        if isinstance(x, QuantTensor):
            assert isinstance(y, QuantTensor) and x.bits == y.bits
            assert torch.equal(x.codes, y.codes)
            assert torch.equal(x.scales.view(torch.int16), y.scales.view(torch.int16))
        else:
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert bit_pattern(x) == bit_pattern(y), name


def bit_pattern(t: torch.Tensor) -> bytes:
    t = t.reshape(-1)
    return (t.to(torch.uint8) if t.dtype == torch.bool else t.view(torch.uint8)).numpy().tobytes()


def frame(magic: bytes, version: int, names: list[str], chunks: list[bytes]) -> bytes:
    body = b"".join(CHUNK_ENTRY.pack(COMPRESSOR_IDS[n], len(c)) for n, c in zip(names, chunks)) + b"".join(chunks)
    return PREFIX.pack(magic, version, len(chunks), len(body), zlib.crc32(body)) + body


def rewrite_body(blob: bytes, edit) -> bytes:
    """Decompress, let `edit(header, payload)` change things, re-compress with a valid crc (what the crc misses)."""
    magic, version, count, _, _ = PREFIX.unpack_from(blob)
    raw, _ = decompress_chunks(blob[PREFIX.size:], count)
    (hlen,) = struct.unpack_from("<I", raw)
    header, payload = json.loads(raw[4:4 + hlen]), raw[4 + hlen:]
    header, payload = edit(header, payload)
    hb = json.dumps(header).encode()
    return frame(magic, version, *compress_chunks(struct.pack("<I", len(hb)) + hb + payload, ("lzma",)))


def test_round_trip_is_bit_exact(tensors):
    blob = pack_artifact(tensors, MODEL_CONFIG, QUANT_CONFIG)
    out, model_config, quant_config = unpack_artifact(blob)
    assert_same(tensors, out)
    assert model_config == MODEL_CONFIG and quant_config == QUANT_CONFIG
    for forced in ("brotli", "lzma"):
        contents = read_contents(pack_artifact(tensors, MODEL_CONFIG, QUANT_CONFIG, compressors=(forced,)))
        assert contents.compressor == forced
        assert_same(tensors, contents.tensors)
    # the smaller of the two is kept
    sizes = [len(pack_artifact(tensors, MODEL_CONFIG, QUANT_CONFIG, compressors=(c,))) for c in ("brotli", "lzma")]
    assert len(blob) == min(sizes)


def test_chunks_are_compressed_independently_each_with_its_best_compressor(monkeypatch):
    monkeypatch.setattr(artifact, "CHUNK_BYTES", 4096)
    rng = np.random.default_rng(0)
    # brotli wins on text-like bytes, lzma on a long-period pattern: each chunk must keep its own winner
    text = (b"the quick brown fox jumps over the lazy dog; " * 200)[:8192]
    pattern = np.tile(rng.integers(0, 256, 3000, dtype=np.uint8), 3).tobytes()[:8192]
    raw = text + pattern + rng.integers(0, 256, 1000, dtype=np.uint8).tobytes()
    names, chunks = compress_chunks(raw)
    assert len(chunks) == 5 and len(raw) == 4 * 4096 + 1000
    for i, (name, chunk) in enumerate(zip(names, chunks)):
        piece = raw[i * 4096:(i + 1) * 4096]
        assert chunk == min((compress(piece, c) for c in ("brotli", "lzma")), key=len)
        assert compress(piece, name) == chunk
    body = frame(b"PGLF", 2, names, chunks)[PREFIX.size:]
    assert decompress_chunks(body, len(chunks)) == (raw, names)
    # fixed chunk size: the bytes do not depend on the number of cores
    monkeypatch.setattr(artifact.os, "cpu_count", lambda: 1)
    assert compress_chunks(raw) == (names, chunks)


def test_chunk_table_errors_name_the_chunk(tensors, monkeypatch):
    monkeypatch.setattr(artifact, "CHUNK_BYTES", 256)
    blob = pack_artifact(tensors, MODEL_CONFIG, QUANT_CONFIG, compressors=("lzma",))
    count = PREFIX.unpack_from(blob)[2]
    assert count > 3 and read_contents(blob).compressor == "lzma"
    body = blob[PREFIX.size:]
    lengths = [CHUNK_ENTRY.unpack_from(body, i * CHUNK_ENTRY.size)[1] for i in range(count)]
    start = count * CHUNK_ENTRY.size
    parts = [body[start + sum(lengths[:i]):start + sum(lengths[:i + 1])] for i in range(count)]
    assert frame(b"PGLF", 2, ["lzma"] * count, parts) == blob

    def reframe(table_edit) -> bytes:  # a body with an edited table and a valid crc
        new = bytearray(body)
        table_edit(new)
        return PREFIX.pack(b"PGLF", 2, count, len(new), zlib.crc32(bytes(new))) + bytes(new)

    def unknown_id(b):
        b[2 * CHUNK_ENTRY.size] = 7
    with pytest.raises(ArtifactError, match="chunk 2 has unknown compressor id 7"):
        read_contents(reframe(unknown_id))

    def claims_brotli(b):
        b[0] = COMPRESSOR_IDS["brotli"]
    with pytest.raises(ArtifactError, match="a chunk does not decompress"):
        read_contents(reframe(claims_brotli))

    def too_long(b):
        CHUNK_ENTRY.pack_into(b, CHUNK_ENTRY.size, COMPRESSOR_IDS["lzma"], len(body))
    with pytest.raises(ArtifactError, match=rf"chunk 1 ends at byte \d+ of a {len(body)}-byte body"):
        read_contents(reframe(too_long))
    with pytest.raises(ArtifactError, match=rf"the chunk table covers {len(body)} of the {len(body) + 5} body bytes"):
        decompress_chunks(body + b"extra", count)
    with pytest.raises(ArtifactError, match=r"\d+ chunks need a \d+-byte table, the body has 3 bytes"):
        decompress_chunks(body[:3], count)


def test_truncated_corrupted_and_foreign_bytes(tensors, tmp_path):
    blob = pack_artifact(tensors, MODEL_CONFIG, QUANT_CONFIG, compressors=("lzma",))
    path = tmp_path / MODEL_FILENAME
    path.write_bytes(blob[:-10])
    with pytest.raises(ArtifactError, match=rf"{MODEL_FILENAME}: prefix says {len(blob) - PREFIX.size} compressed "
                                            rf"bytes but {len(blob) - PREFIX.size - 10} follow \(truncated"):
        read_artifact(path)
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x40
    with pytest.raises(ArtifactError, match="crc32 .* != .* stored"):
        unpack_artifact(bytes(flipped))
    with pytest.raises(ArtifactError, match="magic"):
        unpack_artifact(b"PK\x03\x04" + blob[4:])
    with pytest.raises(ArtifactError, match="format version 9"):
        unpack_artifact(blob[:4] + bytes([9]) + blob[5:])
    with pytest.raises(ArtifactError, match="shorter than"):
        unpack_artifact(blob[:5])
    with pytest.raises(FileNotFoundError):
        read_artifact(tmp_path / "missing.pgz")


def test_header_payload_mismatch_is_named(tensors):
    blob = pack_artifact(tensors, MODEL_CONFIG, QUANT_CONFIG, compressors=("lzma",))

    def wrong_shape(header, payload):
        header["tensors"]["blocks.0.attn.c_q.weight"]["shape"] = [64, 65]
        return header, payload
    with pytest.raises(ArtifactError, match=r"c_q.weight shape \[64, 65\] needs segments of \[4160, 64, 64\] bytes"):
        unpack_artifact(rewrite_body(blob, wrong_shape))

    def short_payload(header, payload):
        return header, payload[:-3]
    with pytest.raises(ArtifactError, match=r"header says \d+ payload bytes, found \d+"):
        unpack_artifact(rewrite_body(blob, short_payload))

    def code_out_of_range(header, payload):
        offset = header["tensors"]["blocks.0.attn.c_q.weight"]["segments"][0][0]
        return header, payload[:offset] + bytes([40]) + payload[offset + 1:]
    with pytest.raises(ArtifactError, match=r"codes up to 40, beyond int6's \+-31"):
        unpack_artifact(rewrite_body(blob, code_out_of_range))

    def no_tensor_table(header, payload):
        del header["tensors"]
        return header, payload
    with pytest.raises(ArtifactError, match="malformed header \\(KeyError: 'tensors'\\)"):
        unpack_artifact(rewrite_body(blob, no_tensor_table))


def test_to_state_dict_checks_names_and_shapes(tensors):
    reference = {n: (v.dequantize() if isinstance(v, QuantTensor) else v).float() for n, v in tensors.items()}
    state = to_state_dict(tensors, reference, "run/model.pgz")
    q = tensors["blocks.0.attn.c_q.weight"]
    torch.testing.assert_close(state["blocks.0.attn.c_q.weight"], q.codes.float() * q.scales.float()[:, None])
    assert state["step"].dtype == torch.float32
    bad = dict(reference, **{"blocks.0.attn.c_q.weight": torch.zeros(32, 64)})
    with pytest.raises(ArtifactError, match=r"run/model.pgz: tensor blocks.0.attn.c_q.weight is \[64, 64\] in the "
                                            r"artifact but \[32, 64\] in the model"):
        to_state_dict(tensors, bad, "run/model.pgz")
    with pytest.raises(ArtifactError, match=r"missing from the artifact \['extra'\]"):
        to_state_dict(tensors, dict(reference, extra=torch.zeros(1)), "run/model.pgz")


def test_cap_is_decimal(tmp_path):
    assert DECIMAL_CAP == 16_000_000
    path = tmp_path / MODEL_FILENAME
    over = b"PGLF" + bytes(16_500_000 - 4)  # under 16 MiB = 16,777,216, over 16,000,000
    with pytest.raises(ValueError, match="16,500,000 = 16,500,000 bytes exceeds the cap 16,000,000"):
        write_artifact(path, over, code_bytes=0)
    assert not path.exists() and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="exceeds the cap"):
        check_budget(15_990_000, 10_001)
    assert check_budget(15_990_000, 10_000) == DECIMAL_CAP
    write_artifact(path, b"PGLF" + bytes(15_990_000 - 4), code_bytes=10_000)
    assert path.stat().st_size == 15_990_000
    with pytest.raises(ValueError, match="do not start with"):
        write_artifact(path, b"junk", code_bytes=0)


def fit_inputs():
    g = torch.Generator().manual_seed(5)
    quant = {}
    for i, (rows, cols) in enumerate([(96, 128), (128, 96)]):
        # Laplace weights with a wide clip: many small codes, so there are +-1 codes to prune. Drawn from the seeded
        # generator (inverse CDF): torch.distributions' sample() uses the global RNG, which made them order-dependent.
        u = torch.rand(rows, cols, generator=g) - 0.5
        laplace = -torch.sign(u) * torch.log1p(-2 * u.abs())
        W = laplace * torch.exp(0.5 * torch.randn(rows, 1, generator=g))
        codes, scales, _ = rtn_quantize(W, 6, QuantConfig(clip_sigmas=(12.0,)))
        quant[f"m{i}.weight"] = QuantTensor(codes, scales, 6)
    tensors = dict(quant, gain=torch.ones(16).half())
    hdiag = {"m0.weight": torch.rand(128, generator=g) + 0.1}
    return tensors, hdiag


def test_fit_to_budget_zeroes_cheapest_pm1_codes_until_it_fits():
    tensors, hdiag = fit_inputs()
    before = {n: v.codes.clone() for n, v in tensors.items() if isinstance(v, QuantTensor)}
    size0 = len(pack_artifact(tensors, MODEL_CONFIG, QUANT_CONFIG))
    code_bytes = 1_000
    target = code_bytes + int(size0 * 0.97)
    blob, fitted, report = fit_to_budget(tensors, hdiag, code_bytes, MODEL_CONFIG, QUANT_CONFIG, target=target,
                                         progress=False)
    assert code_bytes + len(blob) <= target and report.total_bytes == code_bytes + len(blob)
    assert report.model_bytes_before == size0 and report.rounds >= 1
    assert_same(fitted, unpack_artifact(blob)[0])
    costs_zeroed, costs_kept = [], []
    for name, old in before.items():
        assert torch.equal(tensors[name].codes, old)  # caller's tensors untouched
        new = fitted[name].codes
        changed = new != old
        assert (old[changed].abs() == 1).all() and (new[changed] == 0).all()
        assert int(changed.sum()) == report.zeroed.get(name, 0)
        scale2 = fitted[name].scales.double()[:, None] ** 2
        col = hdiag[name].double() / hdiag[name].double().mean() if name in hdiag else torch.ones(old.size(1))
        cost = (scale2 * col[None, :].double()).expand_as(old)
        costs_zeroed.append(cost[changed])
        costs_kept.append(cost[(new.abs() == 1)])
    assert sum(report.zeroed.values()) > 0
    assert float(torch.cat(costs_zeroed).max()) <= float(torch.cat(costs_kept).min())
    assert torch.equal(fitted["gain"], tensors["gain"])
    assert report.lines()[0].startswith(f"budget: target:{target} code_bytes:1000")


def test_fit_to_budget_fits_untouched_or_raises():
    tensors, hdiag = fit_inputs()
    size0 = len(pack_artifact(tensors, MODEL_CONFIG, QUANT_CONFIG))
    blob, fitted, report = fit_to_budget(tensors, None, 0, MODEL_CONFIG, QUANT_CONFIG, target=size0,
                                         progress=False)
    assert len(blob) == size0 and not report.zeroed and report.rounds == 0
    with pytest.raises(ValueError, match="above the cap"):
        fit_to_budget(tensors, None, 0, MODEL_CONFIG, QUANT_CONFIG, target=16 * 1024 * 1024, progress=False)
    with pytest.raises(ValueError, match="still above the target"):
        fit_to_budget(tensors, hdiag, 0, MODEL_CONFIG, QUANT_CONFIG, target=size0 // 3, progress=False)


def test_fit_to_budget_fits_gptq_codes_in_one_recompression():
    """The per-row entropy estimate is close enough that one level-11 re-compression reaches the target (each
    costs 80 s at full size), without zeroing far more codes than needed."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"blocks.{i}.w": gptq_like(256, 256, seed=i) for i in range(3)}
    hdiag = {name: torch.rand(256, generator=g) + 0.1 for name in tensors}
    size0 = len(pack_artifact(tensors, MODEL_CONFIG, QUANT_CONFIG))
    target = 100 + int(size0 * 0.97)
    blob, _, report = fit_to_budget(tensors, hdiag, 100, MODEL_CONFIG, QUANT_CONFIG, target=target, progress=False)
    assert report.rounds == 1 and 100 + len(blob) <= target
    assert 100 + len(blob) > target - 0.01 * size0  # overshoot under 1% of the model


def test_smaller_than_lzma_of_torch_save():
    """The issue asks >= 4% on the real model; on these synthetic GPTQ codes the figure is printed (about 3%)."""
    tensors = {f"blocks.{i}.{n}.weight": gptq_like(r, c, seed=10 + 3 * i + j, bits=6)
               for i in range(2) for j, (n, r, c) in enumerate([("c_q", 128, 128), ("c_fc", 384, 128),
                                                                ("proj", 128, 384)])}
    tensors["blocks.0.attn_scale"] = (1 + 0.1 * torch.randn(128)).half()
    ours = len(pack_artifact(tensors, MODEL_CONFIG, QUANT_CONFIG))
    flat = {}
    for name, v in tensors.items():
        if isinstance(v, QuantTensor):
            flat[name + ".q"], flat[name + ".scale"] = v.codes, v.scales
        else:
            flat[name] = v
    buf = io.BytesIO()
    torch.save(flat, buf)
    baseline = len(lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME))
    print(f"artifact:{ours} torch_save_lzma9e:{baseline} smaller_by:{1 - ours / baseline:.2%}")
    assert ours < 0.985 * baseline


def test_size_report_and_cli(tensors, tmp_path, capsys):
    blob = pack_artifact(tensors, MODEL_CONFIG, QUANT_CONFIG)
    code = "print('hello')\n" * 100
    write_artifact(tmp_path / MODEL_FILENAME, blob, code_bytes=len(code))
    (tmp_path / CODE_FILENAME).write_text(code)
    report = size_report(tmp_path / MODEL_FILENAME, tmp_path / CODE_FILENAME, progress=False)
    assert report.code_bytes == len(code) and report.model_bytes == len(blob) and report.fits
    assert sum(t.bytes for t in report.tensors) == pytest.approx(len(blob))
    by_name = {t.name: t for t in report.tensors}
    assert by_name["blocks.0.mlp.c_fc.weight"].params == 192 * 64 and by_name["blocks.0.mlp.c_fc.weight"].bits == 6
    assert by_name["blocks.0.resid_mix"].bits == 32
    assert by_name["blocks.0.mlp.c_fc.weight"].bytes > by_name["blocks.0.attn.c_q.weight"].bytes

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["size", str(tmp_path), "--quiet"])
    assert args.func(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (f"size: code_bytes:{len(code)} model_bytes:{len(blob)} total_bytes:{len(code) + len(blob)} "
                    f"cap:16000000 headroom:{16_000_000 - len(code) - len(blob)} "
                    f"compressor:{read_contents(blob).compressor} fits:true")
    with pytest.raises(FileNotFoundError, match="expected model.pgz"):
        args = parser.parse_args(["size", str(tmp_path / "nope")])
        args.func(args)


def test_pack_rejects_bad_inputs(tensors):
    bad = QuantTensor(torch.full((2, 3), 40, dtype=torch.int8), torch.ones(2).half(), 6)
    with pytest.raises(ValueError, match=r"codes reach 40 but int6 allows \+-31"):
        pack_artifact({"w": bad}, {}, {})
    with pytest.raises(ValueError, match="scales must be float16"):
        pack_artifact({"w": QuantTensor(torch.zeros(2, 3, dtype=torch.int8), torch.ones(2), 6)}, {}, {})
    with pytest.raises(ValueError, match="plain JSON"):
        pack_artifact({"w": torch.zeros(1)}, {"x": float("nan")}, {})
    with pytest.raises(ValueError, match="cannot store"):
        pack_artifact({"w": np.zeros(3)}, {}, {})


def test_lqer_factors_survive_packing_and_budget_fitting():
    """A QuantTensor with LQER factors: the artifact stores them (float16 planes after the scales) and gives them
    back bit-exact; fitting the budget zeroes codes but keeps the factors; malformed factors are refused."""
    g = torch.Generator().manual_seed(7)
    codes = (torch.randn(64, 48, generator=g) * 1.5).round().clamp(-31, 31).to(torch.int8)  # many +-1 codes
    A, B = torch.randn(64, 4, generator=g).half(), torch.randn(4, 48, generator=g).half()
    q = QuantTensor(codes, torch.rand(64, generator=g).half() + 0.01, 6, (A, B))
    tensors = {"w": q, "plain": QuantTensor(codes.clone(), torch.ones(64).half(), 6)}
    back, _, _ = unpack_artifact(pack_artifact(tensors, {}, {}))
    assert torch.equal(back["w"].lowrank[0], A) and torch.equal(back["w"].lowrank[1], B)
    assert back["plain"].lowrank is None
    torch.testing.assert_close(back["w"].dequantize(), q.dequantize())
    size = len(pack_artifact(tensors, {}, {}))
    _, packed, report = fit_to_budget(tensors, None, 0, {}, {}, target=size - 100, progress=False)
    assert sum(report.zeroed.values()) > 0 and torch.equal(packed["w"].lowrank[0], A)
    with pytest.raises(ValueError, match=r"w: low-rank factors must be float16 \[64, r\] and \[r, 48\]"):
        pack_artifact({"w": QuantTensor(codes, q.scales, 6, (A.float(), B))}, {}, {})
