"""Tests for eval/stream.py and eval/run.py: window plan, sliding vs flat and vs a reference loop, batching, shards,
RoPE scaling, adapter protocol, evaluate()'s eval-JSON body (no verification) and the `pgolf eval` command."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

from eval.bpb import build_byte_luts
from eval.flat import evaluate_flat
from eval.lora import shard_targets
from eval.run import EvalConfig, evaluate
from eval.stream import plan_windows, rope_scaled, score_stream, window_scores
from submission.config import ModelConfig, resolve, to_dict
from submission.model import GPT, rope_tables
from tests.tiny import EVERY_FEATURE_2_LAYERS

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data" / "sample" / "fineweb_1024_bpe.model"
# Every feature of both recipes on, at a size that scores in seconds on a CPU.
TINY = dict(EVERY_FEATURE_2_LAYERS, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, xsa_last_n=2,
            vocab_size=1024, bigram_buckets=64, bigram_dim=16, value_embed_dim=16)


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**TINY))
    for p in model.parameters():  # move off the zero init so every path contributes
        p.data += 0.05 * torch.randn_like(p)
    return model


@pytest.fixture(scope="module")
def real_tokens(sample_ids):
    """BOS + ids per document of the shipped Wikipedia sample, as the shards hold them."""
    return torch.tensor(sample_ids(4000))


def per_position_reference(model, tokens, context, stride):
    """The records' sliding loop: windows at 0, stride, 2*stride, ... of `context` tokens; the first scores all
    its targets, later ones their last `stride`. NLL per target position 1..N-1 (requires (N-1-context) % stride
    == 0 so that no window is shortened at the end)."""
    n = tokens.numel()
    nll = torch.full((n,), float("nan"))
    with torch.no_grad():
        for ws in range(0, n - context, stride):
            x, y = tokens[ws:ws + context], tokens[ws + 1:ws + context + 1]
            logp = F.log_softmax(model.logits(x[None])[0], -1)
            losses = -logp.gather(1, y[:, None]).squeeze(1)
            keep = context if ws == 0 else stride
            nll[ws + 1 + context - keep:ws + 1 + context] = losses[-keep:]
    return nll[1:]


@pytest.mark.parametrize("first,end,context,stride,chunk", [
    (1, 500, 64, 16, 100), (1, 500, 64, 64, 1000), (37, 400, 50, 7, 33), (1, 30, 64, 16, 8), (200, 201, 64, 8, 5)])
def test_plan_scores_every_target_once_from_a_window_that_holds_its_prefix(first, end, context, stride, chunk):
    starts, lo, hi, chunks = plan_windows(first, end, context, stride, chunk)
    count = np.zeros(end + 1, dtype=int)
    for s, a, b in zip(starts, lo, hi):
        count[a:b] += 1
        assert s + 1 <= a and b - 1 <= s + context  # the window predicts positions s+1 .. s+context
        if s > 0:
            assert b - 1 == s + context and b - a <= stride  # ends at its last target; at most `stride` new
            assert a - 1 - s >= context - stride  # each target keeps at least context - stride tokens before it
        else:
            assert b - 1 <= context
    assert (count[first:end] == 1).all() and count[:first].sum() == 0
    for c_lo, c_hi, w0, w1 in chunks:  # windows never straddle a chunk; chunks tile the range in order
        assert (lo[w0:w1] >= c_lo).all() and (hi[w0:w1] <= c_hi).all()
    assert [c[0] for c in chunks] == list(range(first, end, chunk))


@pytest.mark.parametrize("length", [257, 300])  # 256 targets = 4 windows exactly; 299 leaves a partial window
def test_stride_equal_to_context_is_flat_scoring(real_tokens, length):
    model, luts = tiny_model(), build_byte_luts(spm.SentencePieceProcessor(model_file=str(TOKENIZER)), 1024)
    tokens = real_tokens[:length]
    flat = evaluate_flat(model, tokens.numpy().astype(np.uint16), luts, seq_len=64, batch_seqs=3)
    result = score_stream(model, tokens, 1, length, context=64, stride=64, chunk=10 ** 9, batch_windows=3)
    assert result.coverage.eq(1).all()
    assert math.isclose(result.nll["model"].double().sum().item(), flat.sums[0].item(), rel_tol=1e-6)
    assert flat.tokens == length - 1


def test_sliding_matches_the_records_loop(real_tokens):
    model = tiny_model()
    tokens = real_tokens[:1 + 64 + 16 * 8]
    result = score_stream(model, tokens, 1, tokens.numel(), context=64, stride=16, chunk=10 ** 9, batch_windows=4)
    expected = per_position_reference(model, tokens, 64, 16)
    assert torch.allclose(result.nll["model"], expected, atol=1e-5, rtol=1e-5)


def test_batch_size_does_not_change_the_scores(real_tokens):
    model, tokens = tiny_model(), real_tokens[:300]
    runs = [score_stream(model, tokens, 1, 300, context=64, stride=16, chunk=128, batch_windows=b).nll["model"]
            for b in (2, 5)]
    assert torch.allclose(runs[0], runs[1], atol=1e-5, rtol=1e-5)


def test_shards_tile_the_targets_and_reproduce_the_single_process_scores(real_tokens):
    model, tokens = tiny_model(), real_tokens[:400]
    whole = score_stream(model, tokens, 1, 400, context=64, stride=16, chunk=10 ** 9, batch_windows=8)
    bounds = [shard_targets(399, r, 3, 16) for r in range(3)]
    assert bounds[0][0] == 1 and bounds[-1][1] == 400
    assert all(a[1] == b[0] and (b[0] - 1) % 16 == 0 for a, b in zip(bounds, bounds[1:]))
    parts = [score_stream(model, tokens, f, e, context=64, stride=16, chunk=10 ** 9, batch_windows=8).nll["model"]
             for f, e in bounds]
    assert torch.allclose(torch.cat(parts), whole.nll["model"], atol=1e-5, rtol=1e-5)


def test_window_scores_equal_the_models_log_softmax_at_the_last_positions():
    model = tiny_model()
    x = torch.randint(0, 1024, (3, 40))
    with torch.no_grad():
        expected = F.log_softmax(model.logits(x), -1)[:, -7:]
        logp = window_scores(model, None, x, 7)
        nll, row = window_scores(model, None, x, 7, x[:, -7:])
    assert torch.allclose(logp, expected, atol=1e-5)
    assert torch.allclose(nll, -expected.gather(-1, x[:, -7:, None]).squeeze(-1), atol=1e-5)
    assert torch.allclose(row, expected[0, -1], atol=1e-5)


def test_rope_scaled_stretches_the_lowest_frequency_and_restores_the_base():
    model = tiny_model()
    d, base = model.cfg.rope_dims, model.cfg.rope_base
    x = torch.randint(0, 1024, (1, 32))
    with torch.no_grad():
        before = model.logits(x)
        with rope_scaled(model, 1.0):
            assert torch.equal(model.logits(x), before)
        with pytest.raises(RuntimeError), rope_scaled(model, 4.0):
            _, sin = rope_tables(2, d, model.cfg.rope_base)
            _, sin0 = rope_tables(2, d, base)
            lowest, lowest0 = torch.asin(sin[0, 1, 0, -1]), torch.asin(sin0[0, 1, 0, -1])  # angle at position 1
            highest, highest0 = torch.asin(sin[0, 1, 0, 0]), torch.asin(sin0[0, 1, 0, 0])
            assert math.isclose(lowest.item(), lowest0.item() / 4, rel_tol=1e-4)
            assert math.isclose(highest.item(), highest0.item(), rel_tol=1e-6)
            assert not torch.equal(model.logits(x), before)
            raise RuntimeError("the base must come back even after an error")
    assert model.cfg.rope_base == base


class SpyAdapter:
    """Records what the stream hands it and when; its view is the model's distribution unchanged."""

    def __init__(self, log):
        self.log = log

    def views(self, model_logprobs, tokens, positions, targets):
        self.log.append(("views", tokens.numel(), int(positions[0]), int(positions[-1]) + 1))
        return {"spy": model_logprobs}

    def update(self, tokens, positions):
        self.log.append(("update", tokens.numel(), int(positions[0]), int(positions[-1]) + 1))


