"""Per-document LoRA test-time training: one low-rank adapter per document of a batch, and the scorer using them.

Each row of a batch is one document with its own adapter on every chosen linear layer: the layer's output gains
(x @ A_b^T) @ B_b^T for row b (optionally the output head too: the logits before the soft-cap gain the same). B
starts at zero, so until an adapter's first step the model scores exactly as without it; A starts random (std
1/sqrt(in)), so B's first gradient is not zero. The adapters ride on forward hooks (the head's on GPT.head's
delta): the model's forward is unchanged, and a hooked layer inside the one q/k/v product is called on its own
(submission/model.py's grouped_linear). Rows never mix: each row's output reads only its own A_b, B_b, and its loss
reaches only them. reset() starts every row afresh, which the scorer does at each new batch of documents, so nothing
learned on one document reaches another. The blocks below the adapted ones never change within a batch: the scorer
runs them once per batch and replays their outputs at every step whose windows open at their documents' BOS (_Replay).
"""
from __future__ import annotations

import dataclasses
import os
import time
import typing
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from eval.ngram import NgramBlender, NgramConfig, blend, mixing_features, model_entropy
from eval.tilt import TiltBlender
from submission.config import check_ranges
from submission.model import CastedLinear, plain_linears

# The layers the records adapted (PRs #1530, #1610): attention's q, k, v and output projections and the MLP's two.
DEFAULT_TARGETS = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# Tokens per SGD step of a global phase: 64 pieces of 2,048 (one per batch row) ran out of the H100's 80 GB at 8192.
PHASE_BATCH_TOKENS = 32_768


