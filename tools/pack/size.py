"""The counted bytes of an artifact directory (code + model vs the cap) and each tensor's share, as `pgolf size`
(tools/commands/size.py) prints them; and the torch.save + lzma-9 baseline `pgolf quantize` logs."""
from __future__ import annotations

import io
import lzma
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from eval.progress import progress_bar
from tools.pack.artifact import CODE_FILENAME, DECIMAL_CAP, MODEL_FILENAME, compress, read_artifact, read_contents
from tools.paths import expect_path
from tools.quant.gptq import QuantTensor


@dataclass
class TensorShare:
    name: str
    params: int
    bits: int
    bytes: float   # estimated compressed bytes: the tensor compressed alone, normalized so shares sum to the model


@dataclass
class SizeReport:
    """Counted bytes of an artifact directory: code + model vs the decimal cap, with a per-tensor estimate."""
    code_bytes: int
    model_bytes: int
    compressor: str
    tensors: list[TensorShare]
    cap: int = DECIMAL_CAP

    @property
    def total_bytes(self) -> int:
        return self.code_bytes + self.model_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.cap

    def lines(self) -> list[str]:
        width = max([len(t.name) for t in self.tensors] + [6])
        out = [f"{'tensor':<{width}} {'params':>11} {'bits':>4} {'bytes':>11} {'share':>6} {'bits/param':>10}"]
        for t in sorted(self.tensors, key=lambda t: -t.bytes):
            share = t.bytes / self.model_bytes if self.model_bytes else 0.0
            out.append(f"{t.name:<{width}} {t.params:>11,} {t.bits:>4} {t.bytes:>11,.0f} {share:>6.1%} "
                       f"{8 * t.bytes / max(t.params, 1):>10.3f}")
        params = sum(t.params for t in self.tensors)
        out.append(f"{'total':<{width}} {params:>11,} {'':>4} {self.model_bytes:>11,} {'':>6} "
                   f"{8 * self.model_bytes / max(params, 1):>10.3f}")
        out.append(f"size: code_bytes:{self.code_bytes} model_bytes:{self.model_bytes} total_bytes:"
                   f"{self.total_bytes} cap:{self.cap} headroom:{self.cap - self.total_bytes} compressor:"
                   f"{self.compressor} fits:{str(self.fits).lower()}")
        return out


def size_report(artifact_path: str | os.PathLike, code_path: str | os.PathLike, progress: bool = True) -> SizeReport:
    """Code bytes (the file as shipped), model bytes, and each tensor's estimated share of the model bytes."""
    artifact_path, code_path = Path(artifact_path), Path(code_path)
    for path, what in ((artifact_path, "model artifact"), (code_path, "code file")):
        expect_path(path, "file", what, f"an artifact dir holds {MODEL_FILENAME} and {CODE_FILENAME}")
    blob = artifact_path.read_bytes()
    contents = read_contents(blob, str(artifact_path))
    # Each tensor compressed alone by the compressor most chunks chose, in parallel, then scaled to the real total.
    names = contents.chunk_compressors
    compressor = max(set(names), key=names.count)
    entries = contents.header["tensors"]
    datas = [b"".join(contents.payload[o:o + n] for o, n in entry["segments"]) for entry in entries.values()]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        sizes = list(progress_bar(pool.map(lambda data: len(compress(data, compressor)), datas),
                                  total=len(datas), desc="size shares", unit="tensor", disable=not progress))
    alone = dict(zip(entries, sizes))
    norm = len(blob) / max(sum(alone.values()), 1)
    shares = []
    for name, entry in contents.header["tensors"].items():
        value = contents.tensors[name]
        if isinstance(value, QuantTensor):
            params, bits = value.codes.numel(), value.bits
        else:
            params, bits = value.numel(), 8 * value.element_size()
        shares.append(TensorShare(name, params, bits, alone[name] * norm))
    return SizeReport(code_path.stat().st_size, len(blob), contents.compressor, shares)


def torch_save_lzma_bytes(tensors: dict[str, QuantTensor | torch.Tensor]) -> int:
    """lzma-9 of torch.save of the same tensors: the usual way records store them, our format's baseline."""
    flat = {}
    for name, value in tensors.items():
        if isinstance(value, QuantTensor):
            flat[name + ".q"], flat[name + ".scale"] = value.codes, value.scales
            if value.lowrank is not None:
                flat[name + ".lqer_a"], flat[name + ".lqer_b"] = value.lowrank
        else:
            flat[name] = value
    buf = io.BytesIO()
    torch.save(flat, buf)
    return len(lzma.compress(buf.getvalue(), preset=9))


def log_torch_save_baseline(path: str | os.PathLike, log) -> None:
    """Log how much smaller the artifact at `path` is than torch.save + lzma-9 of the same tensors (~40 s of one CPU
    core on a record-size model; `pgolf quantize` logs it, the packed program does not spend the time or bytes)."""
    model_bytes = Path(path).stat().st_size
    size = torch_save_lzma_bytes(read_artifact(path)[0])
    log("artifact_vs_torch_save", model_bytes=model_bytes, torch_save_lzma9_bytes=size,
        smaller_by=f"{1 - model_bytes / size:.2%}")
