"""Per-document LoRA adapters (eval/lora.py): the model as it is at the start, rows that never mix, a reset that
forgets, and an adapted layer's output checked against the formula."""
import dataclasses
import os
import re

import numpy as np
import pytest
import torch

from eval.lora import BatchedLoRA, adapted_layers
from eval.stream import StageTimer
from submission.config import ModelConfig
from submission.model import GPT
from tests.tiny import EVERY_FEATURE_2_LAYERS

TINY = dict(EVERY_FEATURE_2_LAYERS, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, xsa_last_n=2,
            rope_dims=4, vocab_size=64, bigram_buckets=16, bigram_dim=8, value_embed_dim=8)


def tiny_model() -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    for p in model.parameters():  # off the zero init, so every layer's output matters
        p.data += 0.05 * torch.randn_like(p)
    return model.eval()


def test_the_adapted_layers_are_every_blocks_attention_and_mlp_projections():
    names = sorted(adapted_layers(tiny_model()))
    assert names == sorted(f"blocks.{i}.{t}" for i in range(2)
                           for t in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    with pytest.raises(ValueError, match="match no linear layer"):
        adapted_layers(tiny_model(), ("lm_head.nothing",))
    assert sorted(adapted_layers(tiny_model(), last_n=1)) == [n for n in names if n.startswith("blocks.1.")]


def test_adapters_on_the_last_blocks_only_leave_the_earlier_blocks_without_a_backward():
    """LORA_LAST_N=1: a step's loss reaches the last block's adapters (and the head's) and no earlier block runs a
    backward: the hidden state first entering the last block holds no graph."""
    model = tiny_model().requires_grad_(False)  # the base weights, as the scorer holds them
    lora = BatchedLoRA(model, rank=4, batch=2, last_n=1, head=True)
    assert {k.split("_")[1] for k in lora.keys if k != "head"} == {"1"}
    seen = []
    handle = model.blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].requires_grad))
    with lora.attached():
        h = model.hidden(torch.randint(0, 64, (2, 12)))
        model.head(h, lora.head_delta(h)).sum().backward()
    handle.remove()
    assert seen[0] is False  # (the tiny model loops block 1: its second run reads the first's adapted output)
    assert all(p.grad is not None for p in lora.parameters())


def test_fresh_adapters_leave_the_model_as_it_is():
    model = tiny_model()
    x = torch.randint(0, 64, (3, 12))
    with torch.no_grad():
        plain = model.logits(x)
        with BatchedLoRA(model, rank=4, batch=3).attached():
            adapted = model.logits(x)
    torch.testing.assert_close(adapted, plain, rtol=0, atol=0)


def test_an_adapted_layer_adds_x_a_transpose_b_transpose_for_its_row():
    model = tiny_model()
    lora = BatchedLoRA(model, rank=3, batch=2)
    layer = lora.layers["blocks.1.mlp.c_fc"]
    key = "blocks_1_mlp_c_fc"
    with torch.no_grad():
        lora.B[key].normal_()
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad(), lora.attached():
        out = layer(x)
    for b in range(2):
        want = x[b] @ layer.weight.T + x[b] @ lora.A[key][b].T @ lora.B[key][b].T
        torch.testing.assert_close(out[b], want, rtol=1e-5, atol=1e-5)


def test_rows_never_mix_and_the_loss_of_a_row_reaches_only_its_adapters():
    model = tiny_model()
    lora = BatchedLoRA(model, rank=4, batch=3)
    x = torch.randint(0, 64, (3, 10))
    with torch.no_grad():
        for key in lora.keys:
            lora.B[key].normal_(std=0.1)
    with lora.attached():
        before = model.logits(x).detach()
        with torch.no_grad():
            for key in lora.keys:  # another document's adapter changes
                lora.B[key][2].normal_(std=0.1)
        after = model.logits(x)
        torch.testing.assert_close(after[:2], before[:2], rtol=0, atol=0)
        assert not torch.allclose(after[2], before[2])
        after[0].sum().backward()  # row 0's loss
    for key in lora.keys:
        assert lora.B[key].grad[0].abs().sum() > 0
        assert not lora.B[key].grad[1:].any() and not lora.A[key].grad[1:].any()


def test_rows_select_the_adapters_of_the_documents_still_running():
    model = tiny_model()
    lora = BatchedLoRA(model, rank=4, batch=3)
    with torch.no_grad():
        for key in lora.keys:
            lora.B[key].normal_(std=0.1)
    x = torch.randint(0, 64, (3, 8))
    with torch.no_grad(), lora.attached():
        every = model.logits(x)
        lora.rows = torch.tensor([0, 2])
        some = model.logits(x[[0, 2]])
        lora.rows = torch.tensor([1])
        with pytest.raises(ValueError, match="a batch of 3 rows for 1 adapters"):
            model.logits(x)
    torch.testing.assert_close(some, every[[0, 2]], rtol=1e-5, atol=1e-6)


