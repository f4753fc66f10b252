"""The quantize stage: checkpoint -> calibration -> GPTQ -> budget-fitted RUN_DIR/model.pgz -> reload and score it."""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from eval.bpb import BPBAccumulator, byte_luts
from eval.flat import evaluate_flat
from submission.config import ModelConfig, TrainConfig, from_dict, to_dict
from submission.data import load_tokens
from submission.model import GPT
from submission.runtime import check_tokenizer, tokenizer_identity, writable_check
from tools.pack.artifact import (DECIMAL_CAP, MODEL_FILENAME, ArtifactError, fit_to_budget, pack_artifact,
                                 read_artifact, to_state_dict, write_artifact)
from tools.quant.allocate import Probe, allocate, probe, quantized_names, single_clip_bytes, tensor_sigmas
from tools.quant.calibrate import CalibConfig, calibrate, synced_clock
from tools.quant.gptq import QuantConfig, QuantTensor, quantize_state_dict

# The challenge's training cap. Calibrating on train data is legal only inside it, whatever MAX_WALLCLOCK_SECONDS says.
TRAIN_CAP_SECONDS = 600.0
# How far over the cap (as a share of the model bytes) zeroing +-1 codes is asked to close; beyond it the clip floor
# (QuantConfig.min_clip_sigma) rises and GPTQ re-runs. A P1 model (H100, 240 s) packed to 17,277,442 bytes with
# clips from 3 sigma: zeroing all 2,491,438 of its +-1 codes did not reach 16,000,000 (its int6 codes are wide).
PRUNE_REACH = 0.02
FLOOR_OVERSHOOT = 1.15   # aim a little under the cap: a round costs GPTQ + a pack (~20 s on the H100 host)
MAX_FLOOR_ROUNDS = 6
# Beyond this the int6 step exceeds half a std (16 sigma / 31): a model that needs more is too big for the cap, and
# the budget fit's error says so instead of shipping noise.
MAX_CLIP_FLOOR = 16.0
# The bit allocation aims this share of the model under the cap (its byte prediction is an entropy estimate, corrected
# by what each round packed), and stops once within ALLOCATION_FILL under it; the prune fit closes any overshoot.
ALLOCATION_SLACK = 0.001
ALLOCATION_FILL = 0.003
ALLOCATION_ROUNDS = 3


@dataclass
class Checkpoint:
    """What quantization needs from RUN_DIR/checkpoint.pt."""
    model_config: ModelConfig
    train_config: TrainConfig
    state_dict: dict[str, torch.Tensor]
    weights: str   # "ema" or "raw"
    steps: int
    tokenizer: dict | None = None  # path, sha256, pieces of the tokenizer it was trained with (None: older kit)


def load_checkpoint(run_dir: str | os.PathLike) -> Checkpoint:
    """RUN_DIR/checkpoint.pt with the EMA weights when the run kept them (they are what the trainer scored last)."""
    path = Path(run_dir) / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (train first: python -m tools.pipeline RUN_DIR={run_dir})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model_cfg = from_dict(ModelConfig, ckpt["model_config"])
        train_cfg = from_dict(TrainConfig, ckpt["train_config"])
    except (KeyError, ValueError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: not a readable kit checkpoint ({type(err).__name__}: {err}); train again") from None
    ema = ckpt.get("ema_state_dict")
    return Checkpoint(model_cfg, train_cfg, ema if ema is not None else ckpt["state_dict"],
                      "ema" if ema is not None else "raw", int(ckpt["steps"]), ckpt.get("tokenizer"))


def read_training_done(run_dir: str | os.PathLike) -> dict[str, str]:
    """key:value fields of the last `training_done` line of RUN_DIR/train.log."""
    path = Path(run_dir) / "train.log"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (the run's log: train first)")
    lines = [line for line in path.read_text().splitlines() if line.startswith("training_done ")]
    if not lines:
        raise ValueError(f"{path}: no `training_done` line (training did not finish; train again)")
    return dict(field.split(":", 1) for field in lines[-1].split()[1:] if ":" in field)


def load_quantized(path: str | os.PathLike, device: torch.device | str = "cpu") -> GPT:
    """A fresh GPT built from the artifact's own model config, holding its dequantized weights."""
    tensors, model_config, _ = read_artifact(path)
    try:
        cfg = from_dict(ModelConfig, model_config)
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"{path}: model config does not fit this kit's ModelConfig ({err})") from None
    model = GPT(cfg).to(device)
    model.load_state_dict(to_state_dict(tensors, model.state_dict(), str(path)))
    return model.eval()


def _typical_absmax_sigmas(state: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor]) -> float:
    """Median over the GPTQ matrices' rows of absmax/std: the clip, in stds, that the codes use when no clip wins."""
    ratios = []
    for name in hessians:
        W = state[name].float()
        ratios.append(W.abs().amax(dim=1) / W.std(dim=1).clamp_min(1e-12))
    return float(torch.cat(ratios).median())


