"""tools.quant.quantize: the quantize stage on a run directory, the reload in a fresh process, and bad input."""
from __future__ import annotations

import argparse
import io
import lzma
import math
import subprocess
import sys
import textwrap
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from submission.config import ModelConfig, TrainConfig, to_dict
from submission.data import write_shard
from submission.model import GPT
from submission.runtime import tokenizer_identity
from tools.commands.quantize import add_commands
from tools.pack.artifact import DECIMAL_CAP, MODEL_FILENAME, ArtifactError, pack_artifact, read_artifact, to_state_dict
from tools.quant.calibrate import CalibConfig
from tools.quant.gptq import QuantConfig, QuantTensor
import tools.quant.quantize
from tools.quant.quantize import load_quantized, quantize_checkpoint, quantize_run

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data/sample/fineweb_1024_bpe.model"
# Every feature of both recipes on: layer 1 looped once, parallel residuals on it, gated skips, and the sp1024 tables
# (BigramHash, value embeddings, second embedding).
MODEL = ModelConfig(vocab_size=1024, num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1, xsa_last_n=2,
                    rope_dims=8, bigram_buckets=64, bigram_dim=16, value_embed_last_n=2, value_embed_dim=16,
                    embed2=True, num_loops=1, loop_layers=(1, 1), parallel_last_n=1)
# Matrices of a 64-wide model are under the record's passthrough size; a lower one puts them through GPTQ.
# One clip for every matrix: these tests are about the stage around it (tests/test_allocate.py: the allocation).
QUANT = QuantConfig(passthrough_max_numel=1024, bit_allocation=False)
# 2 x 16 generated tokens: far fewer than the 64 and 192 input dims, so every Hessian is rank-deficient.
TINY_CALIB = CalibConfig(calib_seqs=2, calib_seq_len=16)


class Lines:
    """A log function in the trainer Logger's shape that keeps the lines."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, *fields, file_only: bool = False, **kv):
        self.lines.append(" ".join([*fields, *(f"{k}:{v}" for k, v in kv.items())]))

    def starting(self, prefix: str) -> list[str]:
        return [line for line in self.lines if line.startswith(prefix)]


def trained_like(cfg: ModelConfig, seed: int) -> GPT:
    """Weights at trained scales (the init leaves projections and the bigram table at zero)."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "resid_mix" not in name and "skip" not in name:
                p.copy_(torch.randn_like(p) / p.size(1) ** 0.5)
    return model


def other_tokenizer(path: Path) -> Path:
    """The sample tokenizer with two pieces' strings swapped: the same piece count, other bytes per token, so it
    scores another BPB (issue 20's case: a same-size tokenizer was scored silently)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(TOKENIZER.read_bytes())
    proto.pieces[500].piece, proto.pieces[501].piece = proto.pieces[501].piece, proto.pieces[500].piece
    path.write_bytes(proto.SerializeToString())
    return path


def make_run(root: Path, train_time_s: float = 1.0, ema: bool = True,
             tokenizer: bool = True) -> tuple[Path, TrainConfig]:
    """A run directory as the trainer leaves it, with a random val shard (23 windows of 128 targets) and a tiny train
    shard beside it. tokenizer=False: a checkpoint from before the tokenizer's identity was recorded."""
    run = root / "run"
    data = root / "data"
    run.mkdir(parents=True)
    data.mkdir()
    rng = np.random.default_rng(0)
    write_shard(data / "fineweb_val_000000.bin", rng.integers(2, 1024, 23 * 128 + 1).astype(np.uint16))
    write_shard(data / "fineweb_train_000000.bin", rng.integers(2, 1024, 500).astype(np.uint16))
    train_cfg = TrainConfig(data_dir=str(data), tokenizer_path=str(TOKENIZER), run_dir=str(run), seq_len=128,
                            val_batch_seqs=4)
    raw, averaged = trained_like(MODEL, 0), trained_like(MODEL, 1)
    identity = {"tokenizer": tokenizer_identity(str(TOKENIZER))} if tokenizer else {}
    torch.save({"model_config": to_dict(MODEL), "train_config": to_dict(train_cfg), "steps": 7, **identity,
                "state_dict": raw.state_dict(), "ema_state_dict": averaged.state_dict() if ema else None},
               run / "checkpoint.pt")
    (run / "train.log").write_text(f"seed:1337\ntraining_done steps:7 train_time_s:{train_time_s} step_avg_ms:3.5\n")
    return run, train_cfg


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """One quantize_run on a tiny run: (run dir, train config, log lines, reloaded model)."""
    run, train_cfg = make_run(tmp_path_factory.mktemp("q"))
    log = Lines()
    model, acc = quantize_run(run, 1234, QUANT, TINY_CALIB, log, progress=False)
    return run, train_cfg, log, model, acc