def test_reset_forgets_what_was_learned_and_detaching_restores_the_model():
    model = tiny_model()
    lora = BatchedLoRA(model, rank=4, batch=2)
    first = {k: lora.A[k].detach().clone() for k in lora.keys}
    with torch.no_grad():
        for key in lora.keys:
            lora.A[key].add_(1.0)
            lora.B[key].normal_()
    lora.reset()
    for key in lora.keys:
        assert torch.equal(lora.A[key], first[key]) and not lora.B[key].any()
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        plain = model.logits(x)
        for key in lora.keys:
            lora.B[key].normal_()
        with lora.attached():
            assert not torch.allclose(model.logits(x), plain)
        torch.testing.assert_close(model.logits(x), plain, rtol=0, atol=0)  # hooks gone


# ------------------------------------------------------------------------------------------- per-document scoring

def _stream(seed: int = 1) -> torch.Tensor:
    """Five documents of different lengths, each opening with BOS (id 1)."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for length in (23, 7, 40, 12, 30):
        parts += [torch.tensor([1]), torch.randint(2, 64, (length,), generator=g)]
    return torch.cat(parts)


def test_documents_tile_the_targets_and_own_the_bos_that_ends_them():
    from eval.lora import document_targets
    tokens = torch.tensor([1, 5, 6, 1, 7, 1, 8, 9, 10])
    assert document_targets(tokens, 1, 9, 1) == [(0, 1, 4), (3, 4, 6), (5, 6, 9)]
    assert document_targets(tokens, 5, 8, 1) == [(3, 5, 6), (5, 6, 8)]  # a document begun before `first`
    assert document_targets(torch.tensor([4, 5, 1, 6]), 1, 4, 1) == [(0, 1, 3), (2, 3, 4)]  # no opening BOS


def _score(model, tokens, **kw):
    from eval.lora import score_documents
    args = dict(rank=4, lr=0.05, chunk=5, batch_docs=2, context=16)
    return score_documents(model, tokens, 1, tokens.numel(), **{**args, **kw})


def test_lora_ttt_scores_each_target_once_from_its_own_document_and_learns_within_it():
    from eval.compliance import check_events_any_order
    model = tiny_model()
    tokens = _stream()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _score(model, tokens)
    n = tokens.numel() - 1
    assert result.coverage.tolist() == [1] * n
    assert check_events_any_order(result.events, 1, tokens.numel())["passed"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # base weights untouched
    assert all(p.requires_grad for p in model.parameters())
    # The first chunk of each document is scored before any step: the model's own scores, read from the document
    # alone (a window that starts at the document's BOS).
    with torch.no_grad():
        for start, lo in ((0, 1), (24, 25), (73, 74)):
            logp = torch.log_softmax(model.logits(tokens[None, start:lo + 4]), -1)[0]
            own = -logp[lo - 1 - start:].gather(-1, tokens[lo:lo + 5, None]).squeeze(-1)
            torch.testing.assert_close(result.nll["model"][lo - 1:lo + 4], own, rtol=1e-5, atol=1e-5)
    # learning happened: later chunks differ from the frozen model's scores of the same windows
    adapted, frozen = result.nll["model"], _score(model, tokens, lr=0.0).nll["model"]
    assert not torch.allclose(adapted, frozen)
    # documents that repeat a 6-token pattern: the adapters learn the repeat within each document
    g = torch.Generator().manual_seed(3)
    repeats = torch.cat([torch.cat([torch.tensor([1]), torch.randint(2, 64, (6,), generator=g).repeat(n)])
                         for n in (8, 12)])
    adapted, frozen = _score(model, repeats).nll["model"], _score(model, repeats, lr=0.0).nll["model"]
    assert float(adapted[-20:].mean()) < 0.5 * float(frozen[-20:].mean())


def test_lora_ttt_is_causal_and_the_illegal_variant_is_caught():
    """C1 on the per-document stream: replacing every token from a cut on leaves every score before it
    bit-identical. The variant that steps on a chunk before scoring it fails C1 and C3."""
    from eval.compliance import check_causality, check_events_any_order
    model = tiny_model()
    tokens = _stream()
    end = tokens.numel()

    def run_dict(context, score):
        return _score(model, context, score_tokens=score).nll

    assert check_causality(run_dict, tokens, 1, end, [30, 60, 90], 64)["passed"]

    def illegal(context, score):
        return _score(model, context, score_tokens=score, step_before_score=True).nll

    assert not check_causality(illegal, tokens, 1, end, [30, 60, 90], 64)["passed"]
    events = _score(model, tokens, step_before_score=True).events
    verdict = check_events_any_order(events, 1, end)
    assert not verdict["passed"] and "update before score" in verdict["detail"]


def test_where_a_document_ends_moves_no_window_of_its_last_chunk():
    """A long document's last chunk is short when the next BOS comes early. Its window is still that of a full chunk
    (at most `context` before the chunk's last column): C1 on the GPU caught a window that reached further back when
    the chunk was short, so replacing the BOS after the cut (the document goes on) changed the score at the cut."""
    from eval.compliance import check_causality
    model = tiny_model()
    g = torch.Generator().manual_seed(5)
    tokens = torch.cat([torch.tensor([1]), torch.randint(2, 64, (40,), generator=g), torch.tensor([1]),
                        torch.randint(2, 64, (20,), generator=g)])

    def run(context, score):
        return _score(model, context, score_tokens=score, rank=0, chunk=5, context=16).nll

    assert check_causality(run, tokens, 1, tokens.numel(), [41], 64)["passed"]  # 41: the BOS, alone in its chunk


def test_late_chunks_take_bigger_steps_once_a_document_fills_the_context():
    """LORA_LATE_CHUNK: `chunk` targets at a time until `context` of a document are scored (from the first chunk
    boundary at or past it), then late_chunk at a time. Each chunk is still scored from at most `context` tokens
    of its own document before its (full) end, the adapter steps at those boundaries only, and C1 holds."""
    from eval.compliance import check_causality
    from eval.lora import chunk_at, chunk_count, document_targets
    assert [chunk_at(s, 5, 12, 16) for s in range(7)] == [(0, 5), (5, 5), (10, 5), (15, 5), (20, 12), (32, 12),
                                                          (44, 12)]
    assert [chunk_count(n, 5, 12, 16) for n in (3, 20, 21, 32, 33)] == [1, 4, 5, 5, 6]
    assert [chunk_at(s, 5, 0, 16) for s in (0, 9)] == [(0, 5), (45, 5)] and chunk_count(21, 5, 0, 16) == 5
    model = tiny_model()
    tokens = _stream()  # documents of 23, 7, 40, 12 and 30 tokens
    result = _score(model, tokens, rank=0, chunk=5, context=16, late_chunk=12)
    expected = torch.zeros(tokens.numel() - 1)
    with torch.no_grad():
        for start, lo, hi in document_targets(tokens, 1, tokens.numel(), 1):
            for p in range(lo, hi):
                offset, size = next(chunk_at(s, 5, 12, 16) for s in range(99)
                                    if sum(chunk_at(s, 5, 12, 16)) > p - lo)
                w0 = max(start, min(lo + offset + size, tokens.numel()) - 1 - 16)
                logp = torch.log_softmax(model.logits(tokens[None, w0:p]), -1)[0, -1]
                expected[p - 1] = -logp[tokens[p]]
    torch.testing.assert_close(result.nll["model"], expected, rtol=1e-5, atol=1e-5)
    adapted = _score(model, tokens, late_chunk=12)  # the default _score: rank 4, chunk 5, context 16
    steps = [e for e in adapted.events if e[0] == "update" and e[2] == 33]  # the 40-token document: targets 33-73
    assert [hi - 33 for *_, hi in steps] == [5, 10, 15, 20, 32]  # its last chunk (targets 65-73) takes no step

    def run(context, score):
        return _score(model, context, score_tokens=score, late_chunk=12).nll

    assert check_causality(run, tokens, 1, tokens.numel(), [30, 60, 80], 64)["passed"]


def test_the_pass_check_runs_c1_as_run_with_documents_in_place_and_alone_with_documents_moved():
    """verify_documents' C1 (what `pgolf eval --lora-ttt` reports): both forms pass on the legal pass, and the
    illegal variant fails both."""
    from eval.lora import verify_documents
    model, tokens = tiny_model(), _stream()
    settings = dict(rank=4, lr=0.05, chunk=5, batch_docs=2, context=16)
    result = _score(model, tokens, **settings)
    c1 = verify_documents(model, tokens, result, settings, 100, 1, lambda *a, **k: None)["C1"]
    assert c1["passed"], c1
    assert "documents kept in place: replacing every token but token 1" in c1["detail"]
    assert "one document per batch, documents moved too: replacing every token from" in c1["detail"]
    illegal = {**settings, "step_before_score": True}
    c1 = verify_documents(model, tokens, _score(model, tokens, **illegal), illegal, 100, 1, lambda *a, **k: None)["C1"]
    assert not c1["passed"] and c1["detail"].count("changed when the tokens") == 2, c1
    from eval.ngram import NgramConfig  # with the n-gram, counting every 25 targets inside the 100 checked
    blended = {**settings, "ngram": NgramConfig(order=3, bos_id=1)}
    result = _score(model, tokens, **blended)
    assert verify_documents(model, tokens, result, blended, 100, 1, lambda *a, **k: None)["C1"]["passed"]


def test_the_head_adapter_adds_to_the_logits_before_the_cap_for_its_row_only():
    model = tiny_model()
    lora = BatchedLoRA(model, rank=3, batch=3, head=True)
    h = torch.randn(2, 4, 32)
    lora.rows = torch.tensor([2, 0])
    with torch.no_grad():
        assert not lora.head_delta(h).any()  # B starts at zero
        lora.B["head"].normal_()
        delta = lora.head_delta(h)
    for i, row in enumerate((2, 0)):  # batch row 0 runs document 2, row 1 document 0
        torch.testing.assert_close(delta[i], h[i] @ lora.A["head"][row].T @ lora.B["head"][row].T)
    c = model.cfg.logit_softcap
    want = c * torch.tanh((h @ model.tok_emb.weight.T + delta) / c)
    torch.testing.assert_close(model.head(h, delta), want, rtol=1e-5, atol=1e-5)
    assert delta.shape == (2, 4, 64) and BatchedLoRA(model, 3, 3).head_delta(h) is None


def test_a_global_phase_trains_the_base_weights_on_exactly_the_documents_scored_before_it():
    """phases=1 every 3 documents, 5 documents in batches of 2: after the second batch (4 documents) one epoch of
    SGD on the base weights over those 4; the fifth document is scored with the new weights, the first four exactly
    as without the phase. Legal (C1, C3) and the model is restored. (C1 caught an earlier schedule that placed the
    phases by the total document count: a count that depends on tokens not yet scored.)"""
    from eval.compliance import check_causality, check_events_any_order
    from eval.ngram import NgramConfig
    model = tiny_model()
    tokens = _stream()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = _score(model, tokens).nll["model"]
    phased = _score(model, tokens, phases=1, phase_docs=3, phase_lr=0.05)  # reached by the second batch
    fifth = 87  # the fifth document's first target (its BOS is at 86)
    assert torch.equal(phased.nll["model"][:fifth - 1], plain[:fifth - 1])
    assert not torch.allclose(phased.nll["model"][fifth - 1:], plain[fifth - 1:])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert check_events_any_order(phased.events, 1, tokens.numel())["passed"]
    phase_updates = [e for e in phased.events if e[1] == "phase"]
    assert [(lo, hi) for _, _, lo, hi in phase_updates] == [(1, 25), (25, 33), (33, 74), (74, 87)]
    def run(context, score):
        return _score(model, context, score_tokens=score, phases=1, phase_docs=3, phase_lr=0.05).nll

    assert check_causality(run, tokens, 1, tokens.numel(), [30, 60, 100], 64)["passed"]
    timer = StageTimer(torch.device("cpu"))
    _score(model, tokens, phases=1, phase_docs=3, timer=timer, ngram=NgramConfig(order=3, bos_id=1))
    assert set(timer.seconds) == {"phase", "ngram"} and min(timer.seconds.values()) > 0


def test_the_projection_scales_the_scoring_and_counts_the_phases_a_share_of_the_full_val_reaches():
    """Scoring and the n-gram scale with the tokens; a phase with the documents it trains on, which depends on
    phase_docs and the group size, not on the val's length: phases at 128 and 256 documents (100 and 200 rounded up
    to groups of 64), of which a share of 50 x 4 = 200 documents reaches the first only."""
    from eval.lora import LoraConfig, projected_stages
    cfg = LoraConfig(phases=2, phase_docs=100, group_docs=64)
    assert projected_stages(10.0, {}, 0, 4.0, 50, LoraConfig()) == {"adapt": 40.0, "ngram": 0.0, "phase": 0.0}
    assert projected_stages(10.0, {"phase": 2.0, "ngram": 1.0}, 64, 4.0, 50, cfg) == \
        {"adapt": 7.0 * 4, "ngram": 4.0, "phase": 2.0 / 64 * 128}
    assert projected_stages(10.0, {"phase": 2.0}, 64, 8.0, 50, cfg)["phase"] == 2.0 / 64 * (128 + 256)


def test_the_warm_up_scores_synthetic_documents_and_the_projection_counts_it_once(monkeypatch):
    """warm_up: LORA_WARMUP_DOCS documents of seeded random tokens (no BOS inside, each past the context and its late
    chunks), with the pass's settings but no phases and no n-gram; the model is as before. evaluate_lora runs it
    first and counts its seconds once in the projection, beside the scaled pass; the scores do not change."""
    import eval.lora as lora
    from eval.bpb import ByteLUTs
    from eval.lora import LoraConfig, evaluate_lora, warm_up
    model, tokens = tiny_model(), _stream()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = LoraConfig(rank=4, lr=0.05, chunk=5, late_chunk=8, batch_docs=2, context=16, phases=1, phase_docs=2,
                     warmup_docs=3)
    seen, score = [], lora.score_documents
    monkeypatch.setattr(lora, "score_documents", lambda m, t, *a, **kw: seen.append((t.clone(), kw)) or score(
        m, t, *a, **kw))
    assert warm_up(model, {**cfg.pass_settings(), "ngram": "unused"}, 3) > 0
    (synthetic, kw), = seen
    bos = (synthetic == model.cfg.bos_id).nonzero().flatten().tolist()
    assert bos == [0, 37, 74, 111] and synthetic.numel() == 112  # 3 x (16 + 2 x 8 + 5), then the closing BOS
    assert kw["phases"] == 0 and kw["ngram"] is None and kw["rank"] == 4 and kw["late_chunk"] == 8
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert warm_up(model, cfg.pass_settings(), 0) == 0.0 and len(seen) == 1

    vocab = model.cfg.vocab_size
    luts = ByteLUTs(np.full(vocab, 2), np.zeros(vocab, dtype=bool), np.zeros(vocab, dtype=bool))
    cold = evaluate_lora(model, tokens, luts, dataclasses.replace(cfg, warmup_docs=0), progress=False, verify=False)
    assert cold["stages"]["warmup"] == 0 and cold["projection"]["stages"]["warmup"] == 0
    warm = evaluate_lora(model, tokens, luts, cfg, progress=False, verify=False)
    assert warm["val_bpb"] == cold["val_bpb"] and warm["stages"]["warmup"] > 0
    asked = []
    monkeypatch.setattr(lora, "warm_up", lambda m, settings, docs: asked.append(docs) or 7.0)
    warm = evaluate_lora(model, tokens, luts, cfg, progress=False, verify=False)
    assert asked == [3] and warm["val_bpb"] == cold["val_bpb"] and warm["stages"]["warmup"] == 7.0
    parts = warm["projection"]["stages"]
    assert parts["warmup"] == 7.0 and parts["adapt"] > 0  # once, beside the scaled pass
    assert warm["projection"]["seconds"] == pytest.approx(sum(parts.values()), abs=0.2)


def test_rank_zero_is_document_masked_scoring_each_target_from_its_own_document():
    """LORA_RANK=0: no adapter. Every target is scored by the frozen model from a window inside its own document:
    at most `context` tokens back from its chunk's end (as if the chunk were full), never before the document's BOS
    (reference: one forward per target over exactly that window)."""
    from eval.lora import document_targets
    model = tiny_model()
    tokens = _stream()
    chunk, context = 5, 16
    result = _score(model, tokens, rank=0, chunk=chunk, context=context)
    expected = torch.zeros(tokens.numel() - 1)
    with torch.no_grad():
        for start, lo, hi in document_targets(tokens, 1, tokens.numel(), 1):
            for p in range(lo, hi):
                # where the document ends moves nothing; the stream's end (its known length) cuts the last chunk
                chunk_end = min(lo + (p - lo) // chunk * chunk + chunk, tokens.numel())
                w0 = max(start, chunk_end - 1 - context)
                logp = torch.log_softmax(model.logits(tokens[None, w0:p]), -1)[0, -1]
                expected[p - 1] = -logp[tokens[p]]
    torch.testing.assert_close(result.nll["model"], expected, rtol=1e-5, atol=1e-5)
    assert result.coverage.tolist() == [1] * (tokens.numel() - 1)
    assert not [e for e in result.events if e[0] == "update"]  # nothing learns
    # an adapter that never steps scores the same: what rank 0 leaves out is exactly the learning
    torch.testing.assert_close(_score(model, tokens, lr=0.0).nll["model"], result.nll["model"], rtol=1e-5,
                               atol=1e-5)


def test_the_ngram_on_lora_blends_in_stream_order_as_the_stream_would_on_the_same_rows(monkeypatch):
    """The "blend" view runs behind the adapted model: over the targets in stream order, ngram_chunk at a time,
    each chunk from the counts of the ones before. Reference: NgramBlender.views on each target's full row of the
    frozen model read from its own document (rank 0), chunk by chunk as the stream runs it. The blend does not
    depend on how documents are batched or grouped, C1 holds with cuts inside a batch's second document, and
    counting each chunk as soon as it is scored reads a later document (C1 fails)."""
    import eval.lora as lora_module
    from eval.compliance import check_causality, check_events_any_order
    from eval.ngram import NgramBlender, NgramConfig
    model = tiny_model()
    tokens = _stream()  # documents of 23, 7, 40, 12 and 30 tokens; batches of 2: (23, 7), (40, 12), (30)
    end = tokens.numel()
    ngram = NgramConfig(order=3, bos_id=1)
    frozen = dict(rank=0, context=64, ngram=ngram, ngram_chunk=20)  # every window opens at its document's BOS
    result = _score(model, tokens, **frozen)
    starts = (tokens == 1).nonzero().flatten().tolist()
    with torch.no_grad():
        rows = torch.stack([torch.log_softmax(model.logits(tokens[None, max(s for s in starts if s < t):t]), -1)[0, -1]
                            for t in range(1, end)])

    def reference(cfg):
        nll, blender = torch.zeros(end - 1), NgramBlender(64, cfg)
        for a in range(1, end, 20):
            positions = torch.arange(a, min(a + 20, end))
            view = blender.views(rows[positions - 1], tokens, positions, tokens[positions])["blend"]
            nll[positions - 1] = -view.gather(1, tokens[positions, None])[:, 0]
            blender.update(tokens, positions)
        return nll

    # With the mixing weights fixed, the blend is a function of the counts and each target's row: equal to float32
    # rounding (the rows, one target at a time here and batched in the pass, differ by ~5e-7).
    fixed = dataclasses.replace(ngram, mix_weights=(-1.0, 0.3, 0.2, 0.5))
    torch.testing.assert_close(_score(model, tokens, **{**frozen, "ngram": fixed}).nll["blend"], reference(fixed),
                               rtol=1e-5, atol=1e-5)
    # Fitted online, the weights come from ~100 scored tokens, a fit that magnifies that rounding ~100x (1.1e-4 seen
    # on one CPU, 7e-5 on another); moving a chunk's end by one target moves some target's blend by over 1 nat.
    torch.testing.assert_close(result.nll["blend"], reference(ngram), rtol=0, atol=1e-3)
    assert not torch.allclose(result.nll["blend"][20:], result.nll["model"][20:])  # the n-gram learned
    assert [e for e in result.events if e[1] == "ngram"][:2] == [("update", "ngram", 1, 21), ("update", "ngram", 1, 41)]
    assert check_events_any_order(result.events, 1, end)["passed"]
    assert torch.isfinite(result.norm["blend"]).all() and float(result.norm["blend"][0]) < 1e-5
    for layout in (dict(batch_docs=1), dict(group_docs=4)):
        torch.testing.assert_close(_score(model, tokens, **frozen, **layout).nll["blend"], result.nll["blend"],
                                   rtol=1e-5, atol=1e-5)
    adapted = dict(ngram=ngram, ngram_chunk=20)
    cuts = [28, 80]  # inside the short second document of the first and of the second batch

    def run(context, score):
        return _score(model, context, score_tokens=score, **adapted).nll

    assert check_causality(run, tokens, 1, end, cuts, 64)["passed"]
    record = lora_module.record_scores

    def count_each_chunk(logp, positions, spans, out):
        record(logp, positions, spans, out)
        for _, c_lo, c_hi, *_ in spans:  # the wrong design: count the chunk now, mid-batch
            out.blender.model.update(out.tokens[c_lo:c_hi], out.tokens[max(0, c_lo - 2):c_lo])

    monkeypatch.setattr(lora_module, "record_scores", count_each_chunk)
    verdict = check_causality(run, tokens, 1, end, cuts, 64)
    assert not verdict["passed"]


def test_rank_zero_on_one_document_is_the_sliding_stream():
    """Without a BOS inside, document-masked scoring with chunk = stride reads exactly the windows of the sliding
    stream (eval/stream.py), so the two scorers must agree target by target."""
    from eval.stream import score_stream
    model = tiny_model()
    tokens = torch.randint(2, 64, (200,), generator=torch.Generator().manual_seed(4))
    sliding = score_stream(model, tokens, 1, 200, context=32, stride=8, chunk=200, batch_windows=4).nll["model"]
    documents = _score(model, tokens, rank=0, chunk=8, context=32, batch_docs=1).nll["model"]
    torch.testing.assert_close(documents, sliding, rtol=1e-5, atol=1e-5)


def test_groups_sorted_by_length_score_each_document_as_before_and_blend_behind_the_group_end():
    """LORA_GROUP_DOCS=4 with batches of 2: the first four documents (23, 7, 40, 12 tokens) run as (40, 23) and
    (12, 7), the fifth alone. Rows never mix, so every document scores as it did in stream-order batches; the
    n-gram blends a chunk only once every target before its end is scored (at the group's end, 86 targets in:
    chunks to 81, the rest at the end), and C1 holds with cuts inside the group."""
    from eval.compliance import check_causality, check_events_any_order
    from eval.ngram import NgramConfig
    model, tokens = tiny_model(), _stream()
    end = tokens.numel()
    ngram = NgramConfig(order=3, bos_id=1)
    plain = _score(model, tokens, ngram=ngram, ngram_chunk=20)
    grouped = _score(model, tokens, ngram=ngram, ngram_chunk=20, group_docs=4)
    for view in ("model", "blend"):
        torch.testing.assert_close(grouped.nll[view], plain.nll[view], rtol=1e-5, atol=1e-5)
    assert [e[3] for e in grouped.events if e[1] == "ngram"] == [21, 41, 61, 81, 101, end]
    assert check_events_any_order(grouped.events, 1, end)["passed"]
    score_events = [i for i, e in enumerate(grouped.events) if e[0] == "score"]
    assert [i for i, e in enumerate(grouped.events) if e[1] == "ngram"][3] < score_events[-1]  # 81 before the 5th

    def run(context, score):
        return _score(model, context, score_tokens=score, ngram=ngram, ngram_chunk=20, group_docs=4).nll

    assert check_causality(run, tokens, 1, end, [28, 80], 64)["passed"]


# ------------------------------------------------------------------------------- replaying the frozen lower blocks

# 4 layers, layers 1-2 looped once (slots 0 1 2 1 2 3), U-Net skips (3 pairs, gated): with LORA_LAST_N=2 the frozen
# slots are 0 and 1, and block 1 runs again, adapted-above, at slot 3
LOOPED = dict(TINY, num_layers=4, loop_layers=(1, 2), num_loops=1, xsa_last_n=4)


def looped_model() -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**LOOPED))
    for p in model.parameters():
        p.data += 0.05 * torch.randn_like(p)
    return model.eval()


def _long_stream() -> torch.Tensor:
    """Seven documents of 7 to 60 tokens after their BOS, some longer than the tests' contexts."""
    g = torch.Generator().manual_seed(2)
    return torch.cat([torch.cat([torch.tensor([1]), torch.randint(2, 64, (n,), generator=g)])
                      for n in (23, 7, 60, 12, 30, 45, 9)])


