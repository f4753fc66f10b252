"""Typed configs whose defaults are the recommended recipe, and the one validated override path (env + CLI)."""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass


# The filename the bundler (tools/pack/bundle/codec.py) compiles the unpacked program under (its VIRTUAL_FILENAME;
# test_pack checks they agree): code compiled under it was unpacked from the script being run, which is then all the
# code there is.
PACKED_CODE_FILENAME = "<train_gpt>"


def within(value, rule: str) -> bool:
    """Whether a number satisfies a range rule: ">= a", "> a", or an interval "[a, b]", "(a, b)", "[a, b)", "(a, b]".
    NaN, infinities and non-numbers satisfy none."""
    try:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if rule[0] == ">":
            bound = float(rule.lstrip(">="))
            return value >= bound if rule[1] == "=" else value > bound
        lo, hi = (float(x) for x in rule[1:-1].split(","))
        return (value >= lo if rule[0] == "[" else value > lo) and (value <= hi if rule[-1] == "]" else value < hi)
    except TypeError:
        return False


def check_ranges(cfg, prefix: str = "") -> None:
    """Raise a one-line ValueError for the first field of `cfg` outside its entry of type(cfg).RANGES (field -> rule
    for within(), or (rule, why)). The setting is named as the user types it: PREFIX + FIELD, upper case."""
    for name, rule in type(cfg).RANGES.items():
        rule, why = (rule, "") if isinstance(rule, str) else rule
        value = getattr(cfg, name)
        if not within(value, rule):
            key, kind = (prefix + name).upper(), type(cfg).__name__
            raise ValueError(f"{key}={value!r}: must be {'' if rule[0] == '>' else 'in '}{rule}{why} "
                             f"({kind}.{name}={value!r})")


def packed() -> bool:
    """Whether this is the packed single file. Not "can the kit be imported": PYTHONPATH may point at a kit checkout
    while the packed file runs."""
    return packed.__code__.co_filename == PACKED_CODE_FILENAME