def reference_loss(model: GPT, tokens: np.ndarray, seq_len: int) -> float:
    """Mean next-token NLL over non-overlapping windows, written out directly."""
    t = torch.from_numpy(tokens.astype(np.int64))
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(t) - 1, seq_len):
            x = t[s:s + seq_len + 1]
            if len(x) < seq_len + 1:
                break
            z = model.logits(x[None, :-1])[0]
            total += float(F.cross_entropy(z, x[1:], reduction="sum"))
            count += seq_len
    return total / count


def test_quantize_run_writes_the_artifact_and_logs_the_stage(quantized):
    run, train_cfg, log, model, acc = quantized
    path = run / MODEL_FILENAME
    assert path.is_file() and not [p for p in run.iterdir() if ".tmp" in p.name]
    assert log.starting("quantize ")[0].startswith(f"quantize run_dir:{run} weights:ema steps:7 code_bytes:1234")
    assert "calibration source:generated seqs:2 tokens:32 temperature:0.8" in log.lines[1]
    gptq = log.starting("gptq ")[0]
    # 12 block matrices, the bigram projection and the tied embedding (with the head's Hessian); 3 other tables
    assert "gptq:14 rtn:3" in gptq and "min_calibration_tokens:32" in gptq
    assert log.starting("quant:tok_emb.weight method:gptq_int8 ")
    # 32 tokens against 64 input dims (256 for the MLP projections); the looped layer 1 sees each token twice, so
    # fewer of its Hessians are rank-deficient
    assert log.starting("gptq_rank_deficient hessians:8 min_tokens:32 max_input_dims:256 damp:0.01")
    assert log.starting("budget: target:16000000 code_bytes:1234")
    assert not log.starting("artifact_vs_torch_save ")  # `pgolf quantize` logs it; the packed program skips it
    model_bytes = path.stat().st_size
    assert log.lines[-2:] == ["Code size: 1234 bytes", f"Total submission size: {1234 + model_bytes} bytes"]
    (line,) = log.starting("quantized_roundtrip_exact ")
    logged = float(line.split("val_loss:")[1].split()[0])
    val = np.fromfile(Path(train_cfg.data_dir) / "fineweb_val_000000.bin", dtype="<u2", offset=1024)
    assert logged == pytest.approx(reference_loss(model, val, 128), abs=2e-6)  # 23 windows of 128 targets
    assert line == f"quantized_roundtrip_exact val_loss:{acc.val_loss:.8f} val_bpb:{acc.val_bpb:.8f}"
    # The reloaded artifact is the EMA checkpoint, quantized: close to it in loss, not equal.
    averaged = trained_like(MODEL, 1).eval()
    before = reference_loss(averaged, val, 128)
    assert logged != before and abs(logged - before) < 0.05 * before
    assert read_artifact(path)[2]["calib_seqs"] == 2  # the calibration settings travel with the artifact
    # and so does the checkpoint's tokenizer, which `pgolf eval` checks the one it is given against
    assert read_artifact(path)[2]["tokenizer"] == tokenizer_identity(str(TOKENIZER))
    assert not log.starting("tokenizer_unchecked")