def _slot_calls(model, block: int) -> tuple[dict[int, int], object]:
    """Calls of the real model.blocks[block] per slot (its forward's last argument), and the hook's handle."""
    calls: dict[int, int] = {}

    def count(module, args):
        calls[args[-1]] = calls.get(args[-1], 0) + 1

    return calls, model.blocks[block].register_forward_pre_hook(count)


def test_replaying_the_frozen_blocks_scores_as_running_them():
    """LORA_REPLAY: the slots below the first adapted block run once per batch (refilled as the windows widen) and
    the steps read them. Same scores, both views, as running every block each step: with depth recurrence (block 1
    frozen at slot 1, run again at slot 3), gated skips, late chunks that slide past the context, groups and a
    global phase between them; also with every slot frozen (rank 0) and with adapters in every block (none).
    The n-gram mixes with fixed weights: fitted online on these few targets, they amplify rounding (a different
    batch layout without replay moves the blend by 0.1 nats)."""
    from eval.lora import frozen_slots, BatchedLoRA as Lora
    from eval.ngram import NgramConfig
    model, tokens = looped_model(), _long_stream()
    assert model.schedule() == [0, 1, 2, 1, 2, 3] and model.num_skips == 3
    assert frozen_slots(model, Lora(model, 2, 1, last_n=2)) == [0, 1]
    assert frozen_slots(model, Lora(model, 2, 1, last_n=1)) == [0, 1, 2, 3, 4]
    assert frozen_slots(model, Lora(model, 2, 1)) == [] and frozen_slots(model, None) == list(range(6))
    common = dict(chunk=3, context=24, late_chunk=12, group_docs=4, phases=1, phase_docs=3, phase_lr=0.05,
                  ngram=NgramConfig(order=3, bos_id=1, mix_weights=(-1.0, 0.3, 0.5, 1.0)), ngram_chunk=20)
    for over in (dict(last_n=2), dict(last_n=1, batch_docs=3), dict(rank=0), dict(last_n=0)):
        on, off = _score(model, tokens, **common, **over), _score(model, tokens, **common, **over, replay=False)
        for view in ("model", "blend"):
            torch.testing.assert_close(on.nll[view], off.nll[view], rtol=0, atol=1e-5)
        assert on.events == off.events and not torch.allclose(on.nll["blend"], on.nll["model"])