class SpyTTT:
    extra_embed = None

    def __init__(self, log):
        self.log = log

    def update(self, known, lo, hi, progress):
        self.log.append(("ttt", known.numel(), lo, hi, progress))


def test_adapters_see_only_the_prefix_and_learn_after_the_chunk_is_scored(real_tokens):
    model, tokens, calls = tiny_model(), real_tokens[:300], []
    result = score_stream(model, tokens, 1, 300, context=32, stride=16, chunk=100, batch_windows=8,
                          ttt=SpyTTT(calls), adapters={"spy": SpyAdapter(calls)})
    chunks = [(1, 101), (101, 201), (201, 300)]
    expected = []
    for i, (lo, hi) in enumerate(chunks):
        expected += [("views", hi - 1, lo, hi), ("update", hi, lo, hi)]
        if i < 2:  # the last chunk is never trained on
            expected.append(("ttt", hi, lo, hi, i / 2))
    assert calls == expected
    assert result.events == [e for lo, hi in chunks for e in
                             [("score", "", lo, hi), ("update", "spy", 0, hi)] + ([("update", "ttt", 0, hi)]
                                                                                   if hi < 300 else [])]
    assert torch.equal(result.nll["spy"], result.nll["model"]) and result.coverage.eq(1).all()


def small_eval_config(**kw) -> EvalConfig:
    settings = dict(context_len=32, stride=8, batch_windows=16, chunk_tokens=128, ttt_batch_seqs=8,
                    compliance=False, compliance_chunk_tokens=64, hash_buckets=256)
    return EvalConfig(**{**settings, **kw})