@dataclass
class ModelConfig:
    """The 11-layer model of the SP8192 generation (PR #1460, 1.08269 BPB on FineWeb) with the kit's XSA, partial
    RoPE and ramped EMA; RECIPE=sp1024 gives the March stack (PR #1019, 1.1147)."""
    vocab_size: int = 8192
    """Tokenizer pieces = embedding rows (sp1024: 1024); must match the tokenizer's."""
    num_layers: int = 11
    """Transformer blocks (before depth recurrence repeats some of them)."""
    model_dim: int = 512
    """Residual stream width."""
    num_heads: int = 8
    """Query heads; head_dim = model_dim / num_heads = 64."""
    num_kv_heads: int = 4
    """GQA: 2 query heads share each KV head"""
    mlp_mult: float = 4.0
    """hidden = 2048, LeakyReLU(0.5)^2"""
    logit_softcap: float = 30.0
    """logits = c * tanh(z / c); 0 disables"""
    qk_norm: bool = True
    """RMSNorm on q and k before RoPE"""
    q_gain_init: float = 4.0
    """learned per-head gain on q (after the norm)"""
    xsa_last_n: int = 11
    """XSA (remove the self-value component) on the last N layers: all 11 (or more)"""
    rope_dims: int = 16
    """partial RoPE: rotate 16 of the 64 head dims, the rest stay position-free"""
    rope_base: float = 10000.0
    """RoPE base frequency."""
    ln_scale: bool = True
    """scale each block's norm output by 1/sqrt(layer + 1)"""
    bigram_buckets: int = 0
    """BigramHash table rows (sp1024: 3072); 0 disables"""
    bigram_dim: int = 112
    """BigramHash embedding width, projected to model_dim."""
    smear_gate: bool = True
    """mix the previous position's embedding in, never across a BOS"""
    value_embed_last_n: int = 0
    """value embeddings added to v on the last N layers (sp1024: 2); 0 disables"""
    value_embed_dim: int = 128
    """Value embedding width, projected to the KV width."""
    unet_skips: bool = True
    """encoder half -> decoder half skip connections with learned weights"""
    resid_mix: bool = True
    """each block mixes the residual with the initial embedding x0"""
    tie_embeddings: bool = True
    """The output head is the token embedding (no separate lm_head)."""
    bos_id: int = 1
    """The document-start token id: features that read t-1 and the n-gram stop there."""
    embed2: bool = False
    """a second token embedding mixed in before every block (sp1024: on)"""
    # Speedrun switches (submission/switches.py; packed only when one is on), off: docs/MEASUREMENTS.md, "Speedrun
    # techniques, measured"
    key_offset_last_n: int = 0
    """partial key offset on the last N layers: unrotated key dims from position t-1"""
    key_offset_dims: int = 0
    """how many of the unrotated head dims (the last ones) move; 0: all 48"""
    layer_bigram_buckets: int = 0
    """bigram hash table added before every block (speedrun: 5 x vocab = 5120); 0 off"""
    # The SP8192 generation (PR #1460 and later records; RECIPE=sp1024 turns them off)
    loop_layers: tuple[int, int] = (4, 5)
    """Depth recurrence: the first and last layer (inclusive) of the span that runs 1 + num_loops times in a row."""
    num_loops: int = 2
    """Extra passes over loop_layers once looping is on (TrainConfig.enable_looping_at); 0 disables. The repeated
    blocks share their weights: more compute per token, no more bytes."""
    parallel_last_n: int = 4
    """Parallel residuals on the last N layers: attention and MLP read the same normed input (0 disables)."""
    skip_gates: bool = True
    """Sigmoid-gated U-Net skips: x <- lerp(w * skip, x, sigmoid(g)) with g from 0, instead of x + w * skip."""
    orthogonal_init: bool = False
    """Matrices that do not start at zero start orthogonal (gain 1, PR #1460's init) instead of PyTorch's uniform
    +-1/sqrt(fan_in)."""

    # A stored config (artifact, checkpoint) made before a field existed lacks it: the value it was made with, for
    # the fields whose default is not that value.
    ABSENT_MEANS: typing.ClassVar[dict] = {"embed2": False, "num_loops": 0, "parallel_last_n": 0, "skip_gates": False}
    # Each number's allowed values (check_ranges); how fields must agree is checked in __post_init__.
    RANGES: typing.ClassVar[dict] = {
        "vocab_size": ("[2, 65536]", " (shards store token ids as uint16)"), "num_layers": ">= 1",
        "model_dim": ">= 1", "num_heads": ">= 1", "num_kv_heads": ">= 1", "mlp_mult": "> 0", "logit_softcap": ">= 0",
        "q_gain_init": "> 0", "xsa_last_n": ">= 0", "rope_dims": ">= 0", "rope_base": "> 1", "bigram_buckets": ">= 0",
        "bigram_dim": ">= 1", "value_embed_last_n": ">= 0", "value_embed_dim": ">= 1", "bos_id": ">= 0",
        "key_offset_last_n": ">= 0", "key_offset_dims": ">= 0", "layer_bigram_buckets": ">= 0", "num_loops": ">= 0",
        "parallel_last_n": ">= 0"}

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    def __post_init__(self):
        check_ranges(self)
        if self.model_dim % self.num_heads:
            raise ValueError(f"MODEL_DIM={self.model_dim} is not a multiple of NUM_HEADS={self.num_heads}: each head "
                             f"gets MODEL_DIM / NUM_HEADS dims (e.g. MODEL_DIM={self.num_heads * 64})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"NUM_HEADS={self.num_heads} is not a multiple of NUM_KV_HEADS={self.num_kv_heads}: each "
                             "KV head serves NUM_HEADS / NUM_KV_HEADS query heads (NUM_KV_HEADS=NUM_HEADS: plain MHA)")
        if self.head_dim % 2:
            raise ValueError(f"MODEL_DIM={self.model_dim} / NUM_HEADS={self.num_heads} = {self.head_dim} dims per "
                             "head: must be even (RoPE and the attention kernels work on pairs of dims)")
        if self.rope_dims % 2 or self.rope_dims > self.head_dim:
            raise ValueError(f"ROPE_DIMS={self.rope_dims}: must be even and in 0..{self.head_dim}, the head dim "
                             f"MODEL_DIM / NUM_HEADS (RoPE rotates pairs of dims; 0 = no RoPE)")
        for name in ("value_embed_last_n", "key_offset_last_n", "parallel_last_n"):
            if getattr(self, name) > self.num_layers:
                raise ValueError(f"{name.upper()}={getattr(self, name)}: must be in 0..NUM_LAYERS={self.num_layers} "
                                 "(the last N layers)")
        for name in ("bigram_buckets", "layer_bigram_buckets"):
            if getattr(self, name) == 1:
                raise ValueError(f"{name.upper()}=1: must be 0 (off) or >= 2 (bucket 0 is reserved, the hash uses "
                                 "the others)")
        if self.bos_id >= self.vocab_size:
            raise ValueError(f"BOS_ID={self.bos_id}: must be a token id, below VOCAB_SIZE={self.vocab_size}")
        if self.key_offset_last_n and self.rope_dims == self.head_dim:
            raise ValueError(f"KEY_OFFSET_LAST_N={self.key_offset_last_n}: the key offset moves the head dims RoPE "
                             f"does not rotate, and ROPE_DIMS={self.rope_dims} rotates all {self.head_dim} (lower "
                             "ROPE_DIMS, or KEY_OFFSET_LAST_N=0)")
        first, last = self.loop_layers
        if self.num_loops and not 0 <= first <= last < self.num_layers:
            raise ValueError(f"LOOP_LAYERS={first},{last} NUM_LOOPS={self.num_loops}: need num_loops >= 0 and a span "
                             f"0 <= first <= last < num_layers={self.num_layers} (e.g. LOOP_LAYERS=4,5 NUM_LOOPS=2)")