def test_the_replay_runs_the_frozen_blocks_once_per_fill_and_the_looped_block_above_at_every_step():
    """With replay, the frozen block 0 runs once per fill (2, 4, ..., 32 columns) and at the steps whose window
    slides; without, at every step (55). Block 1 runs at slot 1 as rarely, but at slot 3 (above the adapted block 2)
    at every step either way."""
    model, tokens = looped_model(), _long_stream()
    counts = {}
    for replay in (True, False):
        calls0, h0 = _slot_calls(model, 0)
        calls1, h1 = _slot_calls(model, 1)
        _score(model, tokens, last_n=2, chunk=2, context=32, late_chunk=8, replay=replay)
        h0.remove(), h1.remove()
        counts[replay] = calls0, calls1
    (on0, on1), (off0, off1) = counts[True], counts[False]
    steps = off0[0]  # without replay: one forward per step
    assert off1 == {1: steps, 3: steps} and on1[3] == steps
    assert on0[0] == on1[1] and 0 < on0[0] <= steps // 2, (on0, steps)  # 25 of 55


def test_the_real_blocks_are_back_after_the_pass_even_when_it_fails(monkeypatch):
    """While a batch runs, the frozen slots' blocks are stand-ins that show the same state_dict (no key added, none
    lost, no parameter twice); after the pass, and after a pass that raises, model.blocks holds the Block objects."""
    import eval.lora as lora_module
    from eval.lora import _ReplayBlock
    model, tokens = looped_model(), _long_stream()
    blocks, keys = list(model.blocks), list(model.state_dict())
    params = len(list(model.parameters()))
    seen = []
    record = lora_module.record_scores

    def check_then_record(logp, positions, spans, out):
        seen.append((type(model.blocks[0]), type(model.blocks[2]), list(model.state_dict()) == keys,
                     len(list(model.parameters())) == params))
        record(logp, positions, spans, out)

    monkeypatch.setattr(lora_module, "record_scores", check_then_record)
    _score(model, tokens, last_n=2, phases=1, phase_docs=3)
    assert seen and set(seen) == {(_ReplayBlock, type(blocks[2]), True, True)}
    assert all(a is b for a, b in zip(model.blocks, blocks)) and list(model.state_dict()) == keys

    def fail(logp, positions, spans, out):
        raise RuntimeError("mid-batch")

    monkeypatch.setattr(lora_module, "record_scores", fail)
    with pytest.raises(RuntimeError, match="mid-batch"):
        _score(model, tokens, last_n=2)
    assert all(a is b for a, b in zip(model.blocks, blocks)) and list(model.state_dict()) == keys


