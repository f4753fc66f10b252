"""tools.quant.allocate: the bit allocation's solver against brute force, its byte estimate against a real compressor,
its probes on a model, and the quantize stage with BIT_ALLOCATION=1."""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import replace

import pytest
import torch

from submission.model import GPT
from tests.test_quantize import QUANT, TINY_CALIB, Lines, make_run, trained_like, MODEL
from tools.pack.artifact import DECIMAL_CAP, MODEL_FILENAME, pack_artifact, read_artifact
from tools.quant.allocate import Probe, allocate, entropy_bytes, probe, quantized_names, single_clip_bytes
from tools.quant.gptq import QuantConfig, QuantTensor
from tools.quant.quantize import quantize_run

GRID = (0.7, 1.0, 1.4, 2.0)


def synthetic(seed: int, n: int = 4) -> list[Probe]:
    """Matrices with loss a m^2 and bytes numel x (bits at 1 - log2 m) / 8, as uniform rounding gives."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(n):
        numel = int(torch.randint(1000, 5000, (1,), generator=g))
        a = float(torch.rand(1, generator=g)) * 1e-3 + 1e-5
        bits = 4 + float(torch.rand(1, generator=g))
        out.append(Probe(f"m{t}", numel, a, [], [numel * (bits - math.log2(m)) / 8 for m in GRID]))
    return out


def brute_force(probes: list[Probe], budget: float) -> float:
    best = math.inf
    for pick in itertools.product(range(len(GRID)), repeat=len(probes)):
        if sum(p.grid_bytes[j] for p, j in zip(probes, pick)) <= budget:
            best = min(best, sum(p.loss_coef * GRID[j] ** 2 for p, j in zip(probes, pick)))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_the_allocation_is_optimal_at_lagrangian_budgets_and_never_worse_than_one_clip(seed):
    """For each price per byte lam, each matrix's own best of loss + lam x bytes (found independently, per matrix) is
    the exact optimum for the bytes it spends (brute force agrees); the allocation with that budget must reach the
    same loss. At any budget it loses no more than any single clip that fits."""
    probes = synthetic(seed)
    for lam in (0.0, 1e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 1.0):
        pick = [min(range(len(GRID)), key=lambda j: (p.loss_coef * GRID[j] ** 2 + lam * p.grid_bytes[j],
                                                     p.grid_bytes[j])) for p in probes]
        budget = sum(p.grid_bytes[j] for p, j in zip(probes, pick))
        best = sum(p.loss_coef * GRID[j] ** 2 for p, j in zip(probes, pick))
        assert brute_force(probes, budget) == pytest.approx(best, rel=1e-12)
        alloc = allocate(probes, GRID, budget)
        assert alloc.predicted_bytes <= budget + 1e-6
        assert alloc.predicted_loss == pytest.approx(best, rel=1e-9)
    cheapest = sum(min(p.grid_bytes) for p in probes)
    richest = sum(max(p.grid_bytes) for p in probes)
    for frac in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
        budget = cheapest + frac * (richest - cheapest)
        alloc = allocate(probes, GRID, budget)
        assert alloc.predicted_bytes <= budget + 1e-6
        for j, m in enumerate(GRID):  # every single clip that fits the budget loses at least as much
            if sum(p.grid_bytes[j] for p in probes) <= budget:
                assert alloc.predicted_loss <= sum(p.loss_coef * m * m for p in probes) + 1e-12
    assert allocate(probes, GRID, richest).multipliers == {p.name: min(GRID) for p in probes}
    assert single_clip_bytes(probes, GRID) == pytest.approx(sum(p.grid_bytes[1] for p in probes))


def test_sensitive_matrices_get_finer_steps():
    """Two equal-sized matrices, one 100 times as sensitive: at the single clip's byte count, the sensitive one gets
    the finer step and the other the coarser (reverse water-filling: steps ~ 1 / sqrt(sensitivity))."""
    grid_bytes = [1000 * (5 - math.log2(m)) / 8 for m in GRID]
    probes = [Probe("hot", 1000, 1e-2, [], grid_bytes), Probe("cold", 1000, 1e-4, [], grid_bytes)]
    alloc = allocate(probes, GRID, 2 * grid_bytes[1])
    assert alloc.multipliers["hot"] < 1.0 < alloc.multipliers["cold"]
    assert alloc.predicted_loss < alloc.uniform_loss


def test_an_unreachable_budget_names_the_fix():
    probes = synthetic(0)
    with pytest.raises(ValueError, match="ALLOCATION_GRID"):
        allocate(probes, GRID, 0.5 * sum(min(p.grid_bytes) for p in probes))


def test_entropy_bytes_is_the_histograms_entropy_and_tracks_the_artifacts_coder():
    codes = torch.tensor([[0, 1, 2, 3] * 64] * 4, dtype=torch.int8)  # 2 bits each: 4 x 256 x 2 / 8 + 4 scales
    assert entropy_bytes(codes) == pytest.approx(4 * 256 * 2 / 8 + 2 * 4)
    # Gaussian weights at int6 steps of 0.2-0.8 std: what the artifact's coder saves from one step to the next is
    # what the estimate predicts, to within the efficiency the quantize stage re-measures (here 0.9-1.3)
    torch.manual_seed(0)
    W = torch.randn(512, 1024)
    estimate, packed = [], []
    for step in (0.2, 0.4, 0.8):
        codes = torch.clamp(torch.round(W / step), -31, 31).to(torch.int8)
        q = QuantTensor(codes, torch.full((512,), step).half(), 6)
        estimate.append(entropy_bytes(codes))
        packed.append(len(pack_artifact({"w": q}, {}, {})))
    for i in range(2):
        assert 0.9 < (packed[i] - packed[i + 1]) / (estimate[i] - estimate[i + 1]) < 1.3


def test_probes_measure_each_matrix_alone_and_restore_the_weights():
    """Each probe is (L(W + d) + L(W - d)) / 2 - L(W) for d the rounding error of that matrix alone (recomputed here
    by hand for one matrix); the weights are the trained ones afterwards. At a minimum of the probed loss (the model
    fitted to the probe tokens first), a three times coarser step costs more on (nearly) every matrix."""
    model = trained_like(MODEL, 0)
    torch.manual_seed(1)
    tokens = torch.randint(0, 1024, (2, 33))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = replace(QUANT, clip_policy="sdclip", bit_allocation=True, allocation_probes=(1.0, 3.0),
                  allocation_grid=GRID)
    names = quantized_names(model.state_dict(), cfg)
    probes = probe(model, names, {"tok_emb.weight"}, cfg, tokens, batch_seqs=1, progress=False)
    assert [p.name for p in probes] == names and len(names) > 5
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name  # every probe put the trained weights back

    def loss() -> float:
        with torch.no_grad():
            return float(sum(model(tokens[i:i + 1, :-1], tokens[i:i + 1, 1:]) for i in range(2)) / 2)
    name = "blocks.1.mlp.c_proj.weight"
    W = before[name]
    scale = (cfg.sdclip_sigmas * 3.0 * W.std(dim=1) / 31).half().float()[:, None]
    d = torch.clamp(torch.round(W / scale), -31, 31) * scale - W
    base, weight = loss(), model.get_parameter(name)
    with torch.no_grad():
        weight.copy_(W + d)
        up = loss()
        weight.copy_(W - d)
        down = loss()
        weight.copy_(W)
    got = next(p for p in probes if p.name == name)
    assert got.probe_loss[1] == pytest.approx((up + down) / 2 - base, abs=1e-6)
    m2 = [1.0, 9.0]
    assert got.loss_coef == pytest.approx(max(sum(d_ * x for d_, x in zip(got.probe_loss, m2)) / 82, 0), rel=1e-6)
    grew = [p for p in probes if p.probe_loss[1] > p.probe_loss[0] > 0]
    assert len(grew) >= 0.8 * len(probes)
    for p in probes:  # coarser steps, fewer bytes
        assert p.grid_bytes == sorted(p.grid_bytes, reverse=True)


def test_bit_allocation_fills_the_cap_with_per_matrix_clips(tmp_path):
    """BIT_ALLOCATION=1 through the quantize stage: with the cap set between the single clip's size and twice its
    step's, the artifact fits, records each matrix's own clip k, and each row's stored scale is k x std / qmax."""
    run, _ = make_run(tmp_path)
    cfg = replace(QUANT, clip_policy="sdclip", sdclip_sigmas=8.0, sdclip_embed_sigmas=12.0)
    quantize_run(run, 0, cfg, TINY_CALIB, Lines(), progress=False)
    single = (run / MODEL_FILENAME).stat().st_size
    allocated = replace(cfg, bit_allocation=True, allocation_seqs=2)
    code_bytes = DECIMAL_CAP - int(single * 0.96)  # 4% under the single clip's size: coarser steps somewhere
    log = Lines()
    quantize_run(run, code_bytes, allocated, TINY_CALIB, log, progress=False)
    assert code_bytes + (run / MODEL_FILENAME).stat().st_size <= DECIMAL_CAP
    lines = log.starting("bit_allocation ")
    assert lines and "predicted_loss_change:" in lines[0]
    assert len(log.starting("allocation:")) == len(quantized_names(torch.load(run / "checkpoint.pt")[
        "ema_state_dict"], cfg))
    tensors, _, quant = read_artifact(run / MODEL_FILENAME)
    sigmas = quant["tensor_sigmas"]
    assert set(sigmas) == {n for n, v in tensors.items() if hasattr(v, "codes")}
    assert len(set(sigmas.values())) > 1  # not one clip for all
    state = torch.load(run / "checkpoint.pt", weights_only=True)["ema_state_dict"]
    for name in ("blocks.0.mlp.c_fc.weight", "blocks.1.attn.c_q.weight"):
        W = state[name].float()
        k = sigmas[name]
        torch.testing.assert_close(tensors[name].scales.float(), (k * W.std(dim=1) / 31).half().float(),
                                   rtol=2e-3, atol=0)