@dataclass
class TrainConfig:
    """Training loop, optimizer and schedule. Batch sizes are global token counts; accumulation is derived."""
    data_dir: str = "data/datasets/fineweb10B_sp8192"
    """Folder of fineweb_train_*.bin / fineweb_val_*.bin shards."""
    tokenizer_path: str = "data/tokenizers/fineweb_8192_bpe.model"
    """SentencePiece model: byte counts for val_bpb, recorded with the run."""
    run_dir: str = ""
    """default: runs/<timestamp>_seed<seed>"""
    recipe: str = "sp8192"
    """The named set of defaults the run started from (sp8192: these defaults, the SP8192 generation; sp1024: the
    March 2026 stack; see RECIPES); stored with the run, so quantizing its checkpoint uses the same recipe's
    settings."""
    seed: int = 1337
    """Seeds the init, the window order and calibration sampling."""
    train_batch_tokens: int = 786_432
    """global tokens per optimizer step (8 GPUs x 48 x 2048 in the record)"""
    micro_batch_tokens: int = 98_304
    """tokens per forward per GPU; grad_accum = global / (world * micro)"""
    seq_len: int = 2048
    """Tokens per training sequence."""
    shuffle_windows: bool = True
    """Training batches are windows of seq_len + 1 tokens in a seeded random order per epoch (PR #1460's loader)
    instead of the token stream in order (sp1024: in order). At 500 steps (P1, one H200) raw val_bpb 1.4573
    against 1.4794 in order, and the train loss matched the script's (-0.002 nats; +0.10 in order)."""
    max_wallclock_seconds: float = 600.0
    """training cap by the script's own timer (warmup/compile excluded)"""
    max_steps: int = 20_000
    """safety bound; the wallclock cap normally ends training"""
    warmup_steps: int = 20
    """compile/warmup steps, their model/optimizer state restored afterwards"""
    warmdown_frac: float = 0.667
    """LR decays linearly to 0 over the last 2/3 of the time budget (sp1024: 0.5)"""
    matrix_lr: float = 0.02
    """Muon, attention and MLP matrices (sp1024: 0.025)"""
    embed_lr: float = 0.03
    """AdamW, tied token embedding and other tables (sp1024: 0.035)"""
    scalar_lr: float = 0.02
    """AdamW, gains, gates, mixes (sp1024: 0.025)"""
    muon_momentum: float = 0.99
    """Muon momentum after the warmup below."""
    muon_momentum_start: float = 0.92
    """Muon momentum at step 0, raised linearly to muon_momentum."""
    muon_momentum_warmup_steps: int = 1500
    """Steps over which Muon's momentum rises."""
    muon_ns_steps: int = 5
    """Newton-Schulz iterations that orthogonalize each Muon update."""
    muon_row_normalize: bool = True
    """MuonEq-R: scale each row of the (Nesterov) update to unit norm before Newton-Schulz, so no row dominates
    the orthogonalization (PR #1460: about -0.001 BPB on FineWeb)."""
    weight_decay: float = 0.085
    """decoupled, Muon and AdamW matrices/tables (sp1024: 0.04)"""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (embeddings, scalars)."""
    grad_clip: float = 0.3
    """Global gradient-norm clip per step; 0 disables."""
    ema_decay: float = 0.997
    """0 disables; applied at the end"""
    enable_looping_at: float = 0.5
    """Depth recurrence (ModelConfig.num_loops) switches on at this fraction of training (time or steps); before it
    every block runs once, which is cheaper while the model is far from converged."""
    qat_threshold: float = 0.15
    """late QAT: int6 fake-quant once the LR scale falls below this; 0 disables"""
    qat_bits: int = 6
    """Bits of the late-QAT fake quantization (the artifact's int6)."""
    qat_clip_sigmas: float = 0.0
    """The late-QAT grid: 0 steps each row by its absmax / 31 (the March stack's); k > 0 by k x std(row) / 31, the
    grid SD clipping exports (QuantConfig.sdclip_sigmas, 12.85: 3-4x coarser than absmax's on Muon-trained rows).
    On P1 at 8192, 12.85 narrowed the gap by 0.0005 and scored 0.0012 worse in the end (docs/MEASUREMENTS.md)."""
    log_every: int = 50
    """Steps between train.log loss lines."""
    val_every: int = 0
    """0: validate only at the end (validation pauses the timer)"""
    val_batch_seqs: int = 32
    """Sequences per forward of the in-training validation (flat, seq_len windows)."""
    compile: bool = True
    """torch.compile on GPU (ignored on CPU)"""

    # A stored config made before a field existed lacks it: the value it was made with, where the default differs.
    ABSENT_MEANS: typing.ClassVar[dict] = {"recipe": "sp1024", "shuffle_windows": False, "muon_row_normalize": False}

    # Each number's allowed values (check_ranges); how fields must agree is checked in __post_init__.
    RANGES: typing.ClassVar[dict] = {
        "seed": ("[0, 4294967296)", " (numpy seeds are 32-bit)"), "train_batch_tokens": ">= 1",
        "micro_batch_tokens": ">= 1", "seq_len": ">= 1", "max_wallclock_seconds": "> 0", "max_steps": ">= 1",
        "warmup_steps": ">= 0", "warmdown_frac": "[0, 1]", "matrix_lr": ">= 0", "embed_lr": ">= 0",
        "scalar_lr": ">= 0", "muon_momentum": "[0, 1)", "muon_momentum_start": "[0, 1)",
        "muon_momentum_warmup_steps": ">= 0", "muon_ns_steps": ">= 1", "weight_decay": ">= 0", "grad_clip": ">= 0",
        "ema_decay": "[0, 1]", "enable_looping_at": "[0, 1]", "qat_threshold": "[0, 1]",
        "qat_bits": ("[2, 8]", " (int8 codes)"), "qat_clip_sigmas": ">= 0", "log_every": ">= 1", "val_every": ">= 0",
        "val_batch_seqs": ">= 1"}

    def __post_init__(self):
        check_ranges(self)
        for name in ("data_dir", "tokenizer_path"):
            if not getattr(self, name):
                raise ValueError(f"{name.upper()}='': must name a path")
        if self.recipe not in RECIPES:
            raise ValueError(f"RECIPE={self.recipe!r}: unknown recipe (known: {', '.join(RECIPES)})")
        for name in ("train_batch_tokens", "micro_batch_tokens"):
            tokens = getattr(self, name)
            if tokens % self.seq_len:
                example = max(1, round(tokens / self.seq_len)) * self.seq_len
                raise ValueError(f"{name.upper()}={tokens}: must be a multiple of SEQ_LEN={self.seq_len}, whole "
                                 f"sequences (e.g. {name.upper()}={example})")
        if len(self.adam_betas) != 2 or not all(within(b, "[0, 1)") for b in self.adam_betas):
            raise ValueError(f"ADAM_BETAS={','.join(map(str, self.adam_betas))}: need two numbers in [0, 1) (e.g. "
                             "ADAM_BETAS=0.9,0.95)")


def _parse(value: str, kind, name: str):
    if kind is bool:
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}={value!r}: expected a boolean (1/0, true/false)")
    if typing.get_origin(kind) is tuple:  # tuple[float, float] (fixed length) or tuple[float, ...] (any length)
        args = typing.get_args(kind)
        parts = value.replace(",", " ").split()
        fixed = Ellipsis not in args
        if fixed and len(parts) != len(args) or not parts:
            raise ValueError(f"{name}={value!r}: expected {len(args) if fixed else 'one or more'} comma-separated "
                             f"numbers, e.g. '0.9,0.95'")
        try:
            return tuple(args[0](p) for p in parts)
        except ValueError:
            raise ValueError(f"{name}={value!r}: expected numbers of type {args[0].__name__}") from None
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected {kind.__name__}") from None