def test_evaluate_returns_the_contract_body_and_runs_no_verification(real_tokens, sp):
    model, luts = tiny_model(), build_byte_luts(sp, 1024)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lines = []
    tokens = real_tokens[:500].numpy().astype(np.uint16)
    # Verification is eval/verify.py's: evaluate alone ignores the settings, as the packed program does.
    body = evaluate(model, tokens, luts, small_eval_config(ablation=True, compliance=True), progress=False,
                    log=lambda *fields, **kv: lines.append(" ".join([*fields, *(f"{k}:{v}" for k, v in kv.items())])))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # TTT's changes are undone
    assert list(body) == ["val_loss", "val_bpb", "tokens", "bytes", "stages", "projection", "config"]
    assert set(body["stages"]) == {"score", "views", "ngram", "ttt"}
    assert body["tokens"] == 499 and body["bytes"] == int(luts.token_bytes(tokens[:-1], tokens[1:]).sum())
    assert math.isclose(body["val_bpb"], body["val_loss"] / math.log(2) * body["tokens"] / body["bytes"],
                        rel_tol=1e-9)
    assert body["projection"]["full_val_tokens"] == 62_021_632 and body["projection"]["gpus"] == 8
    assert body["config"]["ngram_config"]["order"] == 12 and body["config"]["ablation"] is True
    assert lines[-1] == f"final_eval_exact val_loss:{body['val_loss']:.8f} val_bpb:{body['val_bpb']:.8f}"
    exact = [line.split()[0] for line in lines if line.split()[0].endswith("_exact")]
    assert exact == ["eval_hash_embed_exact", "eval_ngram_exact", "final_eval_exact"]  # no tilt view, no ablation
    assert f"eval_ngram_exact val_loss:{body['val_loss']:.8f} val_bpb:{body['val_bpb']:.8f}" in lines
    json.dumps(body)  # JSON-able as is


def test_the_projection_splits_scoring_and_ttt_over_8_gpus_but_not_the_ngrams_update(real_tokens, sp):
    """On 8 GPUs the ranks divide each chunk's windows and TTT's sequences among them, but every rank counts and
    refits the n-gram on the whole chunk: the projection scales only the split stages by 1/8."""
    body = evaluate(tiny_model(), real_tokens[:500].numpy().astype(np.uint16), build_byte_luts(sp, 1024),
                    small_eval_config(), progress=False)
    stages, scale = body["stages"], 62_021_632 / body["tokens"]
    split = stages["score"] + stages["views"] + stages["ttt"]
    expected = stages.get("compile", 0.0) + scale * (split / 8 + stages["ngram"])
    tolerance = 0.05 + 0.0005 * (1 + scale * (3 / 8 + 1))  # the stages are rounded to 1 ms, the projection to 0.1 s
    assert body["projection"]["seconds"] == pytest.approx(expected, abs=tolerance)
    assert scale * stages["ngram"] * 7 / 8 > 2 * tolerance  # dividing the n-gram by 8 too would fail the check