# LoraConfig.attention: the SDPA backends the pass may use, in order of preference (math: the CPU's fallback);
# None keeps the process's own (runtime.configure_cuda: cuDNN alone on the GPU)
ATTENTION = {"cudnn": None, "flash": (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)}
# The flash pass's backward runs in torch's deterministic mode (_exact), where torch refuses cuBLAS unless this
# names a fixed workspace. torch reads it once, at the process's first matmul: so here, on import, before any. It is
# the workspace torch gives cuBLAS on Hopper anyway (8 x 4 MiB).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@dataclass
class LoraConfig:
    """Per-document LoRA TTT (`pgolf eval RUN_DIR --lora-ttt`, settings as LORA_<FIELD>). The records' shape (PRs
    #1530, #1610, #1626: rank 64-96 on q/k/v/o, the MLP and the head, AdamW, 32-token chunks, 64 documents per
    batch), its learning rates and phases chosen on the tuning split, and the depth, groups and late chunks that
    keep the full val's 8-GPU projection under 550 s on the slowest host measured (P1, H100: 474.8 s; the eager
    pass is bound by its op dispatch, so the figure moves with the host: 1.36x between two H100 machines). On P1 seed
    1337 it scores 0.0039 below the stream's evaluation with these settings (0.0042 with LORA_LAST_N=6, 0.0033 with
    earlier ones, three artifacts; docs/MEASUREMENTS.md); it runs in the kit, not the packed file."""
    rank: int = 64
    """Adapter rank per layer and document. 0: no adapter, which is document-masked scoring alone (each chunk read
    from its own document's prefix only), to measure what the masking does apart from the adapters."""
    lr: float = 3e-4
    """AdamW learning rate of the adapters (fresh per batch of documents). Chosen on the tuning split (P1 seed 42,
    300,000 tokens): 1e-4 (the records') 1.34427, 3e-4 1.34385, 1e-3 1.34793."""
    weight_decay: float = 0.0
    """AdamW weight decay of the adapters."""
    chunk: int = 32
    """Targets a document is scored in before each adapter step."""
    late_chunk: int = 128
    """Targets per chunk once a document has `context` targets scored (0: `chunk` throughout). From there the
    window slides, so every chunk costs a full window: on the P1 dev val the 58 documents longer than 2,048 tokens
    hold 70% of the pass's token-forwards at chunk 32; 128 here cuts the whole pass's to 0.59x (chunk 64 throughout:
    0.52x). On the H100 the projection went from 647 s to 509 s."""
    head: bool = True
    """An adapter on the output head too (its logits before the soft-cap), as the records had."""
    last_n: int = 5
    """Adapters on the last N blocks only (0: every block, which projected 952 s). The step's backward then stops
    below block N from the top, which is most of a step's time (some records adapted only the last blocks). On the
    tuning split (P1 seed 1337, all 737,116 tokens): 4 1.347759, 5 1.347604, 6 1.347385. The deepest setting whose
    dev-val pass projects under 550 s on the slowest host measured: one H100 projected 423.7, 349.5 and 497.7 s for
    4, 5 and 6; another, 1.36x slower (the pass is host-bound), 474.8 s for 5 and 682.3 s for 6, past the 600 s
    limit. 6 scores 0.0003 lower where the host allows it."""
    phases: int = 3
    """Global phases: once phase_docs, 2 x phase_docs, ... documents are scored, one epoch of SGD on the base weights
    over exactly those documents (the records: 3 phases, -0.0008 vs 1). Chosen on the tuning split (P1 seed 42, all
    737,116 tokens, phase_lr 1e-3): 0 phases 1.349787, 1 1.348831, 2 1.348625, 3 1.348519."""
    phase_docs: int = 512
    """Documents scored between global phases (the records': 2,000). 512 puts all three phases inside the 2,000
    documents of the tuning split they were chosen on (and P1's dev val, 2,095 documents)."""
    phase_lr: float = 0.012
    """SGD learning rate of a global phase. Chosen on the tuning split: with 3 phases (seed 42) 1e-3 1.348519, 3e-3
    1.348221; then (seed 1337, its own split scores) 3e-3 1.347969, 6e-3 1.347811, 0.012 1.347803, 0.024 1.348319."""
    phase_momentum: float = 0.8
    """SGD momentum of a global phase. Chosen on the tuning split (seed 1337, phase_lr 0.012): 0.9 1.347803, 0.8
    1.347759."""
    batch_docs: int = 64
    """Documents run side by side, each with its own adapter."""
    group_docs: int = 512
    """Documents are taken in stream order in groups of this many and sorted by length inside a group into batches
    (a batch runs as many steps as its longest document has chunks); the global phases learn only at a group's end,
    and the n-gram blends only targets whose group has ended. Rows never mix, so a document's score does not depend
    on its group. On the P1 dev val (2,095 documents) 64 runs 8,171 sequential steps, 1,024 runs 1,921. 512: a
    phase every phase_docs documents (a group that reaches the count ends first)."""
    context: int = 2048
    """At most this many tokens of the document before a chunk are read (the training length)."""
    ngram: bool = True
    """Blend the recipe's n-gram (EvalConfig's NGRAM_ settings) into the adapted distribution. The score is then the
    blend; the adapted model alone is reported too."""
    ngram_chunk: int = 32_768
    """The n-gram runs after the adapted model, over the targets in stream order, this many at a time (the stream's
    chunk_tokens): each chunk blended from the counts of the chunks before it, then counted. It reads only each
    target's log-probability and the model's entropy there, so it is the stream's n-gram whatever order the
    documents were scored in. Counting once per group instead (1,024 documents) gained -0.0010 on P1 where the
    stream's gained -0.0071."""
    compliance_tokens: int = 2048
    """C1 re-runs the pass 4x on this many leading targets (with one cut in each half)."""
    warmup_docs: int = 2
    """Synthetic documents (seeded random tokens, never val) scored before the timed pass (warm_up), so that what a
    process pays once (the first calls of each kernel) is paid there, and the projection counts it once instead of
    scaling it with the timed pass to the full val. 0: none. In a tuning search the first trial of a process took
    56.5 s and the later ones ~45 s (flash; 91-95 s against 41-44 s on cuDNN)."""
    attention: str = "flash"
    """The attention kernel of the pass (SDPA's backend): flash, or cudnn as training and the stream run it. cuDNN
    builds an execution plan for each new (batch, length) shape it meets, once per process, and the pass meets new
    shapes at most steps (each batch's widths and window lengths); flash builds none. P1 dev val, one H100, one
    process: the pass took 61.7 s on flash and 87.9 s on cuDNN, same scores; on 256 documents 8.8 s then 8.0 s in a
    second pass on flash, 16.7 s then 8.2 s on cuDNN. Flash's backward runs deterministic (_exact): C1 compares two
    runs of the pass, and its default backward adds up gradients in whatever order its blocks finish."""
    replay: bool = True
    """Replay the frozen lower blocks: the blocks run before the first adapted one never change within a batch, and
    while a document's window opens at its BOS each position's output there is the same at every step (causal). So
    they run once per batch over the documents' windows (again, twice as wide, when a step outgrows them) and each
    step reads its columns instead of recomputing them; a step whose window has begun to slide runs them as before.
    It saves the frozen blocks' share of every such step's forward (the default model: 10 of its 15 slots at
    last_n=5; 5 at last_n=6, whose first adapted block is in the depth loop; 11 at last_n=4); the scores agree up
    to rounding (tests/test_lora.py)."""

    PREFIX: typing.ClassVar[str] = "lora_"  # settings are LORA_<FIELD> (submission.config.settings_index)
    RANGES: typing.ClassVar[dict] = {"rank": ">= 0", "lr": ">= 0", "weight_decay": ">= 0", "chunk": ">= 1",
                                     "batch_docs": ">= 1", "group_docs": ">= 1", "context": ">= 1", "last_n": ">= 0",
                                     "late_chunk": ">= 0", "compliance_tokens": ">= 2", "ngram_chunk": ">= 1",
                                     "warmup_docs": ">= 0",
                                     "phases": ">= 0", "phase_docs": ">= 1",
                                     "phase_lr": ">= 0", "phase_momentum": "[0, 1)"}

    def __post_init__(self):
        check_ranges(self, "lora_")
        if self.attention not in ATTENTION:
            raise ValueError(f"LORA_ATTENTION={self.attention!r}: choose {' or '.join(ATTENTION)}")

    def pass_settings(self) -> dict:
        """score_documents' keyword arguments from these settings (all but ngram, compliance_tokens, warmup_docs)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("ngram", "compliance_tokens", "warmup_docs")}


def adapted_layers(model: nn.Module, targets: tuple[str, ...] = DEFAULT_TARGETS,
                   last_n: int = 0) -> dict[str, CastedLinear]:
    """The model's linear layers whose names end with one of `targets` (e.g. "blocks.3.attn.c_q"), by name; with
    last_n, only those of the last last_n blocks."""
    first = len(model.blocks) - last_n if last_n else 0
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, CastedLinear) and any(name == t or name.endswith("." + t) for t in targets)
              and (not name.startswith("blocks.") or int(name.split(".")[1]) >= first)}
    if not layers:
        raise ValueError(f"LoRA targets {targets} match no linear layer of the model (names like "
                         f"{[n for n, m in model.named_modules() if isinstance(m, CastedLinear)][:3]})")
    return layers


class BatchedLoRA(nn.Module):
    """Rank-`rank` adapters for `batch` documents on each adapted layer: A [batch, rank, in], B [batch, out, rank].

    `rows` (a LongTensor, default all) says which adapters the current forward's batch rows use, in order: when
    some documents of a batch have ended, the scorer runs only the others and their adapters stay in place."""

    def __init__(self, model: nn.Module, rank: int, batch: int, targets: tuple[str, ...] = DEFAULT_TARGETS,
                 seed: int = 0, head: bool = False, last_n: int = 0):
        super().__init__()
        if rank < 1 or batch < 1:
            raise ValueError(f"LoRA rank {rank} and batch {batch}: both must be >= 1")
        self.rank, self.batch, self.seed = rank, batch, seed
        self.layers = adapted_layers(model, targets, last_n)
        device = next(model.parameters()).device
        self.keys = [name.replace(".", "_") for name in self.layers]
        self.A = nn.ParameterDict({k: nn.Parameter(torch.empty(batch, rank, m.in_features, device=device))
                                   for k, m in zip(self.keys, self.layers.values())})
        self.B = nn.ParameterDict({k: nn.Parameter(torch.empty(batch, m.out_features, rank, device=device))
                                   for k, m in zip(self.keys, self.layers.values())})
        if head:  # the output head's adapter: [model_dim -> vocab], applied by the scorer through model.head's delta
            dim, vocab = model.cfg.model_dim, model.cfg.vocab_size
            self.keys.append("head")
            self.A["head"] = nn.Parameter(torch.empty(batch, rank, dim, device=device))
            self.B["head"] = nn.Parameter(torch.empty(batch, vocab, rank, device=device))
        self.rows: Tensor | None = None
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Fresh adapters for every row: A random (seeded, the same every time and the same in every row, so what a
        document starts from does not depend on the row it lands in), B zero (the model as it is)."""
        generator = torch.Generator().manual_seed(self.seed)
        for key in self.keys:
            a = self.A[key]
            a.copy_((torch.randn(a.shape[1:], generator=generator) / a.size(-1) ** 0.5).expand_as(a))
            self.B[key].zero_()

    def delta(self, key: str, x: Tensor) -> Tensor:
        """The adapters' addition to a layer's output for input x [rows, T, in]."""
        A, B = self.A[key], self.B[key]
        if self.rows is not None:
            A, B = A[self.rows], B[self.rows]
        if x.size(0) != A.size(0):
            raise ValueError(f"LoRA: a batch of {x.size(0)} rows for {A.size(0)} adapters (set .rows to the "
                             "documents in the batch)")
        return torch.bmm(torch.bmm(x, A.transpose(1, 2).to(x.dtype)), B.transpose(1, 2).to(x.dtype))

    def head_delta(self, h: Tensor) -> Tensor | None:
        """The head adapter's addition to the logits of the batch's rows (hidden states h [rows, T, D]); None
        without one."""
        return self.delta("head", h) if "head" in self.A else None

    @contextmanager
    def attached(self):
        """Inside, every adapted layer's output includes its rows' adapters (forward hooks, removed on exit)."""
        def hook(key):
            return lambda module, inputs, output: output + self.delta(key, inputs[0])
        handles = [m.register_forward_hook(hook(k)) for k, m in zip(self.keys, self.layers.values())]  # not "head"
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