def test_the_replayed_pass_passes_c1_and_its_illegal_variant_fails_it():
    """verify_documents' C1 on the replayed pass (LORA_LAST_N=2 on the looped model, windows that slide): both
    forms pass, bits compared, although the fills read past the cut; the illegal variant fails both."""
    from eval.lora import verify_documents
    model, tokens = looped_model(), _long_stream()
    settings = dict(rank=4, lr=0.05, chunk=5, batch_docs=2, context=16, last_n=2, late_chunk=12)
    quiet = lambda *a, **k: None  # noqa: E731
    c1 = verify_documents(model, tokens, _score(model, tokens, **settings), settings, 120, 1, quiet)["C1"]
    assert c1["passed"], c1
    illegal = {**settings, "step_before_score": True}
    c1 = verify_documents(model, tokens, _score(model, tokens, **illegal), illegal, 120, 1, quiet)["C1"]
    assert not c1["passed"] and c1["detail"].count("changed when the tokens") == 2, c1


def test_lora_replay_is_a_setting_passed_to_the_pass():
    from eval.lora import LoraConfig
    from submission.config import resolve
    cfg = LoraConfig()
    assert cfg.pass_settings()["replay"] is True
    resolve(cfg, env={}, cli={"LORA_REPLAY": "0"})
    assert cfg.pass_settings()["replay"] is False