def test_a_stream_too_short_for_its_ranks_is_refused_before_any_collective(real_tokens, monkeypatch):
    """A rank whose shares are all empty would make no views, and the per-view reductions after the stream would
    wait for it forever: the stream refuses such a split up front, on every rank alike."""
    import eval.stream
    monkeypatch.setattr(eval.stream, "process_group", lambda: (0, 8))
    with pytest.raises(ValueError, match="8 ranks: every chunk has fewer windows than ranks"):
        score_stream(tiny_model(), real_tokens[:100], 1, 100, context=32, stride=16, chunk=64, batch_windows=4,
                     adapters={"spy": SpyAdapter([])})


def test_the_packed_program_refuses_the_tilt_view_which_only_the_kit_carries(monkeypatch):
    import eval.run
    assert EvalConfig(ngram_score="tilt").ngram_score == "tilt"  # the kit has eval/tilt.py
    monkeypatch.setattr(eval.run, "packed", lambda: True)
    with pytest.raises(ValueError, match=r"NGRAM_SCORE='tilt': choose blend \(tilt is the kit's view"):
        EvalConfig(ngram_score="tilt")
    assert EvalConfig().ngram_score == "blend"


def test_eval_overrides_reach_nested_ngram_fields_and_are_validated():
    cfg = EvalConfig()
    changed = resolve(cfg, env={}, cli={"STRIDE": "128", "NGRAM_ORDER": "8", "ngram_score": "tilt"})
    assert (cfg.stride, cfg.ngram_config.order, cfg.ngram_score) == (128, 8, "tilt") and len(changed) == 3
    assert "ngram_order: 12 -> 8 (cli)" in changed
    with pytest.raises(ValueError, match="unknown setting 'STRIDEX': did you mean STRIDE"):
        resolve(EvalConfig(), env={}, cli={"STRIDEX": "1"})
    with pytest.raises(ValueError, match="order"):
        resolve(EvalConfig(), env={}, cli={"NGRAM_ORDER": "0"})
    with pytest.raises(ValueError, match="needs ttt"):
        resolve(EvalConfig(), env={}, cli={"TTT": "0"})
    assert resolve(EvalConfig(), env={"PATH": "/bin", "TTT": "0", "HASH_EMBED": "0"})
    rebuilt = EvalConfig(**dataclasses.asdict(cfg))  # as eval.json stores it
    assert rebuilt == cfg and rebuilt.ngram_config.order == 8


def test_pgolf_eval_writes_eval_json_from_an_artifact(tmp_path, real_tokens):
    from tools.pack.artifact import pack_artifact
    from tools.commands.eval import add_commands
    from tools.records.results import parse_eval_json
    from submission.data import write_shard

    model = tiny_model()
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pgz").write_bytes(pack_artifact(dict(model.state_dict()), to_dict(model.cfg), {}))
    (run / "train.log").write_text("seed:7\ntraining_done steps:12 train_time_s:1.0 step_avg_ms:83.5\n")
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "fineweb_val_000000.bin", real_tokens[:700].numpy().astype(np.uint16))
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["eval", str(run), "CONTEXT_LEN=64", "STRIDE=32", "CHUNK_TOKENS=256",
                              "COMPLIANCE_CHUNK_TOKENS=128", "NGRAM_ORDER=4", "--tokenizer", str(TOKENIZER),
                              "--data-dir", str(data), "--no-ttt"])
    assert args.func(args) == 0
    result = parse_eval_json(run / "eval.json")
    data_out = json.loads((run / "eval.json").read_text())
    assert (result.seed, result.steps, result.val_tokens) == (7, 12, 699)
    assert data_out["bytes_model"] == (run / "model.pgz").stat().st_size
    assert all(v["passed"] for v in data_out["compliance"].values())
    assert data_out["config"]["ttt"] is False and data_out["config"]["ngram_config"]["order"] == 4