def test_a_tokenizer_other_than_the_checkpoints_is_refused_before_any_work(tmp_path):
    run, train_cfg = make_run(tmp_path)
    other = other_tokenizer(tmp_path / "other.model")
    used, recorded = tokenizer_identity(str(other)), tokenizer_identity(str(TOKENIZER))
    assert used["pieces"] == recorded["pieces"] == 1024 and used["sha256"] != recorded["sha256"]
    log = Lines()
    with pytest.raises(ValueError, match=rf"^tokenizer {other} \(sha256 {used['sha256'][:16]}, 1024 pieces\) is not "
                                         rf"the one {run / 'checkpoint.pt'} was made with: {TOKENIZER} \(sha256 "
                                         rf"{recorded['sha256'][:16]}, 1024 pieces\); pass that tokenizer .*"
                                         r"--allow-other-tokenizer to use this one on purpose$"):
        quantize_run(run, 0, QUANT, TINY_CALIB, log, replace(train_cfg, tokenizer_path=str(other)), progress=False)
    assert not log.starting("calibration") and not (run / MODEL_FILENAME).exists()
    # on purpose: quantized, and the artifact still names the model's own tokenizer
    quantize_run(run, 0, QUANT, TINY_CALIB, log, replace(train_cfg, tokenizer_path=str(other)), progress=False,
                 allow_other_tokenizer=True)
    assert read_artifact(run / MODEL_FILENAME)[2]["tokenizer"] == recorded


def test_a_checkpoint_without_a_tokenizer_identity_still_quantizes_and_says_so(tmp_path):
    run, train_cfg = make_run(tmp_path, tokenizer=False)
    log = Lines()
    quantize_run(run, 0, QUANT, TINY_CALIB, log, train_cfg, progress=False)
    assert log.starting("tokenizer_unchecked ") == [f"tokenizer_unchecked source:{run / 'checkpoint.pt'}"]
    assert read_artifact(run / MODEL_FILENAME)[2]["tokenizer"] is None


def test_an_unwritable_run_dir_is_refused_before_calibration(tmp_path, monkeypatch):
    run, _ = make_run(tmp_path)
    write_bytes = Path.write_bytes

    def read_only(path, data):  # a read-only folder (chmod does not stop root, who runs CI here)
        if path.parent == run:
            raise PermissionError(13, "Permission denied", str(path))
        return write_bytes(path, data)
    monkeypatch.setattr(Path, "write_bytes", read_only)
    log = Lines()
    with pytest.raises(ValueError, match=rf"^RUN_DIR {run / MODEL_FILENAME}: cannot write it \(Permission denied: "
                                         rf"{run}/\.model\.pgz\.probe\d+\); pass a writable RUN_DIR$"):
        quantize_checkpoint(run, 0, QUANT, TINY_CALIB, log, torch.device("cpu"), progress=False)
    assert not log.starting("calibration")