def frozen_slots(model: nn.Module, lora: BatchedLoRA | None) -> list[int]:
    """The model.schedule() slots before the first whose block holds an adapter (every slot without adapters):
    within a batch their outputs depend on the tokens alone. No slot where an adapter lies outside the blocks (its
    layer may feed every block)."""
    order = model.schedule()
    if lora is None:
        return list(range(len(order)))
    if any(not name.startswith("blocks.") for name in lora.layers):
        return []
    adapted = {int(name.split(".")[1]) for name in lora.layers}
    return list(range(next((s for s, i in enumerate(order) if i in adapted), len(order))))


class _Filled(Exception):
    """Ends a replay fill's forward after the last frozen slot (the blocks above it would be wasted)."""


class _ReplayBlock(nn.Module):
    """Stands in model.blocks for a frozen slot's block while a batch runs: its forward (Block.forward's
    signature) asks the _Replay for the slot's output, which replays it or runs the block. It holds the block's own
    parameter, buffer and submodule dicts, not the block as a child, so state_dict(), parameters() and
    named_modules() read exactly as with the block in place."""

    def __init__(self, block: nn.Module, replay: "_Replay"):
        super().__init__()
        for name in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            object.__setattr__(self, name, getattr(block, name))
        object.__setattr__(self, "block", block)  # not registered: its parameters are the dicts above
        self.replay, self.training = replay, block.training

    def forward(self, x, x0, rope, value_embed, key_shift=None, cache=None, slot=0):
        return self.replay.output(self.block, slot, x, x0, rope, value_embed, key_shift, cache)


class _Replay:
    """The frozen slots' outputs (frozen_slots) of one batch's documents, read by the steps whose every window
    opens at its document's BOS instead of running those blocks (LoraConfig.replay).

    A fill is one no-grad forward over the batch's active rows, row b holding its document's tokens from its BOS
    (right-padded with zeros where the document ends), that stops after the last frozen slot. Causal: a step's
    positions see the same tokens before them in the fill as in its own window, and what lies after them (later
    tokens, padding) reaches no scored position. The fill is as wide as the first step that replays, and refills
    twice as wide (at most `context`) when a step outgrows it: its shape then follows the steps' widths only, never
    where a document ends, which only later tokens tell (C1 compares bits, and a GPU's kernels round differently
    when a shape changes)."""

    def __init__(self, model: nn.Module, slots: list[int], context: int):
        self.model, self.slots, self.context = model, slots, context
        self.batch: list[tuple[int, int, int]] = []
        self.outputs: dict[int, Tensor] = {}  # slot -> its output [filled rows, width, D]
        self.filled: list[int] = []  # the batch rows the fill holds, in its order
        self.width, self.index, self.filling = 0, None, False  # index: this step's rows in the fill, or None

    @contextmanager
    def installed(self, batch: list[tuple[int, int, int]]):
        """Inside, every frozen slot's block is a _ReplayBlock; the real blocks are back on exit and the fill is
        freed, error or not."""
        blocks, order = self.model.blocks, self.model.schedule()
        real = {order[s]: blocks[order[s]] for s in self.slots}
        self.batch = batch
        try:
            for i, block in real.items():
                blocks[i] = _ReplayBlock(block, self)
            yield self
        finally:
            for i, block in real.items():
                blocks[i] = block
            self.outputs, self.filled, self.width, self.index, self.batch = {}, [], 0, None, []

    def output(self, block: nn.Module, slot: int, x: Tensor, *args) -> Tensor:
        """Block `block`'s output at `slot`: replayed (this step's rows, as wide as x), or run (and kept in a fill)."""
        if self.filling:
            out = self.outputs[slot] = block(x, *args, slot)
            if slot == self.slots[-1]:
                raise _Filled
            return out
        if self.index is not None and slot in self.outputs:  # a block that loops back above runs there for real
            return self.outputs[slot][self.index, :x.size(1)]
        return block(x, *args, slot)

    def step(self, tokens: Tensor, rows: list[int], spans, width: int) -> None:
        """Whether this step replays (decided on the host: every row's window opens at its document's BOS), and
        then the fill that covers it (refilled when the step is wider)."""
        self.index = None
        if any(w0 != self.batch[row][0] for row, (w0, *_) in zip(rows, spans)):
            return
        if width > self.width or not set(rows) <= set(self.filled):
            self.fill(tokens, rows, min(self.context, max(width, 2 * self.width)))
        self.index = torch.tensor([self.filled.index(row) for row in rows], device=tokens.device)

    def fill(self, tokens: Tensor, rows: list[int], width: int) -> None:
        """The frozen slots' outputs over the documents of `rows`, `width` tokens from each one's BOS."""
        self.outputs = {}  # the last fill's memory first
        x = torch.zeros(len(rows), width, dtype=torch.long, device=tokens.device)
        for i, row in enumerate(rows):
            start, _, hi = self.batch[row]
            x[i, :min(hi - 1, start + width) - start] = tokens[start:min(hi - 1, start + width)]
        self.filling = True
        try:
            with torch.no_grad(), torch.autocast(tokens.device.type, torch.bfloat16,
                                                 enabled=tokens.device.type == "cuda"):
                self.model.hidden(x)
        except _Filled:
            pass
        finally:
            self.filling = False
        self.filled, self.width = list(rows), width