# Named sets of defaults (RECIPE=name), as changes to the dataclass defaults, which are the default recipe's. Keys
# are fields of ModelConfig, TrainConfig, QuantConfig (tools/quant/gptq.py) or CalibConfig (tools/quant/calibrate.py).
RECIPES: dict[str, dict] = {
    # The SP8192 generation (PR #1460, 1.08269): 8192-token vocabulary, MLP 4x, layers 4-5 looped twice from half
    # of training, parallel residuals on the last 4 layers, gated skips, q gain 4, MuonEq-R, weight decay 0.085,
    # warmdown 2/3, matrix/scalar LR 0.02 and tied-embedding LR 0.03, shuffled training windows; BigramHash, value
    # embeddings and the second embedding off (their tables grow with the vocabulary); SD clipping, GPTQ on the
    # tied embedding and per-matrix bit allocation. The defaults.
    "sp8192": {},
    # The March 2026 stack (PR #1019, 1.1147 on FineWeb) with the kit's measured additions, at 1024 tokens.
    "sp1024": dict(
        vocab_size=1024, mlp_mult=3.0, q_gain_init=1.5, num_loops=0, parallel_last_n=0, skip_gates=False,
        bigram_buckets=3072, value_embed_last_n=2, embed2=True,
        data_dir="data/datasets/fineweb10B_sp1024", tokenizer_path="data/tokenizers/fineweb_1024_bpe.model",
        matrix_lr=0.025, scalar_lr=0.025, embed_lr=0.035, weight_decay=0.04, warmdown_frac=0.5,
        muon_row_normalize=False, shuffle_windows=False, clip_policy="search", gptq_tied_embedding=False,
        bit_allocation=False),
}