def _log_gptq(log, report, quant_cfg: QuantConfig, cal, hessians: dict[str, torch.Tensor], gptq_s: float) -> None:
    for line in report.lines():
        log(line, file_only=True)
    gptq = {n: i for n, i in report.infos.items() if i["method"] == "gptq"}
    retried = {n: i["damp"] for n, i in gptq.items() if i["damp_retries"]}
    methods = [m.split()[0] for m in report.methods.values()]
    log("gptq", seconds=round(gptq_s, 2), gptq=methods.count("gptq"), rtn=methods.count("rtn"),
        fp16=methods.count("fp16"), damp_grown=len(retried),
        max_damp=max(retried.values(), default=quant_cfg.damp), min_calibration_tokens=min(cal.stats.tokens.values()),
        clip_policy=quant_cfg.clip_policy, lqer_rank=quant_cfg.lqer_rank,
        clip_sigmas=",".join(f"{k:g}" for k in quant_cfg.clip_sigmas),
        min_clip_sigma=round(quant_cfg.min_clip_sigma, 3))
    short = {n: h.size(0) for n, h in hessians.items() if cal.stats.tokens[n] < h.size(0)}
    if short:  # H = X^T X has rank <= tokens: the damping (QuantConfig.damp x mean diag) is what makes it invertible
        log("gptq_rank_deficient", hessians=len(short), min_tokens=min(cal.stats.tokens[n] for n in short),
            max_input_dims=max(short.values()), damp=quant_cfg.damp)
    for name, damp in retried.items():  # damping had to grow for Cholesky to succeed: say where
        log("gptq_damping", tensor=name, damp=damp, tokens=cal.stats.tokens[name],
            input_dims=hessians[name].size(0))