def test_bit_allocation_far_under_the_cap_stops_after_one_round(tmp_path):
    """A model far under the cap gets the finest steps in round 1; a larger budget buys nothing more, so no second
    round re-quantizes and re-packs the same artifact (the demo and the tests ran three identical rounds)."""
    run, _ = make_run(tmp_path)
    cfg = replace(QUANT, clip_policy="sdclip", bit_allocation=True, allocation_seqs=2)
    log = Lines()
    quantize_run(run, 0, cfg, TINY_CALIB, log, progress=False)
    (line,) = log.starting("bit_allocation ")
    finest = min(cfg.allocation_grid)
    assert f"multipliers:{finest:g}x" in line


def test_bit_allocation_needs_sd_clipping():
    with pytest.raises(ValueError, match="CLIP_POLICY=sdclip"):
        QuantConfig(clip_policy="search", bit_allocation=True)
    with pytest.raises(ValueError, match="ALLOCATION_GRID"):
        QuantConfig(clip_policy="sdclip", bit_allocation=True, allocation_grid=(1.0, -2.0))


def _gap_budget():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "gap_budget.py"
    spec = importlib.util.spec_from_file_location("gap_budget", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gap_budget_code_bits_match_rounded_gaussian_samples():
    """scripts/gap_budget.py's byte model: the entropy of N(0, 1) rounded at a step, against counted samples."""
    gb = _gap_budget()
    x = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for step, qmax in [(12.85 / 31, 31), (20 / 127 * 0.6, 127), (1.5, 1)]:
        codes = (x / step).round().clamp(-qmax, qmax).reshape(1, -1)
        counted = (entropy_bytes(codes) - 2) * 8 / codes.numel()  # less the one row's float16 scale
        assert gb.gaussian_code_bits(step, qmax) == pytest.approx(counted, abs=2e-3)


def test_gap_budget_replays_the_logged_allocation(tmp_path, capsys):
    """The model at the log's own choice is scaled to the measured gap; the replay at the same bytes does no worse
    (the allocation is optimal under the model), and more bytes predict a smaller gap."""
    import json
    gb = _gap_budget()
    with torch.device("meta"):
        names = [n for n, t in GPT(MODEL).state_dict().items() if t.ndim == 2]
    lines = [f"allocation:{n} loss_coef:{1e-4 * (i + 1):.3e} multiplier:1 probe_losses:+0" for i, n in
             enumerate(names)]
    lines += ["final_prequant val_loss:3.0 val_bpb:1.30000 steps:10 weights:ema",
              "roundtrip_eval artifact:x tokens:1000 bytes:4000 seconds:1",
              "quantized_roundtrip_exact val_loss:3.01 val_bpb:1.30700"]
    (tmp_path / "train.log").write_text("\n".join(lines) + "\n")
    (tmp_path / "config.json").write_text(json.dumps({"model": vars(MODEL)}))
    gb.main([str(tmp_path / "train.log"), "--extra-mb", "0.001,0.01"])
    out = capsys.readouterr().out
    modelled, scale = map(float, re.search(r"modelled (\S+) at .* scale (\S+)", out).groups())
    assert modelled * scale == pytest.approx(0.007, rel=1e-3) and "measured gap +0.00700" in out
    rows = [r.split(" | ") for r in out.splitlines() if r.startswith("| +")]
    predicted = [float(r[2]) for r in rows]
    assert predicted[0] <= modelled + 1e-5 and predicted[0] > predicted[1] > predicted[2] > 0
    (tmp_path / "train.log").write_text("allocation:blocks.99.attn.c_q.weight loss_coef:1e-4 multiplier:1\n")
    with pytest.raises(SystemExit, match="config.json"):
        gb.main([str(tmp_path / "train.log")])