def settings_index(*configs) -> dict[str, tuple[object, str]]:
    """Every setting's name (lower case) -> (the config that owns it, its field). A field holding a config is walked:
    its fields are named with that config's PREFIX (NgramConfig: ngram_order), so one tree of configs (a Settings
    object, or any few configs) answers every KEY=VALUE. The first config that has a name owns it."""
    index: dict[str, tuple[object, str]] = {}
    for cfg in configs:
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if dataclasses.is_dataclass(value):
                index = {**settings_index(value), **index}
            else:
                index.setdefault(getattr(cfg, "PREFIX", "") + f.name, (cfg, f.name))
    return index


def set_setting(index: dict, key: str, value, source: str) -> list[str]:
    """Set one indexed setting from its string (or a typed value); its 'key: old -> new (source)' line, [] when
    unchanged. A value that does not parse is an error naming KEY."""
    cfg, name = index[key.lower()]
    old = getattr(cfg, name)
    new = _parse(value, typing.get_type_hints(type(cfg))[name], key.upper()) if isinstance(value, str) else value
    if new == old:
        return []
    setattr(cfg, name, new)
    return [f"{key.lower()}: {old} -> {new} ({source})"]


def apply_recipe(name: str, *configs, source: str = "recipe") -> list[str]:
    """Set the recipe's values on the settings the given configs own; 'name: old -> new (recipe)' lines."""
    if name not in RECIPES:
        raise ValueError(f"RECIPE={name!r}: unknown recipe (known: {', '.join(RECIPES)})")
    index = settings_index(*configs)
    return [line for key, value in RECIPES[name].items() if key in index
            for line in set_setting(index, key, value, f"{source}:{name}")]


