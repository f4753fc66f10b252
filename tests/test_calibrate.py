"""tools.quant.calibrate and the model's KV cache: cached decode == GPT's full forward (every feature, depth recurrence,
the speedrun switches), sampling right and seeded, Hessians (the head's included), train tokens."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from submission.config import ModelConfig
from submission.data import write_shard
from submission.model import GPT, CastedLinear, KVCache, plain_linears
from tools.quant.calibrate import CalibConfig, calibrate, generate, hessian_modules, train_tokens

BOS = 1
# Every feature of the sp1024 stack on, at its q gain and MLP width: GQA, XSA on some layers, partial RoPE, value
# embeddings on the last 2 of 5 layers (an odd count: the last decoder block has no U-Net partner), BigramHash,
# SmearGate, second embedding, resid_mix, ln_scale, qk_norm, softcap.
ALL_ON = ModelConfig(vocab_size=48, num_layers=5, model_dim=32, num_heads=4, num_kv_heads=2, xsa_last_n=3, rope_dims=4,
                     bigram_buckets=16, bigram_dim=8, value_embed_last_n=2, value_embed_dim=8, embed2=True,
                     q_gain_init=1.5, mlp_mult=3.0, num_loops=0, parallel_last_n=0, skip_gates=False)
# Every optional feature off, an untied head, no RoPE, no softcap, MHA.
ALL_OFF = ModelConfig(vocab_size=48, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=2, xsa_last_n=0, rope_dims=0,
                      bigram_buckets=0, smear_gate=False, value_embed_last_n=0, unet_skips=False, resid_mix=False,
                      tie_embeddings=False, logit_softcap=0.0, qk_norm=False, ln_scale=False, embed2=False,
                      num_loops=0, parallel_last_n=0, skip_gates=False)
# ...and the speedrun switches on top: key offset on the last 3 layers (2 of the 6 unrotated dims), per-layer bigram.
SWITCHES = dataclasses.replace(ALL_ON, key_offset_last_n=3, key_offset_dims=2, layer_bigram_buckets=20)


def random_model(cfg: ModelConfig, seed: int = 0) -> GPT:
    """A GPT with every parameter perturbed: the zero-initialized projections, bigram table and head would otherwise
    hide whole code paths (a block that starts as the identity cannot show a wrong attention)."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn_like(p) / p.size(1) ** 0.5)
            else:
                p.add_(0.2 * torch.randn_like(p))
        if model.smear is not None:  # sigmoid(-3 +- 0.2) ~ 0.05 everywhere would be nearly a per-token scale
            model.smear.gate.normal_()
    return model.eval()


def tokens_with_bos(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(2, vocab, (batch, length), generator=g)
    idx[0, 0] = BOS               # a document start at position 0
    idx[1, 5] = idx[1, 11] = BOS  # documents starting mid-sequence (SmearGate and BigramHash must not cross them)
    idx[2, 6:8] = BOS             # two BOS in a row
    return idx


# ...and the SP8192 generation's structure: layers 1-2 looped twice more (schedule 0 1 2 1 2 1 2 3 4), parallel
# residuals on the last 2 layers, gated skips (7 slots of the U-Net: 4 encoder positions, 5 decoder ones).
LOOPED = dataclasses.replace(ALL_ON, num_loops=2, loop_layers=(1, 2), parallel_last_n=2, skip_gates=True)


@pytest.mark.parametrize("cfg", [ALL_ON, ALL_OFF, SWITCHES, LOOPED], ids=["all_on", "all_off", "switches", "looped"])
def test_cached_decode_equals_full_forward(cfg):
    model = random_model(cfg)
    idx = tokens_with_bos(3, 20, cfg.vocab_size, seed=1)
    cache = KVCache(model, batch=3, max_len=24)  # cache longer than the sequence: masked positions
    with torch.no_grad(), plain_linears(model):
        full = model.logits(idx)
        steps = torch.cat([model.logits(idx[:, t:t + 1], cache=cache) for t in range(20)], 1)
    assert full.abs().max() > 1.0  # the check is not on a degenerate near-zero output
    assert int(cache.pos) == 20
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-5)
    with torch.no_grad():  # reset: the same stream again gives the same logits
        cache.reset()
        again = torch.cat([model.logits(idx[:, t:t + 1], cache=cache) for t in range(20)], 1)
    torch.testing.assert_close(again, steps, rtol=0, atol=0)


def test_cache_slots_follow_the_layer_schedule_and_decode_one_position():
    model = random_model(LOOPED)
    assert model.schedule() == [0, 1, 2, 1, 2, 1, 2, 3, 4] and KVCache(model, 1, 8).slots == 9
    model.looping = False
    assert KVCache(model, 1, 8).slots == 5
    with pytest.raises(ValueError, match="one position per call"):
        model.logits(torch.ones(1, 2, dtype=torch.long), cache=KVCache(model, 1, 8))


def test_decoding_refuses_live_qat():
    model = random_model(ALL_ON)
    model.set_qat(True)
    with pytest.raises(ValueError, match=r"late QAT is on .*set_qat\(False\)"):
        generate(model, CalibConfig(calib_seqs=1, calib_seq_len=4), progress=False)