def shard_targets(num_targets: int, rank: int, world_size: int, align: int) -> tuple[int, int]:
    """Target positions [first, end) of a rank's contiguous share of 1..num_targets; inner boundaries fall on
    1 + multiples of `align` (the stride) so shard cuts coincide with window boundaries."""
    def bound(r: int) -> int:
        return num_targets + 1 if r == world_size else 1 + num_targets * r // world_size // align * align
    return bound(rank), bound(rank + 1)


def document_targets(tokens: Tensor, first: int, end: int, bos_id: int) -> list[tuple[int, int, int]]:
    """The targets [first, end) cut into documents: (start, lo, hi) per document in position order, where `start`
    is the position of its BOS (or 0 when the stream does not open with one) and [lo, hi) its targets, the tokens
    after its BOS up to and including the next document's BOS (predicting where the document ends). A document
    that began before `first` keeps its start: its earlier tokens are context, scored by the rank before."""
    starts = (tokens[:end] == bos_id).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    out = []
    for i, start in enumerate(starts):
        lo, hi = max(start + 1, first), min(starts[i + 1] + 1 if i + 1 < len(starts) else end, end)
        if lo < hi:
            out.append((start, lo, hi))
    return out


def chunk_at(step: int, chunk: int, late_chunk: int, context: int) -> tuple[int, int]:
    """(offset from a document's first target, size) of its chunk number `step`: `chunk` targets at a time, then,
    with late_chunk, late_chunk at a time once `context` targets are scored (from the first chunk boundary there)."""
    early = -(-context // chunk) if late_chunk else step + 1
    return (step * chunk, chunk) if step < early else (early * chunk + (step - early) * late_chunk, late_chunk)


def chunk_count(targets: int, chunk: int, late_chunk: int, context: int) -> int:
    """How many chunks (chunk_at) cover a document's `targets` targets."""
    early = -(-context // chunk) if late_chunk else None
    if early is None or targets <= early * chunk:
        return -(-targets // chunk)
    return early + -(-(targets - early * chunk) // late_chunk)


def _chunk_spans(batch: list[tuple[int, int, int]], at: tuple[int, int], context: int, end: int):
    """For one step of a batch, every row's chunk at `at` = (offset from its first target, size) (chunk_at): the
    rows (documents) that still have targets, and per row (window start, chunk lo, chunk hi, whether more chunks
    follow, the document's first target). The window is that of a full chunk even where the document ends sooner
    (at most `context` tokens before the chunk's last column; only the stream's `end`, its known length, cuts a
    chunk short), so where a document ends, which only later tokens tell, moves no window: C1 caught a window that
    started earlier when the document's last chunk was short."""
    offset, chunk = at
    rows, spans = [], []
    for row, (start, lo, hi) in enumerate(batch):
        c_lo = lo + offset
        if c_lo < hi:
            rows.append(row)
            last = min(c_lo + chunk, end) - 1
            spans.append((max(start, last - context), c_lo, min(c_lo + chunk, hi), c_lo + chunk < hi, lo))
    return rows, spans


def score_documents(model, tokens: Tensor, first: int, end: int, *, rank: int, lr: float, chunk: int,
                    batch_docs: int, context: int, weight_decay: float = 0.0, head: bool = True, last_n: int = 0,
                    late_chunk: int = 0,
                    group_docs: int | None = None, phases: int = 0,
                    phase_docs: int = 2000, phase_lr: float = 1e-3, phase_momentum: float = 0.9,
                    ngram: NgramConfig | None = None, ngram_chunk: int = 32_768, score_tokens: Tensor | None = None,
                    step_before_score: bool = False, replay: bool = True, attention: str = "flash",
                    progress: bool = False, timer=None):
    """Per-document LoRA TTT over the targets [first, end) of `tokens` (1-D, on the model's device).

    Documents (document_targets) go in groups of `group_docs` consecutive ones (default batch_docs), each group
    sorted by length (longest first) into batches of `batch_docs`, each row with a fresh adapter and a fresh AdamW
    (lr, weight_decay), on the block projections (the last last_n blocks' with last_n) and (head=True) the output
    head. Each document's targets are taken `chunk` at a time (then late_chunk at a time after `context` of them:
    chunk_at): the chunk is scored from the document's own prefix (at most `context` tokens back, never before its
    BOS: no other document is read), its NLL recorded, and only then the adapter
    takes one step on that chunk's loss (skipped after a document's last chunk: nothing would use it). rank 0: no
    adapter, i.e. document-masked sliding scoring alone (a window of up to `context` tokens per `chunk` targets).
    The base weights change only in `phases` global phases: once phase_docs, 2 x phase_docs, ... documents are
    scored (at the end of the group that reaches the count), one epoch of SGD (phase_lr, phase_momentum) over
    exactly the documents scored so far; the model is restored afterwards.
    ngram: also the "blend" view, the n-gram of eval/ngram.py blended into the adapted distribution, as the
    stream blends it: over the targets in stream order, ngram_chunk at a time, each chunk blended from the counts
    and mixing weights of the chunks before it and then counted. It runs behind the adapted model, on the targets
    whose group has ended (within a group the documents interleave, so the targets before a chunk's end are not
    all scored until then), from what the pass kept of each target: the model's log-probability of it and the
    entropy there.
    Returns eval.stream.StreamResult ("model" view, and "blend"); its events allow
    eval.compliance.check_events_any_order (documents interleave).
    score_tokens: the tokens targets are read from (default `tokens`), for the causality check.
    step_before_score: the deliberately illegal variant (steps on a chunk, then scores it) that the checks catch.
    replay: the blocks below the adapted ones run once per batch (refilled as the windows widen, _Replay) and the
    steps whose windows all open at their documents' BOS read their outputs instead (LoraConfig.replay).
    attention: the SDPA backend of the whole pass, phases included (LoraConfig.attention); on flash, every
    backward runs deterministic (_exact).
    timer: an eval.stream.StageTimer that times the n-gram blend ("ngram") and the global phases ("phase")."""
    from eval.progress import progress_bar
    from eval.stream import StreamResult

    if max(chunk, late_chunk) > context:  # a chunk's window (context tokens) must reach before its first target
        raise ValueError(f"LORA_CHUNK={chunk} and LORA_LATE_CHUNK={late_chunk} must be at most LORA_CONTEXT="
                         f"{context}: a chunk is scored from one window of at most LORA_CONTEXT tokens")
    device = tokens.device
    docs = document_targets(tokens, first, end, model.cfg.bos_id)
    views = ("model", "blend") if ngram is not None else ("model",)
    out = _Record(tokens, tokens if score_tokens is None else score_tokens, first, end,
                  {view: torch.zeros(end - first, device=device) for view in views},
                  torch.zeros(end - first, dtype=torch.int32, device=device), {}, [],
                  local_blender(model.cfg.vocab_size, ngram, device) if ngram is not None else None, ngram_chunk)
    base = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in base:
        p.requires_grad_(False)
    # Nothing here may depend on how many documents follow (C1 caught a phase schedule that did): always
    # batch_docs adapters, and phases after fixed document counts.
    lora = BatchedLoRA(model, rank, batch_docs, head=head, last_n=last_n) if rank else None
    slots = frozen_slots(model, lora) if replay else []
    replayer = _Replay(model, slots, context) if slots else None
    phase_at = [k * phase_docs for k in range(1, phases + 1)]
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()} if phases else None
    bar = progress_bar(total=end - first, desc="lora ttt" if rank else "documents", unit="tok", unit_scale=True,
                       disable=not progress, leave=False)
    group_docs = group_docs or batch_docs
    with ExitStack() as restore:
        restore.callback(_restore, model, base, initial, bar)
        restore.enter_context(plain_linears(model))  # QAT is off at eval: its blend is ~12 host dispatches a call
        if ATTENTION[attention]:
            restore.enter_context(sdpa_kernel(list(ATTENTION[attention]), set_priority=True))
        exact = attention == "flash"
        for g0, batch, group_end in group_batches(docs, group_docs, batch_docs):
            with lora.attached() if lora is not None else nullcontext(), \
                    replayer.installed(batch) if replayer is not None else nullcontext():
                optimizer = None
                if lora is not None:
                    lora.reset()
                    optimizer = torch.optim.AdamW(lora.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
                for step in range(max(chunk_count(hi - lo, chunk, late_chunk, context) for _, lo, hi in batch)):
                    at = chunk_at(step, chunk, late_chunk, context)
                    spans = _chunk_spans(batch, at, context, end)
                    bar.update(_chunk_step(model, lora, optimizer, spans, at[1], out, step_before_score, replayer,
                                           exact))
            if not group_end:
                continue
            done = min(g0 + group_docs, len(docs))
            lo, hi = docs[g0][1], docs[done - 1][2]  # the group's targets: consecutive in the stream
            if out.blender is not None:  # every target before hi is scored: the n-gram may blend them
                with timer("ngram") if timer is not None else nullcontext():
                    out.blend_through(hi if done < len(docs) else end)
            if phase_at and done >= phase_at[0] and done < len(docs):  # on the base weights, the documents so far
                phase_at.pop(0)
                with timer("phase") if timer is not None else nullcontext():
                    global_phase(model, tokens, docs[:done], lr=phase_lr, momentum=phase_momentum, context=context,
                                 batch_seqs=max(1, PHASE_BATCH_TOKENS // context), exact=exact)
                out.events.extend(("update", "phase", lo, hi) for _, lo, hi in docs[:done])
    return StreamResult(first, end, out.nll, out.coverage, out.norm, out.events)


@contextmanager
def _exact(enabled: bool):
    """Within: torch's deterministic kernels (flash attention's backward then sums its gradients in a fixed order,
    not with atomics), without the filling of new memory that the mode adds. Only around a backward: the pass's
    n-gram counts with bincount, which has no deterministic CUDA kernel, and the mode would refuse it."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)  # warn_only=True would leave flash's backward as it was
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = before[2]


def _restore(model, base: list[tuple[Tensor, bool]], initial: dict | None, bar) -> None:
    """The model as score_documents found it (its parameters' requires_grad, its weights before any global phase);
    the progress bar closed."""
    bar.close()
    for p, flag in base:
        p.requires_grad_(flag)
    if initial is not None:
        model.load_state_dict(initial)


@dataclass
class _Record:
    """What a per-document pass reads (the context tokens, the tokens targets are scored against, its targets
    [first, end)) and records (NLL per view from target `first` on, coverage, normalization rows, events), and the
    n-gram that blends behind it: what it keeps of each scored target (the model's log-probability of the context
    stream's token and of the scored token, the entropy; one full row per step for C2) until blend_through."""
    tokens: Tensor
    score_tokens: Tensor
    first: int
    end: int
    nll: dict[str, Tensor]
    coverage: Tensor
    norm: dict[str, Tensor]
    events: list[tuple[str, str, int, int]]
    blender: NgramBlender | None
    ngram_chunk: int = 32_768
    blended: int = dataclasses.field(init=False)  # the first target not blended yet
    kept: Tensor | None = dataclasses.field(init=False)  # [end - first, 3]: log p(token), log p(score token), entropy
    rows: dict[int, Tensor] = dataclasses.field(default_factory=dict)  # position -> the model's full row

    def __post_init__(self):
        self.blended = self.first
        self.kept = None if self.blender is None else torch.zeros(self.end - self.first, 3, device=self.tokens.device)

    def keep(self, logp: Tensor, positions: Tensor, last: int) -> None:
        """Keep what the blend needs of scored rows logp [N, V] at positions; the row at `last` in full."""
        at = torch.stack([self.tokens[positions], self.score_tokens[positions]], 1)
        self.kept[positions - self.first] = torch.cat([logp.gather(1, at), model_entropy(logp)[:, None]], 1)
        self.rows[last] = logp[-1].clone()  # not a view: that would hold all of logp

    @torch.no_grad()
    def blend_through(self, upto: int) -> None:
        """Blend the n-gram into the targets [blended, upto), all scored, ngram_chunk at a time in stream order
        (a chunk that would end past upto waits, unless upto is the end): each chunk from the counts of the ones
        before, then counted."""
        from eval.stream import VIEW_ROWS, _check_rows
        device = self.tokens.device
        while self.blended < upto and (self.blended + self.ngram_chunk <= upto or upto == self.end):
            c_lo, c_hi = self.blended, min(self.blended + self.ngram_chunk, upto)
            for a in range(c_lo, c_hi, VIEW_ROWS):
                b = min(a + VIEW_ROWS, c_hi)
                positions = torch.arange(a, b, device=device)
                checked = [p for p in self.rows if a <= p < b]
                kept = self.kept[a - self.first:b - self.first]
                score, rows = target_blend(
                    self.blender, kept[:, 2], kept[:, 0], self.tokens, positions, self.tokens[a:b],
                    self.score_tokens[a:b], kept[:, 1],
                    torch.stack([self.rows.pop(p) for p in checked]) if checked else None,
                    torch.tensor(checked, dtype=torch.long, device=device) - a)
                self.nll["blend"][a - self.first:b - self.first] = -score
                if rows is not None:
                    _check_rows(self.norm, "blend", rows)
            self.blender.update(self.tokens, torch.arange(c_lo, c_hi, device=device))
            self.events.append(("update", "ngram", self.first, c_hi))
            self.blended = c_hi


def group_batches(docs: list[tuple[int, int, int]], group_docs: int, batch_docs: int):
    """(index of the group's first document, batch, whether the batch ends its group) in the order they run: groups
    of group_docs consecutive documents, each sorted by length (longest first) and cut into batches of batch_docs."""
    return [(g0, group[b0:b0 + batch_docs], b0 + batch_docs >= len(group))
            for g0 in range(0, len(docs), group_docs)
            for group in [sorted(docs[g0:g0 + group_docs], key=lambda d: d[1] - d[2])]
            for b0 in range(0, len(group), batch_docs)]


def _chunk_step(model, lora: BatchedLoRA | None, optimizer, step_spans, chunk: int, out: _Record,
                step_before_score: bool, replay: _Replay | None = None, exact: bool = False) -> int:
    """One step of a batch: every active document's next chunk scored from its own prefix (recorded in `out`),
    then one adapter step on those chunks (before scoring them in the illegal variant). Returns the targets scored.
    replay: the batch's frozen slots (_Replay), replayed here when every row's window opens at its BOS.
    exact: the step's backward in torch's deterministic mode (_exact)."""
    rows, spans = step_spans
    device, tokens = out.tokens.device, out.tokens
    # every row as wide as its full chunk's window (the same width for every row a step, but for a document that
    # began before `first`), so that a batch's shape does not depend on where its documents end; right padding
    # (zeros where a document ended) lies after every scored position: causal. Each row's chunk targets are
    # left-aligned in `chunk` columns (a shorter last chunk is padded by repeating its last target: computed, never
    # recorded, weight 0 in the step). Built on the host as one table, copied once: each op costs a dispatch.
    width = max(min(c_lo + chunk, out.end) - 1 - w0 for w0, c_lo, *_ in spans)
    plan = torch.tensor([[w0, c_hi - 1 - w0, *(min(c_lo + t, c_hi - 1) for t in range(chunk))]
                         for w0, c_lo, c_hi, *_ in spans]).to(device)
    cols = torch.arange(width, device=device)
    x = tokens[(plan[:, :1] + cols).clamp_max(tokens.numel() - 1)].masked_fill(cols >= plan[:, 1:2], 0)
    at, offset = plan[:, 2:], plan[:, :1] + 1
    if lora is not None:  # every adapter in place needs no gather (a batch's early steps)
        lora.rows = None if rows == list(range(lora.batch)) else torch.tensor(rows, device=device)
    if replay is not None:
        replay.step(tokens, rows, spans, width)
    # the scored targets in row order: where in the [rows x chunk] rows each lies, and its position
    flat = [(i * chunk + t, c_lo + t) for i, (_, c_lo, c_hi, *_) in enumerate(spans) for t in range(c_hi - c_lo)]
    scored = torch.tensor(flat).to(device)

    def chunk_logp():
        """Log-probabilities [rows, chunk, V] at each active document's chunk targets (the head and softmax run
        only there, for all rows at once)."""
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            h = model.hidden(x).gather(1, (at - offset)[..., None].expand(-1, -1, model.cfg.model_dim))
            delta = lora.head_delta(h) if lora is not None else None
            return torch.log_softmax(model.head(h, delta), -1)

    def step_on(logp):
        # one loss: the sum over the stepping rows of each one's mean NLL over its chunk
        if lora is None or not any(more or step_before_score for *_, more, _ in spans):
            return  # no adapter, or every row is at its document's last chunk (decided on the host: no sync)
        weight = torch.tensor([[(t < c_hi - c_lo and (more or step_before_score)) / (c_hi - c_lo)
                                for t in range(chunk)] for _, c_lo, c_hi, more, _ in spans], device=device)
        optimizer.zero_grad(set_to_none=True)
        nll_rows = -logp.gather(-1, out.score_tokens[at][..., None]).squeeze(-1)
        with _exact(exact):
            (nll_rows * weight).sum().backward()
        optimizer.step()
        # what a step reads of the stream: its document's targets up to the chunk's end (the document's BOS
        # before them is context, the same for every target of the document)
        out.events.extend(("update", "lora", lo, c_hi) for _, _, c_hi, more, lo in spans
                          if more or step_before_score)

    if step_before_score:  # illegal: the adapter learns the chunk it is about to score
        step_on(chunk_logp())
    with torch.no_grad() if lora is None else nullcontext():
        logp = chunk_logp()
    record_scores(logp.detach().flatten(0, 1)[scored[:, 0]], scored[:, 1], spans, out)
    if not step_before_score:
        step_on(logp)
    return sum(c_hi - c_lo for _, c_lo, c_hi, *_ in spans)


def local_blender(vocab_size: int, cfg: NgramConfig, device) -> NgramBlender:
    """An n-gram blender that stays this rank's own under torch.distributed: each rank of a per-document pass counts
    and refits on its own contiguous share (the scoring stream's blenders gather every rank's rows instead)."""
    blender = NgramBlender(vocab_size, cfg, device)
    blender.gather = lambda rows: rows
    return blender


@torch.no_grad()
def target_blend(blender: NgramBlender, entropy: Tensor, logp_targets: Tensor, tokens: Tensor, positions: Tensor,
                 targets: Tensor, score_targets: Tensor, logp_score: Tensor, rows: Tensor | None = None,
                 row_index: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """NgramBlender.views for a scorer that keeps no [N, V] rows: from the model's entropy [N] and its
    log-probability of each target (logp_targets) alone, the blend's log-probability of score_targets (logp_score:
    the model's of them; in a real run they are the targets, the causality check perturbs only the context). rows
    [k, V]: the model's full rows at positions[row_index], returned blended for the normalization check. Then
    blender.update() as after views(). Lives here, not in eval/ngram.py, which the packed program carries."""
    if isinstance(blender, TiltBlender):
        raise ValueError("target_blend: the tilt view needs the model's full rows (use NgramBlender.views)")
    prediction = blender.model.predict(tokens, positions)
    features = mixing_features(entropy, prediction.context_count, prediction.context_order, blender.cfg.order)
    alpha, q = blender.mixer.alpha(features), prediction.q
    blender.keep(positions, features, logp_targets.float(), q.gather(1, targets.to(q.device).long()[:, None]).log())
    logq = q.gather(1, score_targets.to(q.device).long()[:, None])[:, 0].log()
    score = torch.logaddexp(torch.log1p(-alpha) + logp_score.float(), torch.log(alpha) + logq)
    return score, None if rows is None else blend(rows.float(), q[row_index], alpha[row_index])


def record_scores(logp: Tensor, positions: Tensor, spans, out: _Record) -> None:
    """Score one step's chunks into `out` (logp [N, V]: the model's rows at the chunks' targets `positions`, chunk
    after chunk): each document's NLL ("model" view), coverage, the events, and one full row into the normalization
    check (C2); with the n-gram, what its blend needs (_Record.keep)."""
    from eval.stream import _check_rows

    logp = logp.float()
    out.nll["model"][positions - out.first] = -logp.gather(-1, out.score_tokens[positions, None]).squeeze(-1)
    _check_rows(out.norm, "model", logp[-1:])
    if out.blender is not None:  # the n-gram blends these targets later, in stream order (_Record.blend_through)
        out.keep(logp, positions, spans[-1][2] - 1)
    out.coverage[positions - out.first] += 1
    out.events.extend(("score", "", c_lo, c_hi) for _, c_lo, c_hi, *_ in spans)


def global_phase(model, tokens: Tensor, docs: list[tuple[int, int, int]], *, lr: float, momentum: float,
                 context: int, batch_seqs: int, exact: bool = False) -> None:
    """One epoch of SGD with momentum on the base weights (no adapters attached) over documents already scored:
    the next-token loss of each document's targets, in pieces of at most `context` targets read from inside the
    document only, `batch_seqs` pieces per step (right-padded; the padding is never a target). exact: each backward
    in torch's deterministic mode (_exact)."""
    device = tokens.device
    pieces = [(max(start, b - 1 - context), a, b) for start, lo, hi in docs
              for a, b in ((a, min(a + context, hi)) for a in range(lo, hi, context))]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)
    try:
        for i in range(0, len(pieces), batch_seqs):
            group = pieces[i:i + batch_seqs]
            width = max(b - 1 - w0 for w0, _, b in group)
            x = torch.zeros(len(group), width, dtype=torch.long, device=device)
            y = torch.full((len(group), width), -100, dtype=torch.long, device=device)
            for j, (w0, a, b) in enumerate(group):
                x[j, :b - 1 - w0] = tokens[w0:b - 1]
                y[j, a - 1 - w0:b - 1 - w0] = tokens[a:b]
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                z = model.logits(x)
            loss = torch.nn.functional.cross_entropy(z.flatten(0, 1).float(), y.flatten(), ignore_index=-100)
            optimizer.zero_grad(set_to_none=True)
            with _exact(exact):
                loss.backward()
            optimizer.step()
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
            p.grad = None


def evaluate_lora(model, val_tokens, luts, cfg: LoraConfig, rank: int = 0, world_size: int = 1,
                  progress: bool = True, log=None, ngram: NgramConfig | None = None, verify: bool = True) -> dict:
    """Score the validation tokens with per-document LoRA TTT and verify the pass: the eval-JSON body (val_loss,
    val_bpb, tokens, bytes, stages, compliance C1-C4, projection onto the full FineWeb val on 8 GPUs, config).
    The score is the n-gram blend when cfg.ngram (with `ngram`'s settings, default NgramConfig()), else the adapted
    model; "views" holds both. verify=False skips C1-C4 (for choosing settings on the tuning split, where no score
    is reported). cfg.warmup_docs synthetic documents are scored first (warm_up): the projection counts their
    seconds once and scales the timed pass.
    Ranks take contiguous shares of the targets; a document cut by a share boundary is context for the later rank
    (as the sliding stream's windows are)."""
    from eval.run import EVAL_GPUS, EVAL_LIMIT_S, FULL_VAL_TOKENS, view_scores
    from eval.stream import StageTimer

    log = log or (lambda *fields, **kv: None)
    device = next(model.parameters()).device
    tokens = torch.as_tensor(val_tokens, dtype=torch.long).to(device)
    num_targets = tokens.numel() - 1
    first, end = shard_targets(num_targets, rank, world_size, 1)
    settings = cfg.pass_settings()
    log("eval_lora_start", targets=num_targets, shard=f"[{first},{end})", world_size=world_size, ngram=cfg.ngram,
        **settings)
    settings["ngram"] = (ngram or NgramConfig()) if cfg.ngram else None
    warmup = warm_up(model, settings, cfg.warmup_docs)
    start, timer = time.perf_counter(), StageTimer(device)
    result = score_documents(model, tokens, first, end, progress=progress and rank == 0, timer=timer, **settings)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    scores = view_scores(result, tokens, luts.to_torch(device))
    names = {"model": "lora_ttt" if cfg.rank else "documents", "blend": "ngram"}
    for view, view_acc in scores.items():
        log(f"eval_{names[view]}_exact", val_loss=f"{view_acc.val_loss:.8f}", val_bpb=f"{view_acc.val_bpb:.8f}")
    acc = scores["blend" if cfg.ngram else "model"]
    log("eval_stage", stage="warmup", seconds=round(warmup, 3))
    log("eval_stage", stage="lora_ttt", seconds=round(seconds, 3))
    for name, part in timer.seconds.items():
        log("eval_stage", stage=name, seconds=round(part, 3), within="lora_ttt")

    start = time.perf_counter()
    compliance = verify_documents(model, tokens, result, settings, cfg.compliance_tokens, world_size, log) \
        if verify else None
    stages = {"warmup": round(warmup, 3), "lora_ttt": round(seconds, 3),
              **{name: round(part, 3) for name, part in timer.seconds.items()},
              **({"compliance": round(time.perf_counter() - start, 3)} if verify else {})}
    full = FULL_VAL_TOKENS.get(model.cfg.vocab_size, FULL_VAL_TOKENS[1024])
    scale = (full / EVAL_GPUS) / (acc.tokens / world_size)
    trained = sum(1 for kind, name, *_ in result.events if name == "phase")
    parts = {"warmup": warmup, **projected_stages(seconds, timer.seconds, trained, scale,
                                                  len(document_targets(tokens, first, end, model.cfg.bos_id)), cfg)}
    projected = sum(parts.values())
    projection = {"full_val_tokens": full, "gpus": EVAL_GPUS, "seconds": round(projected, 1),
                  "over_limit": projected > EVAL_LIMIT_S, "stages": {k: round(v, 1) for k, v in parts.items()}}
    log("eval_projection", full_val_tokens=full, gpus=EVAL_GPUS, seconds=projection["seconds"],
        over_limit=str(projection["over_limit"]).lower(), **projection["stages"])
    log("final_eval_exact", val_loss=f"{acc.val_loss:.8f}", val_bpb=f"{acc.val_bpb:.8f}")
    return {"val_loss": acc.val_loss, "val_bpb": acc.val_bpb, "tokens": acc.tokens, "bytes": acc.bytes,
            "stages": stages, **({"compliance": compliance} if verify else {}), "projection": projection,
            "views": {names[view]: {"val_loss": a.val_loss, "val_bpb": a.val_bpb} for view, a in scores.items()},
            "config": {"lora": dataclasses.asdict(cfg),
                       "ngram": dataclasses.asdict(settings["ngram"]) if settings["ngram"] else None}}


def warm_up(model, settings: dict, docs: int) -> float:
    """Score `docs` synthetic documents with the pass's settings (score_documents' keyword arguments) but no phases
    and no n-gram, and return the seconds. Each document is seeded random tokens, long enough to reach every kind of
    step (the replayed ones while its window opens at the BOS, the sliding ones past `context`, the late chunks).
    Nothing is kept: score_documents restores the model, and the adapters start afresh in every batch. No
    validation token is read."""
    if docs <= 0:
        return 0.0
    device = next(model.parameters()).device
    bos, vocab = model.cfg.bos_id, model.cfg.vocab_size
    length = settings["context"] + 2 * max(settings["late_chunk"], settings["chunk"]) + settings["chunk"]
    body = torch.randint(0, vocab, (docs, length), generator=torch.Generator().manual_seed(0))
    body[body == bos] = (bos + 1) % vocab  # a document is its BOS and the tokens up to the next one
    body[:, 0] = bos
    tokens = torch.cat([body.flatten(), torch.tensor([bos])]).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    score_documents(model, tokens, 1, tokens.numel(), **{**settings, "phases": 0, "ngram": None})
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def projected_stages(seconds: float, stage_seconds: dict[str, float], phase_docs_trained: int, scale: float,
                     docs: int, cfg: LoraConfig) -> dict[str, float]:
    """The pass's seconds per stage on a share of the full val `scale` times this one (with docs documents here):
    "adapt" (scoring and the adapter steps: the pass but its timed stages) and "ngram" scale with the tokens; a
    global phase does not: it trains on the documents scored so far (phase_docs x k, rounded up to a group's end),
    the same count on any val long enough to reach it. So "phase" is projected per document trained: those a share
    of the full val reaches, at the seconds per document measured here."""
    phase, ngram = stage_seconds.get("phase", 0.0), stage_seconds.get("ngram", 0.0)
    full_docs = docs * scale
    at = [-(-k * cfg.phase_docs // cfg.group_docs) * cfg.group_docs for k in range(1, cfg.phases + 1)]
    per_doc = phase / phase_docs_trained if phase_docs_trained else 0.0
    return {"adapt": (seconds - phase - ngram) * scale, "ngram": ngram * scale,
            "phase": per_doc * sum(d for d in at if d < full_docs)}


def verify_documents(model, tokens: Tensor, result, settings: dict, compliance_tokens: int, world_size: int,
                     log) -> dict:
    """C1-C4 of a per-document pass. C1 re-runs it on the first compliance_tokens targets with a cut in each half,
    twice over: (1) as it ran, every token after the cut replaced except the BOS tokens, so no score may depend on
    any later token's content; (2) one document per batch, every token replaced (later documents move, end and
    vanish), so no score may depend on where later documents lie either. Why two: on a GPU a batch's matmuls round
    differently when its shape changes, and moving a later document reshapes the batches an earlier one shares, so
    form (1) alone keeps shapes fixed and form (2) runs without batch-mates; rows never mix (tests/test_lora.py).
    Both count the n-gram every compliance_tokens / 4 targets, so that its updates are checked too.
    C3 in any order (documents interleave); C4 over every rank's coverage."""
    from eval.compliance import check_causality, check_coverage, check_events_any_order, check_normalization, \
        coverage_summary
    from eval.run import distributed
    from eval.verify import _deterministic

    device, first, end, num_targets = tokens.device, result.first, result.end, tokens.numel() - 1
    prefix_end = min(tokens.numel(), 1 + compliance_tokens)
    half = max((prefix_end - 1) // 2, 1)
    cuts = [1 + half // 2, min(1 + half + half // 2, prefix_end - 1)]

    # the n-gram counts a quarter of the prefix at a time, so that its updates fall inside it
    counting = {"ngram_chunk": max(1, compliance_tokens // 4)} if settings.get("ngram") is not None else {}

    def run(**over):
        return lambda context, score: score_documents(model, context, 1, prefix_end, score_tokens=score,
                                                      **{**settings, **counting, **over}).nll

    with _deterministic(device):  # the real batches with every BOS kept; then one document per batch, BOS moved
        content = check_causality(run(), tokens[:prefix_end], 1, prefix_end, cuts, model.cfg.vocab_size,
                                  keep=model.cfg.bos_id)
        alone = check_causality(run(batch_docs=1, group_docs=1), tokens[:prefix_end], 1, prefix_end, cuts,
                                model.cfg.vocab_size)
    c1 = {"passed": content["passed"] and alone["passed"],
          "detail": f"as run, documents kept in place: {content['detail']}; one document per batch, documents "
                    f"moved too: {alone['detail']}"}
    summary = torch.tensor(coverage_summary(first, end, result.coverage), device=device)
    c3 = check_events_any_order(result.events, first, end)
    summaries = [summary.tolist()]
    if distributed():
        gathered = [torch.empty_like(summary) for _ in range(world_size)]
        torch.distributed.all_gather(gathered, summary)
        summaries = [g.tolist() for g in gathered]
        flags = torch.tensor([float(c3["passed"])], device=device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        if c3["passed"] and not flags.item():
            c3 = {"passed": False, "detail": "another rank's stream updated before scoring (see its log)"}
    compliance = {"C1": c1, "C2": check_normalization(result.norm), "C3": c3,
                  "C4": check_coverage(summaries, num_targets)}
    log("eval_compliance", **{k: "pass" if v["passed"] else "FAIL" for k, v in compliance.items()})
    return compliance