# How close (difflib's ratio) a name must be to a setting to be taken for its misspelling: NUM_LAYRES (0.9), SEQ_LNE
# (0.86), VAL_BATCH_SIZE for VAL_BATCH_SEQS (0.86); far below it for PATH, HOME, WORLD_SIZE and the other variables
# an environment holds (tests/test_config.py tries a list of them).
TYPO_CUTOFF = 0.85
# Settings within TYPO_CUTOFF of another config's setting: in the environment for another stage (CALIB_BATCH_SEQS
# exported for quantization while training resolves only VAL_BATCH_SEQS's config), they are not typos.
# tests/test_config.py derives this set from the configs.
LOOKALIKE_SETTINGS = frozenset({"calib_batch_seqs", "val_batch_seqs"})


def did_you_mean(key: str, known) -> list[str]:
    """The known setting names (lower case) that `key` looks like a misspelling of; [] when it is far from all."""
    if key.lower() in LOOKALIKE_SETTINGS:
        return []
    return difflib.get_close_matches(key.lower(), list(known), n=3, cutoff=TYPO_CUTOFF)


def check_env_typos(env: dict[str, str], known) -> None:
    """An upper-case environment variable that names no setting but looks like one is an error naming the setting:
    ignored, it would cost a run with the default. Variables far from every setting (PATH, HOME) are left alone."""
    known = set(known)
    for key, value in env.items():
        close = did_you_mean(key, known) if key.isupper() and key.lower() not in known else []
        if close:
            raise ValueError(f"environment variable {key}={value!r} names no setting: did you mean "
                             f"{' or '.join(c.upper() for c in close)}? (rename it, or `unset {key}`)")


def resolve(*configs, env: dict[str, str] | None = None, cli: dict[str, str] | None = None) -> list[str]:
    """The one way settings are set, on a tree of configs (a Settings object, or any configs): a recipe named by
    RECIPE (CLI, else environment), then environment variables (upper-case setting names, the challenge's habit),
    then CLI overrides; then every config's checks on the final values. Returns 'name: old -> new (source)' lines.
    An unknown CLI key is an error naming the closest settings; an environment variable that looks like a misspelt
    setting is one too (check_env_typos), one far from every setting is ignored."""
    env = dict(os.environ) if env is None else env
    index = settings_index(*configs)
    check_env_typos(env, index)
    recipe = next((v for k, v in (cli or {}).items() if k.lower() == "recipe"), env.get("RECIPE"))
    changed = apply_recipe(recipe, *configs) if recipe and "recipe" in index else []  # TrainConfig.recipe's
    changed += [line for key, value in env.items() if key.isupper() and key.lower() in index
                for line in set_setting(index, key, value, "env")]
    for key, value in (cli or {}).items():
        if key.lower() not in index:
            close = difflib.get_close_matches(key.lower(), list(index), n=3)
            raise ValueError(f"unknown setting {key!r}" + (f": did you mean {' or '.join(c.upper() for c in close)}?"
                                                           if close else f" (`--help` lists the settings)"))
        changed += set_setting(index, key, value, "cli")
    for cfg in {id(c): c for c, _ in index.values()}.values():  # cross-field checks, on the final values
        (getattr(cfg, "validate", None) or getattr(cfg, "__post_init__", lambda: None))()
    return changed


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """The kit's one KEY=VALUE parser: command-line items as a dict (a later KEY wins; a value may hold '='); anything
    else is an error (a silently ignored typo costs a run)."""
    bad = [a for a in argv if "=" not in a or a.startswith("=")]
    if bad:
        raise ValueError(f"expected KEY=VALUE settings, got {bad} (e.g. SEED=42; the command's --help lists the keys)")
    return dict(a.split("=", 1) for a in argv)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(kind, data: dict):
    """Rebuild a config from a stored dict, rejecting unknown keys (a config/code mismatch)."""
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{kind.__name__}: stored config has unknown fields {sorted(unknown)} (made by another "
                         "version of the kit?)")
    out = kind(**{**getattr(kind, "ABSENT_MEANS", {}), **data})
    for f in dataclasses.fields(kind):
        if isinstance(getattr(out, f.name), list):
            setattr(out, f.name, tuple(getattr(out, f.name)))
    return out