def test_generate_is_greedy_at_low_temperature_and_seeded():
    model = random_model(ALL_ON, seed=2)
    cfg = CalibConfig(calib_seqs=3, calib_seq_len=16, calib_temperature=1e-4, calib_seed=5)
    tokens = generate(model, cfg, progress=False)
    assert tokens.shape == (3, 16) and tokens.dtype == torch.long and (tokens[:, 0] == BOS).all()
    with torch.no_grad():  # independent reference: every token is the full forward's argmax after its prefix
        assert torch.equal(tokens[:, 1:], model.logits(tokens)[:, :-1].argmax(-1))
    warm = CalibConfig(calib_seqs=3, calib_seq_len=16, calib_seed=5)
    first = generate(model, warm, progress=False)
    assert torch.equal(first, generate(model, warm, progress=False))
    other = generate(model, CalibConfig(calib_seqs=3, calib_seq_len=16, calib_seed=6), progress=False)
    assert not torch.equal(first, other)
    assert not model.training


def test_generate_samples_the_tempered_distribution():
    model = random_model(ALL_ON, seed=3)
    n, temperature = 4000, 0.7
    tokens = generate(model, CalibConfig(calib_seqs=n, calib_seq_len=2, calib_temperature=temperature), progress=False)
    with torch.no_grad():
        probs = torch.softmax(model.logits(torch.full((1, 1), BOS))[0, 0] / temperature, -1).double()
    counts = torch.bincount(tokens[:, 1], minlength=model.cfg.vocab_size).double()
    assert probs.max() < 0.5  # a spread distribution, so the frequencies test the sampler
    # Pearson chi-square with 47 degrees of freedom: its 99.99th percentile is ~93
    chi2 = float(((counts - n * probs) ** 2 / (n * probs)).sum())
    assert chi2 < 93, chi2


def test_calibrate_collects_every_linear_from_generated_tokens():
    model = random_model(ALL_ON, seed=4)
    cfg = CalibConfig(calib_seqs=3, calib_seq_len=12, calib_batch_seqs=2)
    cal = calibrate(model, cfg, progress=False)
    names = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, CastedLinear)}
    assert set(hessian_modules(model)) == names
    assert set(cal.stats.hessians) == names | {"tok_emb.weight"}  # + the tied head's: the final hidden states
    assert cal.stats.batches == 2 and cal.tokens == 36 and cal.source == "generated"
    assert all(tokens == 36 for tokens in cal.stats.tokens.values())
    # Reference: the Gram of the first layer's MLP input from a forward over the same generated tokens.
    tokens = generate(model, cfg, progress=False)
    seen = []
    hook = model.blocks[0].mlp.c_fc.register_forward_hook(lambda m, args, out: seen.append(args[0].reshape(-1, 32)))
    with torch.no_grad():
        model.hidden(tokens)
    hook.remove()
    X = torch.cat(seen).double()
    torch.testing.assert_close(cal.stats.hessians["blocks.0.mlp.c_fc.weight"], (X.T @ X).float(), rtol=1e-5,
                               atol=1e-5)
    with torch.no_grad():  # the head reads the final hidden states: their Gram is the embedding's Hessian as a head
        h = model.hidden(tokens).reshape(-1, 32).double()
    torch.testing.assert_close(cal.stats.hessians["tok_emb.weight"], (h.T @ h).float(), rtol=1e-5, atol=1e-5)


def test_an_untied_head_gets_its_hessian_from_the_final_hidden_states():
    model = random_model(ALL_OFF, seed=4)
    cal = calibrate(model, CalibConfig(calib_seqs=2, calib_seq_len=8), progress=False)
    assert "lm_head.weight" in cal.stats.hessians and "tok_emb.weight" not in cal.stats.hessians
    assert cal.stats.tokens["lm_head.weight"] == 16


def test_train_tokens_reads_the_first_train_tokens(tmp_path):
    stream = np.arange(100, dtype=np.uint16)
    write_shard(tmp_path / "fineweb_train_000000.bin", stream[:30])
    write_shard(tmp_path / "fineweb_train_000001.bin", stream[30:])
    cfg = CalibConfig(calib_source="train", calib_seqs=4, calib_seq_len=10)
    assert torch.equal(train_tokens(str(tmp_path), cfg), torch.arange(40).view(4, 10))
    with pytest.raises(ValueError, match=r"hold 100 tokens, fewer than .* = 120"):
        train_tokens(str(tmp_path), CalibConfig(calib_seqs=12, calib_seq_len=10))


def test_calib_config_validation():
    with pytest.raises(ValueError, match="calib_source='val'"):
        CalibConfig(calib_source="val")
    with pytest.raises(ValueError, match="calib_seq_len >= 2"):
        CalibConfig(calib_seq_len=1)
    with pytest.raises(ValueError, match="calib_temperature=0"):
        CalibConfig(calib_temperature=0)


@pytest.mark.parametrize("kw, message", [
    ({"calib_seqs": 0}, r"^CALIB_SEQS=0: must be >= 1 \(CalibConfig.calib_seqs=0\)$"),
    ({"calib_seed": -1}, r"^CALIB_SEED=-1: must be >= 0"),
    ({"calib_batch_seqs": 0}, r"^CALIB_BATCH_SEQS=0: must be >= 1"),
    ({"calib_temperature": float("inf")}, r"^CALIB_TEMPERATURE=inf: must be > 0"),
    ({"calib_seq_len": 1}, r"^CALIB_SEQ_LEN=1: need calib_seq_len >= 2, the leading BOS and at least one token$"),
])
def test_calib_config_names_the_setting_as_typed(kw, message):
    with pytest.raises(ValueError, match=message):
        CalibConfig(**kw)
    CalibConfig(calib_seqs=1, calib_seq_len=2, calib_seed=0, calib_batch_seqs=1)