def test_reload_in_a_fresh_process_gives_identical_logits(tmp_path):
    run, _ = make_run(tmp_path)
    path, packed = quantize_checkpoint(run, 0, QUANT, TINY_CALIB, Lines(), torch.device("cpu"), progress=False)
    assert sum(isinstance(v, QuantTensor) for v in packed.values()) == 17  # 12 GPTQ matrices, bigram proj, 4 tables
    in_memory = GPT(MODEL)
    in_memory.load_state_dict(to_state_dict(packed, in_memory.state_dict()))
    batch = torch.randint(0, 1024, (2, 40), generator=torch.Generator().manual_seed(3))
    torch.save(batch, tmp_path / "batch.pt")
    script = textwrap.dedent(f"""
        import torch
        from tools.quant.quantize import load_quantized
        model = load_quantized({str(path)!r})
        with torch.no_grad():
            torch.save(model.logits(torch.load({str(tmp_path / 'batch.pt')!r})), {str(tmp_path / 'fresh.pt')!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with torch.no_grad():
        expected = in_memory.eval().logits(batch)
    assert torch.equal(torch.load(tmp_path / "fresh.pt"), expected)


def test_bad_artifacts_name_the_file(tmp_path, quantized):
    run = quantized[0]
    blob = (run / MODEL_FILENAME).read_bytes()
    truncated = tmp_path / "truncated.pgz"
    truncated.write_bytes(blob[:-100])
    with pytest.raises(ArtifactError, match=rf"{truncated}: prefix says .* \(truncated"):
        load_quantized(truncated)
    tensors, model_config, quant_config = read_artifact(run / MODEL_FILENAME)
    foreign = tmp_path / "foreign.pgz"
    foreign.write_bytes(pack_artifact(tensors, {**model_config, "num_experts": 8}, quant_config))
    with pytest.raises(ArtifactError, match=rf"{foreign}: model config does not fit .*num_experts"):
        load_quantized(foreign)
    wider = tmp_path / "wider.pgz"
    wider.write_bytes(pack_artifact(tensors, {**model_config, "mlp_mult": 5.0}, quant_config))
    with pytest.raises(ArtifactError, match=rf"{wider}: tensor blocks.0.mlp.c_fc.weight is \[256, 64\] in the "
                                            r"artifact but \[320, 64\] in the model"):
        load_quantized(wider)


def test_over_the_cap_or_missing_checkpoint_writes_nothing(tmp_path):
    run, _ = make_run(tmp_path)
    with pytest.raises(ValueError, match=r"code 15,990,000 \+ model .* is still above the target 16,000,000"):
        quantize_checkpoint(run, 15_990_000, QUANT, TINY_CALIB, Lines(), torch.device("cpu"), progress=False)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "train.log"]
    with pytest.raises(FileNotFoundError, match=r"nowhere/checkpoint.pt not found \(train first"):
        quantize_run(tmp_path / "nowhere", 0, QUANT, TINY_CALIB, Lines(), progress=False)


def test_train_data_calibration_must_fit_the_training_cap(tmp_path):
    calib = CalibConfig(calib_source="train", calib_seqs=2, calib_seq_len=100)
    late, _ = make_run(tmp_path / "late", train_time_s=599.999)
    log = Lines()
    with pytest.raises(RuntimeError, match=r"training 600.0 s \+ calibration on train data .* exceeds the 600 s "
                                           r"training cap .*lower MAX_WALLCLOCK_SECONDS"):
        quantize_checkpoint(late, 0, QUANT, calib, log, torch.device("cpu"), progress=False)
    assert "within_cap:false" in log.starting("calibration_budget ")[0]
    assert not (late / MODEL_FILENAME).exists()
    early, _ = make_run(tmp_path / "early", train_time_s=500)
    log = Lines()
    quantize_checkpoint(early, 0, QUANT, calib, log, torch.device("cpu"), progress=False)
    assert "calibration source:train seqs:2 tokens:200 temperature:-" in log.starting("calibration ")[0]
    assert log.starting("calibration_budget train_time_s:500.0")[0].endswith("within_cap:true")


def test_cli_quantize_logs_to_quantize_log(tmp_path):
    run, _ = make_run(tmp_path, ema=False)
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["quantize", str(run), "CALIB_SEQS=2", "CALIB_SEQ_LEN=16", "PASSTHROUGH_MAX_NUMEL=1024",
                              "--code-bytes", "999", "--quiet"])
    assert args.func(args) == 0
    lines = (run / "quantize.log").read_text().splitlines()
    assert lines[0] == "override setting:calib_seqs:64->2(cli)"
    assert any(line.startswith(f"quantize run_dir:{run} weights:raw steps:7 code_bytes:999") for line in lines)
    model_bytes = (run / MODEL_FILENAME).stat().st_size
    assert lines[-2] == f"Total submission size: {999 + model_bytes} bytes"
    # then the baseline, against an independent torch.save + lzma-9 of the artifact's tensors
    fields = dict(f.split(":") for f in lines[-1].split()[1:])
    assert lines[-1].startswith("artifact_vs_torch_save ") and int(fields["model_bytes"]) == model_bytes
    flat = {}
    for name, value in read_artifact(run / MODEL_FILENAME)[0].items():
        flat.update({name + ".q": value.codes, name + ".scale": value.scales} if isinstance(value, QuantTensor)
                    else {name: value})
    buf = io.BytesIO()
    torch.save(flat, buf)
    assert int(fields["torch_save_lzma9_bytes"]) == len(lzma.compress(buf.getvalue(), preset=9))
    assert math.isfinite(float(next(l for l in lines if l.startswith("quantized_roundtrip_exact")).split(":")[1]
                               .split()[0]))
    with pytest.raises(ValueError, match=r"unknown setting 'NUM_LAYERS'"):  # the model is fixed by the checkpoint
        args = parser.parse_args(["quantize", str(run), "NUM_LAYERS=3"])
        args.func(args)


def test_clip_floor_rises_until_pruning_can_close_the_gap(tmp_path, monkeypatch):
    """Too far over the cap for zeroing +-1 codes, the stage raises QuantConfig.min_clip_sigma (coarser steps, fewer
    bits) and re-quantizes; each rise is logged and the artifact that lands fits. With the clip search (sp1024), whose
    clips start far below SD clipping's 12.85 sigma."""
    run, _ = make_run(tmp_path)
    searched = replace(QUANT, clip_policy="search", gptq_tied_embedding=False)
    quantize_run(run, 0, searched, TINY_CALIB, Lines(), progress=False)
    free = (run / MODEL_FILENAME).stat().st_size
    coarse = QuantConfig(**{**asdict(searched), "min_clip_sigma": 12.0})
    quantize_run(run, 0, coarse, TINY_CALIB, Lines(), progress=False)
    small = (run / MODEL_FILENAME).stat().st_size
    assert small < free - 2000  # the floor does shrink the codes
    monkeypatch.setattr(tools.quant.quantize, "PRUNE_REACH", 0.0)  # this tiny model has too few +-1 codes to prune
    code_bytes = DECIMAL_CAP - (free + small) // 2
    log = Lines()
    quantize_run(run, code_bytes, searched, TINY_CALIB, log, progress=False)
    floors = [float(f.split("min_clip_sigma:")[1]) for f in log.starting("clip_floor ")]
    assert floors and floors == sorted(floors) and floors[0] > 0
    logged = [float(line.split("min_clip_sigma:")[1].split()[0]) for line in log.starting("gptq ")]
    assert logged == [0.0, *floors]
    assert code_bytes + (run / MODEL_FILENAME).stat().st_size <= DECIMAL_CAP


def test_the_run_recipe_sets_quantization_defaults_and_the_tied_embedding_gets_gptq(tmp_path):
    """`pgolf quantize` uses the quantization of the recipe the run was trained with. The default (sp8192): SD
    clipping, and GPTQ of the tied embedding with the head's Hessian (the final hidden states'), at embed_bits; a
    KEY=VALUE still wins. A run of RECIPE=sp1024: the clip search, the embedding rounded to nearest."""
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    settings = ["PASSTHROUGH_MAX_NUMEL=1024", "CALIB_SEQS=2", "CALIB_SEQ_LEN=16", "--code-bytes", "1000", "--device",
                "cpu", "--quiet"]
    run, train_cfg = make_run(tmp_path / "sp8192")
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["train_config"]["recipe"] == "sp8192"
    args = parser.parse_args(["quantize", str(run), "SDCLIP_SIGMAS=10", "BIT_ALLOCATION=0", *settings])
    assert args.func(args) == 0
    log = (run / "quantize.log").read_text()
    assert "clip_policy:sdclip" in log and "quant:tok_emb.weight method:gptq_int8" in log
    assert "setting:sdclip_sigmas:12.85->10.0(cli)" in log and "setting:bit_allocation:True->False(cli)" in log
    tensors, _, quant = read_artifact(run / MODEL_FILENAME)
    assert quant["clip_policy"] == "sdclip" and tensors["tok_emb.weight"].bits == 8
    W = ckpt["ema_state_dict"]["blocks.0.mlp.c_fc.weight"].float()
    assert torch.equal(tensors["blocks.0.mlp.c_fc.weight"].scales, (10.0 * W.std(dim=1) / 31).half())

    run, _ = make_run(tmp_path / "sp1024")
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["train_config"]["recipe"] = "sp1024"
    torch.save(ckpt, run / "checkpoint.pt")
    args = parser.parse_args(["quantize", str(run), *settings])
    assert args.func(args) == 0
    log = (run / "quantize.log").read_text()
    assert "setting:clip_policy:sdclip->search(recipe:sp1024)" in log and "clip_policy:search" in log
    assert "quant:tok_emb.weight method:rtn_int8" in log
    assert "setting:bit_allocation:True->False(recipe:sp1024)" in log
    assert read_artifact(run / MODEL_FILENAME)[2]["clip_policy"] == "search"


def test_pgolf_quantize_refuses_another_tokenizer_unless_the_flag_says_so(tmp_path):
    run, _ = make_run(tmp_path)
    other = other_tokenizer(tmp_path / "other.model")
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    settings = [str(run), f"TOKENIZER_PATH={other}", "PASSTHROUGH_MAX_NUMEL=1024", "CALIB_SEQS=2", "CALIB_SEQ_LEN=16",
                "--code-bytes", "1000", "--device", "cpu", "--quiet"]
    args = parser.parse_args(["quantize", *settings])
    with pytest.raises(ValueError, match="--allow-other-tokenizer to use this one on purpose"):
        args.func(args)
    assert not (run / MODEL_FILENAME).exists() and not (run / "quantize.log").exists()  # the run left as it was
    args = parser.parse_args(["quantize", *settings, "--allow-other-tokenizer"])
    assert args.func(args) == 0 and (run / MODEL_FILENAME).is_file()


def test_lqer_rank_runs_through_the_quantize_stage_and_the_reload(tmp_path):
    """LQER_RANK=2: every GPTQ matrix of the artifact carries its factors, and the reloaded model's weights are
    codes * scales + A @ B (what the artifact holds, not the plain codes)."""
    run, train_cfg = make_run(tmp_path)
    log = Lines()
    model, _ = quantize_run(run, 0, replace(QUANT, lqer_rank=2), TINY_CALIB, log, progress=False)
    assert "lqer_rank:2" in log.starting("gptq ")[0]
    tensors, _, quant = read_artifact(run / MODEL_FILENAME)
    assert quant["lqer_rank"] == 2
    gptq = [n for n, v in tensors.items() if isinstance(v, QuantTensor) and v.lowrank is not None]
    assert len(gptq) == 14 and all(tensors[n].lowrank[0].shape[1] == 2 for n in gptq)  # the tied embedding too
    name = "blocks.0.mlp.c_fc.weight"
    torch.testing.assert_close(model.state_dict()[name], tensors[name].dequantize())
    assert not torch.allclose(model.state_dict()[name], tensors[name].dequantize() - tensors[name].lowrank[0].float()
                              @ tensors[name].lowrank[1].float())


def test_pgolf_quantize_help_lists_every_quantization_and_calibration_setting():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_commands(sub)
    text = sub.choices["quantize"].format_help()
    for kind in (QuantConfig, CalibConfig):
        for f in fields(kind):
            assert f"\n  {f.name.upper()} " in text, f.name
    assert "ALLOCATION_GRID        float,...  0.6,0.7" in text  # a tuple's type and default, one line per field