def quantize_checkpoint(run_dir: str | os.PathLike, code_bytes: int, quant_cfg: QuantConfig, calib_cfg: CalibConfig,
                        log, device: torch.device, data_dir: str | None = None, progress: bool = True,
                        tokenizer: dict | None = None, allow_other_tokenizer: bool = False
                        ) -> tuple[Path, dict[str, QuantTensor | torch.Tensor]]:
    """Calibrate, GPTQ and budget-fit the run's checkpoint; write RUN_DIR/model.pgz atomically.

    `tokenizer` (tokenizer_identity of the one the caller scores with) must be the checkpoint's, unless
    allow_other_tokenizer; the artifact records the checkpoint's identity, so `pgolf eval` can check it in turn.
    Returns the artifact's path and the tensors as packed.
    """
    run_dir = Path(run_dir)
    ckpt = load_checkpoint(run_dir)
    if tokenizer:
        check_tokenizer(ckpt.tokenizer, tokenizer, run_dir / "checkpoint.pt", log, allow_other_tokenizer)
    writable_check(run_dir / MODEL_FILENAME, "RUN_DIR")
    log("quantize", run_dir=str(run_dir), weights=ckpt.weights, steps=ckpt.steps, code_bytes=code_bytes,
        device=str(device))
    model = GPT(ckpt.model_config).to(device)
    model.load_state_dict(ckpt.state_dict)

    cal = calibrate(model, calib_cfg, data_dir or ckpt.train_config.data_dir, progress)
    log("calibration", source=cal.source, seqs=cal.sequences, tokens=cal.tokens,
        temperature=calib_cfg.calib_temperature if cal.source == "generated" else "-", seed=calib_cfg.calib_seed,
        data_s=round(cal.data_seconds, 2), hessian_s=round(cal.hessian_seconds, 2),
        calibration_s=round(cal.data_seconds + cal.hessian_seconds, 2), hessians=len(cal.stats.hessians))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    # Tables looked up by token id (token, bigram, value, speedrun tables): at embed_bits, never int6; round to
    # nearest, except the tied embedding as a head when gptq_tied_embedding (GPTQ with the final hidden states' H).
    names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)]
    probes, probe_s = None, 0.0
    if quant_cfg.bit_allocation:  # the sensitivity probes score calibration tokens: they count as calibration
        t0 = synced_clock(device)
        probes = probe(model, quantized_names(state, quant_cfg), set(names), quant_cfg,
                       cal.token_ids[:quant_cfg.allocation_seqs], calib_cfg.calib_batch_seqs, progress)
        probe_s = synced_clock(device) - t0
    total_s = cal.data_seconds + cal.hessian_seconds + probe_s
    if cal.source == "train":
        train_s = float(read_training_done(run_dir).get("train_time_s", "nan"))
        within = train_s + total_s <= TRAIN_CAP_SECONDS
        log("calibration_budget", train_time_s=round(train_s, 2), calibration_s=round(total_s, 2),
            total_s=round(train_s + total_s, 2), cap_s=TRAIN_CAP_SECONDS, within_cap=str(within).lower())
        if not within:
            raise RuntimeError(f"{run_dir / 'train.log'}: training {train_s:.1f} s + calibration on train data "
                               f"{total_s:.1f} s = {train_s + total_s:.1f} s exceeds the {TRAIN_CAP_SECONDS:.0f} s "
                               "training cap (train data may only be read inside it): lower MAX_WALLCLOCK_SECONDS "
                               f"by at least {train_s + total_s - TRAIN_CAP_SECONDS:.0f} s, or CALIB_SOURCE=generated")

    hessians = dict(cal.stats.hessians)
    if not quant_cfg.gptq_tied_embedding:
        hessians.pop("tok_emb.weight", None)
    # the model's tokenizer rides in the artifact's quantization record (no format change; readers ignore the key)
    quant_record = {**asdict(quant_cfg), **asdict(calib_cfg), "tokenizer": ckpt.tokenizer}
    model_config = to_dict(ckpt.model_config)
    pack_s, rounds = 0.0, 0

    def quantize_and_pack(sigmas: dict[str, float] | None = None, record: dict | None = None) -> tuple[dict, bytes]:
        nonlocal pack_s
        t0 = time.perf_counter()
        tensors, report = quantize_state_dict(state, hessians, names, quant_cfg, progress, sigmas)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        _log_gptq(log, report, quant_cfg, cal, hessians, time.perf_counter() - t0)
        t0 = time.perf_counter()
        blob = pack_artifact(tensors, model_config, record or quant_record)
        pack_s += time.perf_counter() - t0
        return tensors, blob

    while True:
        tensors, blob = quantize_and_pack()
        over = code_bytes + len(blob) - DECIMAL_CAP
        if probes is not None or over <= PRUNE_REACH * len(blob) or rounds == MAX_FLOOR_ROUNDS:
            break
        # Too far over for zeroing +-1 codes: coarser steps on every row. Each doubling of a step saves ~1 bit per
        # code, so the floor grows by 2^(bits to save per code), from the rows' typical absmax/std at first.
        codes = sum(v.codes.numel() for v in tensors.values() if isinstance(v, QuantTensor))
        base = quant_cfg.min_clip_sigma or (quant_cfg.sdclip_sigmas if quant_cfg.clip_policy == "sdclip" else
                                            _typical_absmax_sigmas(state, hessians))
        floor = min(base * 2 ** (FLOOR_OVERSHOOT * 8 * over / codes), MAX_CLIP_FLOOR)
        if floor <= quant_cfg.min_clip_sigma:
            break
        log("clip_floor", model_bytes=len(blob), over_by=over, min_clip_sigma=round(floor, 3))
        quant_cfg = replace(quant_cfg, min_clip_sigma=floor)
        quant_record = {**asdict(quant_cfg), **asdict(calib_cfg), "tokenizer": ckpt.tokenizer}
        rounds += 1
    if probes is not None:
        tensors, blob, quant_record = _allocated(probes, quant_cfg, set(names), blob, code_bytes, quant_record,
                                                 quantize_and_pack, log, probe_s)

    t0 = time.perf_counter()
    hessian_diag = {n: h.diagonal() for n, h in hessians.items()}
    blob, packed, budget = fit_to_budget(tensors, hessian_diag, code_bytes, model_config, quant_record,
                                         progress=progress, blob=blob)
    pack_s += time.perf_counter() - t0
    for line in budget.lines():
        log(line)
    path = run_dir / MODEL_FILENAME
    write_artifact(path, blob, code_bytes)
    log("artifact", path=str(path), compressor=budget.compressor, model_bytes=len(blob), pack_s=round(pack_s, 2))
    return path, packed