def test_the_probe_counts_the_ops_a_step_dispatches_and_the_replay_dispatches_fewer():
    """scripts/lora_probe.py --ops: aten ops per adapter step (the host work of the eager pass). The step count is
    score_documents' own. With most blocks frozen, as in the recipe (11 of 15 slots), replaying them dispatches
    fewer ops: here 5 of 6 blocks (with one frozen block the fills and reads cost more ops than they save)."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("lora_probe", Path(__file__).parents[1] / "scripts/lora_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    torch.manual_seed(0)
    model, tokens = GPT(ModelConfig(**dict(TINY, num_layers=6, num_loops=0, xsa_last_n=6))).eval(), _stream()
    settings = dict(rank=4, lr=0.05, chunk=5, batch_docs=2, context=64, last_n=1, ngram=None)
    counts = {}
    for replay in (True, False):
        line = probe.dispatch_per_step(model, tokens, {**settings, "replay": replay})
        steps, ops, per_step = (float(v) for v in re.fullmatch(r"steps (\d+) aten_ops (\d+) per_step (\d+)",
                                                               line).groups())
        # batches (23, 7), (40, 12), (30): 5 + 9 + 6 steps of 5 targets (a document's run to the next BOS)
        assert steps == 20 and abs(per_step - ops / steps) <= 0.5
        counts[replay] = per_step
    assert 0 < counts[True] < counts[False]


def test_the_flash_setting_runs_the_whole_pass_and_its_phases_on_flash_attention_and_scores_the_same():
    """LORA_ATTENTION=flash (the default): every attention call of the pass, the global phase's included, may use
    only the flash kernels (cuDNN plans a kernel per new shape, and the pass's shapes change at each step), and every
    backward runs in torch's deterministic mode (flash's own backward adds up with atomics: C1 saw two runs differ),
    without its memory filling; the process's own backends and modes are back afterwards. cudnn leaves them as the
    process set them. Same scores."""
    from eval.lora import LoraConfig
    import torch.nn.functional as F
    assert LoraConfig().attention == "flash" and os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8"
    model, tokens = looped_model(), _long_stream()
    seen, sdpa, backward, modes = [], F.scaled_dot_product_attention, torch.autograd.backward, []

    def spy(*a, **kw):
        seen.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled()))
        return sdpa(*a, **kw)

    def backward_spy(*a, **kw):
        modes.append((torch.are_deterministic_algorithms_enabled(),
                      torch.utils.deterministic.fill_uninitialized_memory))
        return backward(*a, **kw)

    def state():
        return (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled(),
                torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)

    before = state()
    common = dict(chunk=3, context=24, late_chunk=12, group_docs=4, phases=1, phase_docs=3, phase_lr=0.05)
    try:
        F.scaled_dot_product_attention, torch.autograd.backward = spy, backward_spy
        cudnn = _score(model, tokens, **common, attention="cudnn")
        assert seen and set(seen) == {before[:2]} and modes and set(modes) == {before[2:]}
        backwards = len(modes)  # the adapter steps' and the phase's
        seen.clear(), modes.clear()
        flash = _score(model, tokens, **common, attention="flash")
    finally:
        F.scaled_dot_product_attention, torch.autograd.backward = sdpa, backward
    assert seen and set(seen) == {(True, False)}  # phases (SGD over scored documents) too: not one call on cuDNN
    assert len(modes) == backwards and set(modes) == {(True, False)}
    assert state() == before
    torch.testing.assert_close(flash.nll["model"], cudnn.nll["model"], rtol=0, atol=1e-5)
    assert flash.events == cudnn.events
    with pytest.raises(ValueError, match="LORA_ATTENTION='fa3': choose cudnn or flash"):
        LoraConfig(attention="fa3")