def _allocated(probes: list[Probe], quant_cfg: QuantConfig, embedding_names: set[str], uniform_blob: bytes,
               code_bytes: int, quant_record: dict, quantize_and_pack, log, probe_s: float):
    """Re-quantize with per-matrix clips (tools/quant/allocate.py) sized to the cap; returns (tensors, blob, the
    artifact's quantization record with each matrix's clip).

    The allocation counts code bytes as entropies; the packed size moves by about as much from the single-clip
    artifact, but not exactly (brotli sees more than a histogram, and GPTQ's codes are not RTN's). Each round takes
    what the last one packed over or under the target off or onto the entropy budget; the fullest artifact that fits
    (else the smallest) is kept, and the prune fit closes what is left.
    """
    cap = DECIMAL_CAP - code_bytes
    target = cap - ALLOCATION_SLACK * len(uniform_blob)
    grid = quant_cfg.allocation_grid
    uniform_bytes = single_clip_bytes(probes, grid)
    budget = uniform_bytes + target - len(uniform_blob)
    best, best_key, last = None, None, None
    for round_ in range(1, ALLOCATION_ROUNDS + 1):
        alloc = allocate(probes, grid, budget)
        if alloc.multipliers == last:  # the new budget buys no other step (far under the cap): the same artifact
            break
        last = alloc.multipliers
        sigmas = tensor_sigmas(alloc, quant_cfg, embedding_names)
        record = {**quant_record, "tensor_sigmas": {n: round(k, 4) for n, k in sigmas.items()}}
        tensors, blob = quantize_and_pack(sigmas, record)
        counts = {m: list(alloc.multipliers.values()).count(m) for m in grid}
        log("bit_allocation", round=round_, probe_s=round(probe_s, 2), model_bytes=len(blob),
            single_clip_bytes=len(uniform_blob), entropy_budget_change=round(budget - uniform_bytes),
            predicted_loss_change=f"{alloc.predicted_loss - alloc.uniform_loss:+.5f}",
            multipliers=",".join(f"{m:g}x{n}" for m, n in counts.items() if n))
        fits = len(blob) <= cap
        key = (fits, len(blob) if fits else -len(blob))  # any fitting round beats any other; then the fuller
        if best is None or key > best_key:
            best, best_key = (tensors, blob, alloc, record), key
        if fits and cap - len(blob) <= ALLOCATION_FILL * len(blob):
            break
        budget -= len(blob) - target
    tensors, blob, alloc, record = best
    for p in probes:
        log(f"allocation:{p.name} loss_coef:{p.loss_coef:.3e} multiplier:{alloc.multipliers[p.name]:g} "
            f"probe_losses:{','.join(f'{d:+.2e}' for d in p.probe_loss)}", file_only=True)
    return tensors, blob, record


def quantize_run(run_dir: str | os.PathLike, code_bytes: int, quant_cfg: QuantConfig | None = None,
                 calib_cfg: CalibConfig | None = None, log=print, train_cfg: TrainConfig | None = None,
                 device: torch.device | str | None = None, progress: bool = True,
                 allow_other_tokenizer: bool = False) -> tuple[GPT, BPBAccumulator]:
    """The pipeline's quantize stage on every rank: rank 0 writes RUN_DIR/model.pgz, then every rank reloads it from
    disk into a fresh GPT and scores it flat (`quantized_roundtrip_exact`). Returns (reloaded model, its score).

    train_cfg supplies data_dir, tokenizer_path, seq_len and val_batch_seqs (default: the checkpoint's).
    train_cfg's tokenizer must be the one the checkpoint records, unless allow_other_tokenizer (quantize_checkpoint).
    """
    run_dir = Path(run_dir)
    quant_cfg, calib_cfg = quant_cfg or QuantConfig(), calib_cfg or CalibConfig()
    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train_cfg = train_cfg or load_checkpoint(run_dir).train_config
    if rank == 0:
        quantize_checkpoint(run_dir, code_bytes, quant_cfg, calib_cfg, log, device, train_cfg.data_dir, progress,
                            tokenizer_identity(train_cfg.tokenizer_path), allow_other_tokenizer)
    if distributed:
        dist.barrier()
    path = run_dir / MODEL_FILENAME
    model = load_quantized(path, device)
    val_tokens = load_tokens(f"{train_cfg.data_dir}/fineweb_val_*.bin", model.cfg.vocab_size)
    luts = byte_luts(train_cfg.tokenizer_path, model.cfg.vocab_size)
    t0 = time.perf_counter()
    acc = evaluate_flat(model, val_tokens, luts, train_cfg.seq_len, train_cfg.val_batch_seqs, rank, world_size)
    model_bytes = path.stat().st_size
    log("roundtrip_eval", artifact=str(path), tokens=acc.tokens, bytes=acc.bytes,
        seconds=round(time.perf_counter() - t0, 2))
    log(f"quantized_roundtrip_exact val_loss:{acc.val_loss:.8f} val_bpb:{acc.val_bpb:.8f}")
    log(f"Code size: {code_bytes} bytes")
    log(f"Total submission size: {code_bytes + model_bytes} bytes")
    return model, acc
