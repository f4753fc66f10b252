"""Tests for submission/config.py: one override path (environment, then KEY=VALUE) with typed, named errors."""
from __future__ import annotations

import dataclasses
import os
import typing

import pytest

from submission.config import RECIPES, ModelConfig, TrainConfig, from_dict, resolve, to_dict
from tests.tiny import SP1024_MODEL


def test_defaults_are_the_recipe():
    m, t = ModelConfig(), TrainConfig()
    assert (m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads, m.head_dim) == (11, 512, 8, 4, 64)
    assert (m.vocab_size, m.mlp_mult, m.loop_layers, m.num_loops, m.parallel_last_n) == (8192, 4.0, (4, 5), 2, 4)
    assert (m.bigram_buckets, m.value_embed_last_n, m.embed2, m.rope_dims, m.xsa_last_n) == (0, 0, False, 16, 11)
    assert t.max_wallclock_seconds == 600.0 and t.train_batch_tokens == 786_432 and t.recipe == "sp8192"
    assert t.data_dir.endswith("sp8192") and t.tokenizer_path.endswith("fineweb_8192_bpe.model")


def test_env_then_cli_precedence_and_log_lines():
    m, t = ModelConfig(), TrainConfig()
    changed = resolve(m, t, env={"NUM_LAYERS": "9", "SEED": "7", "PATH": "/bin", "lower": "x"},
                      cli={"SEED": "42", "adam_betas": "0.8,0.9", "compile": "off"})
    assert m.num_layers == 9 and t.seed == 42 and t.adam_betas == (0.8, 0.9) and t.compile is False
    assert "seed: 1337 -> 7 (env)" in changed and "seed: 7 -> 42 (cli)" in changed


@pytest.mark.parametrize("cli, message", [
    ({"NUM_LAYRES": "9"}, "unknown setting 'NUM_LAYRES'"),
    ({"NUM_LAYERS": "nine"}, "NUM_LAYERS='nine': expected int"),
    ({"COMPILE": "maybe"}, "expected a boolean"),
    ({"ADAM_BETAS": "0.9"}, "expected 2 comma-separated numbers"),
])
def test_bad_overrides_name_the_setting(cli, message):
    with pytest.raises(ValueError, match=message):
        resolve(ModelConfig(), TrainConfig(), env={}, cli=cli)


def test_stored_config_round_trip_and_mismatch():
    t = TrainConfig(seed=3, adam_betas=(0.5, 0.6))
    assert from_dict(TrainConfig, to_dict(t)) == t
    data = to_dict(ModelConfig())
    data["new_feature"] = 1
    with pytest.raises(ValueError, match=r"unknown fields \['new_feature'\]"):
        from_dict(ModelConfig, data)


def test_a_stored_config_from_before_a_feature_loads_without_it():
    """Artifacts and checkpoints stored before a field existed (the P1 record's, every sp1024 run before the SP8192
    generation) must rebuild what they were made with, not today's defaults: no loops, no parallel residuals, plain
    skips, the sp1024 recipe's quantization."""
    for kind in (ModelConfig, TrainConfig):
        assert set(kind.ABSENT_MEANS) <= set(to_dict(kind()))  # only real fields
        for field, then in kind.ABSENT_MEANS.items():
            old = to_dict(kind(**{field: then}))
            del old[field]
            assert getattr(from_dict(kind, old), field) == then, field
    old = to_dict(ModelConfig(**SP1024_MODEL))
    for field in ("num_loops", "parallel_last_n", "skip_gates", "loop_layers", "orthogonal_init", "key_offset_last_n",
                  "key_offset_dims", "layer_bigram_buckets", "embed2"):
        del old[field]  # the fields a March 2026 artifact lacks
    assert from_dict(ModelConfig, old) == ModelConfig(**{**SP1024_MODEL, "embed2": False})
    old = to_dict(TrainConfig())
    del old["recipe"]
    assert from_dict(TrainConfig, old).recipe == "sp1024"  # quantized again with the sp1024 recipe's settings
    data = to_dict(ModelConfig(num_loops=1, skip_gates=True))
    assert from_dict(ModelConfig, data) == ModelConfig(num_loops=1, skip_gates=True)  # a stored value is kept


def test_command_line_items_must_be_key_value():
    from submission.config import parse_overrides
    assert parse_overrides(["SEED=1", "RUN_DIR=a=b"]) == {"SEED": "1", "RUN_DIR": "a=b"}
    with pytest.raises(ValueError, match=r"expected KEY=VALUE settings, got \['SEED'\]"):
        parse_overrides(["SEED"])


# ---------------------------------------------------------------------------------------------------- recipes


def _all_configs():
    from tools.quant.calibrate import CalibConfig
    from tools.quant.gptq import QuantConfig
    return ModelConfig(), TrainConfig(), QuantConfig(), CalibConfig()


def test_every_recipe_key_names_exactly_one_config_field_and_the_default_recipe_is_the_defaults():
    import dataclasses
    owners = {}
    for cfg in _all_configs():
        for f in dataclasses.fields(cfg):
            owners.setdefault(f.name, []).append(type(cfg).__name__)
    for name, values in RECIPES.items():
        for key in values:
            assert len(owners.get(key, [])) == 1, f"recipe {name}: {key} is owned by {owners.get(key)}"
    assert RECIPES[TrainConfig().recipe] == {}


def test_recipe_sets_its_defaults_then_env_and_cli_override_them():
    m, t, q, c = _all_configs()
    changed = resolve(m, t, q, c, env={"WARMDOWN_FRAC": "0.6"}, cli={"RECIPE": "sp1024", "BIGRAM_BUCKETS": "2048"})
    assert t.recipe == "sp1024" and m.vocab_size == 1024 and m.mlp_mult == 3.0 and m.num_loops == 0
    assert m.bigram_buckets == 2048 and t.warmdown_frac == 0.6  # the recipe's 3072 and 0.5 overridden
    assert m.parallel_last_n == 0 and not m.skip_gates and not t.muon_row_normalize and t.weight_decay == 0.04
    assert q.clip_policy == "search" and not q.gptq_tied_embedding and m.embed2 and m.value_embed_last_n == 2
    assert t.data_dir.endswith("sp1024") and not t.shuffle_windows
    assert "num_loops: 2 -> 0 (recipe:sp1024)" in changed and "bigram_buckets: 3072 -> 2048 (cli)" in changed
    configs = _all_configs()
    assert resolve(*configs, env={"RECIPE": "sp8192"}) == []
    assert configs == _all_configs()  # the default recipe is the defaults
    with pytest.raises(ValueError, match=r"RECIPE='sp4096': unknown recipe \(known: sp8192, sp1024\)"):
        resolve(ModelConfig(), TrainConfig(), env={}, cli={"RECIPE": "sp4096"})


def test_relations_between_fields_are_checked_on_the_final_values():
    with pytest.raises(ValueError, match="LOOP_LAYERS=9,11 NUM_LOOPS=2"):
        resolve(ModelConfig(), TrainConfig(), env={}, cli={"RECIPE": "sp8192", "LOOP_LAYERS": "9,11"})
    m = ModelConfig()
    resolve(m, TrainConfig(), env={}, cli={"NUM_LOOPS": "0", "LOOP_LAYERS": "9,11"})  # no loops: the span is unused
    assert m.loop_layers == (9, 11)


# ------------------------------------------------------------------------------------- ranges and relations

def _eval_keys():
    from eval.ngram import NgramConfig
    from eval.run import EvalConfig
    return ({f.name for f in dataclasses.fields(EvalConfig)} - {"ngram_config"},
            {"ngram_" + f.name for f in dataclasses.fields(NgramConfig)})


def _apply(settings: dict[str, str]) -> None:
    """Apply KEY=VALUE settings the way the commands do: through resolve, over the eval settings when they are all
    eval settings (`pgolf eval`), else over the four training-side configs."""
    from eval.run import EvalConfig
    own, nested = _eval_keys()
    resolve(*([EvalConfig()] if all(k.lower() in own | nested for k in settings) else _all_configs()), env={},
            cli=settings)


# Every bad setting a user can type, with the one-line message it must give: the setting as typed, the allowed values.
BAD_SETTINGS = [
    # ModelConfig: ranges
    ({"VOCAB_SIZE": "1"}, r"^VOCAB_SIZE=1: must be in \[2, 65536\] \(shards store token ids as uint16\)"),
    ({"VOCAB_SIZE": "70000"}, r"^VOCAB_SIZE=70000: must be in \[2, 65536\]"),
    ({"NUM_LAYERS": "0"}, r"^NUM_LAYERS=0: must be >= 1 \(ModelConfig.num_layers=0\)"),
    ({"MODEL_DIM": "0"}, r"^MODEL_DIM=0: must be >= 1"),
    ({"NUM_HEADS": "0"}, r"^NUM_HEADS=0: must be >= 1"),
    ({"NUM_KV_HEADS": "0"}, r"^NUM_KV_HEADS=0: must be >= 1"),
    ({"MLP_MULT": "0"}, r"^MLP_MULT=0.0: must be > 0"),
    ({"LOGIT_SOFTCAP": "-30"}, r"^LOGIT_SOFTCAP=-30.0: must be >= 0"),
    ({"Q_GAIN_INIT": "0"}, r"^Q_GAIN_INIT=0.0: must be > 0"),
    ({"XSA_LAST_N": "-1"}, r"^XSA_LAST_N=-1: must be >= 0"),
    ({"ROPE_DIMS": "-2"}, r"^ROPE_DIMS=-2: must be >= 0"),
    ({"ROPE_BASE": "1"}, r"^ROPE_BASE=1.0: must be > 1"),
    ({"ROPE_BASE": "nan"}, r"^ROPE_BASE=nan: must be > 1"),
    ({"BIGRAM_BUCKETS": "-1"}, r"^BIGRAM_BUCKETS=-1: must be >= 0"),
    ({"BIGRAM_DIM": "0"}, r"^BIGRAM_DIM=0: must be >= 1"),
    ({"VALUE_EMBED_LAST_N": "-1"}, r"^VALUE_EMBED_LAST_N=-1: must be >= 0"),
    ({"VALUE_EMBED_DIM": "0"}, r"^VALUE_EMBED_DIM=0: must be >= 1"),
    ({"BOS_ID": "-1"}, r"^BOS_ID=-1: must be >= 0"),
    ({"KEY_OFFSET_LAST_N": "-1"}, r"^KEY_OFFSET_LAST_N=-1: must be >= 0"),
    ({"KEY_OFFSET_DIMS": "-1"}, r"^KEY_OFFSET_DIMS=-1: must be >= 0"),
    ({"LAYER_BIGRAM_BUCKETS": "-5"}, r"^LAYER_BIGRAM_BUCKETS=-5: must be >= 0"),
    ({"NUM_LOOPS": "-1"}, r"^NUM_LOOPS=-1: must be >= 0"),
    ({"PARALLEL_LAST_N": "-1"}, r"^PARALLEL_LAST_N=-1: must be >= 0"),
    # ModelConfig: relations (each was a torch shape error or a silent no-op)
    ({"MODEL_DIM": "500"}, r"^MODEL_DIM=500 is not a multiple of NUM_HEADS=8: .* \(e.g. MODEL_DIM=512\)"),
    ({"NUM_KV_HEADS": "3"}, r"^NUM_HEADS=8 is not a multiple of NUM_KV_HEADS=3: each KV head serves"),
    ({"MODEL_DIM": "40"}, r"^MODEL_DIM=40 / NUM_HEADS=8 = 5 dims per head: must be even"),
    ({"ROPE_DIMS": "66"}, r"^ROPE_DIMS=66: must be even and in 0..64, the head dim MODEL_DIM / NUM_HEADS"),
    ({"ROPE_DIMS": "15"}, r"^ROPE_DIMS=15: must be even and in 0..64"),
    ({"VALUE_EMBED_LAST_N": "12"}, r"^VALUE_EMBED_LAST_N=12: must be in 0..NUM_LAYERS=11"),
    ({"KEY_OFFSET_LAST_N": "12"}, r"^KEY_OFFSET_LAST_N=12: must be in 0..NUM_LAYERS=11"),
    ({"PARALLEL_LAST_N": "12"}, r"^PARALLEL_LAST_N=12: must be in 0..NUM_LAYERS=11"),
    ({"NUM_LAYERS": "1"}, r"^PARALLEL_LAST_N=4: must be in 0..NUM_LAYERS=1"),
    ({"RECIPE": "sp1024", "NUM_LAYERS": "1"}, r"^VALUE_EMBED_LAST_N=2: must be in 0..NUM_LAYERS=1"),
    ({"BIGRAM_BUCKETS": "1"}, r"^BIGRAM_BUCKETS=1: must be 0 \(off\) or >= 2"),
    ({"LAYER_BIGRAM_BUCKETS": "1"}, r"^LAYER_BIGRAM_BUCKETS=1: must be 0 \(off\) or >= 2"),
    ({"BOS_ID": "8192"}, r"^BOS_ID=8192: must be a token id, below VOCAB_SIZE=8192"),
    ({"KEY_OFFSET_LAST_N": "1", "ROPE_DIMS": "64"}, r"^KEY_OFFSET_LAST_N=1: .* ROPE_DIMS=64 rotates all 64"),
    ({"NUM_LOOPS": "2", "LOOP_LAYERS": "9,11"}, r"^LOOP_LAYERS=9,11 NUM_LOOPS=2"),
    # TrainConfig: ranges
    ({"DATA_DIR": ""}, r"^DATA_DIR='': must name a path"),
    ({"TOKENIZER_PATH": ""}, r"^TOKENIZER_PATH='': must name a path"),
    ({"RECIPE": "sp4096"}, r"^RECIPE='sp4096': unknown recipe \(known: sp8192, sp1024\)"),
    ({"SEED": "-1"}, r"^SEED=-1: must be in \[0, 4294967296\) \(numpy seeds are 32-bit\)"),
    ({"SEED": "4294967296"}, r"^SEED=4294967296: must be in \[0, 4294967296\)"),
    ({"TRAIN_BATCH_TOKENS": "0"}, r"^TRAIN_BATCH_TOKENS=0: must be >= 1"),
    ({"MICRO_BATCH_TOKENS": "0"}, r"^MICRO_BATCH_TOKENS=0: must be >= 1"),
    ({"SEQ_LEN": "0"}, r"^SEQ_LEN=0: must be >= 1 \(TrainConfig.seq_len=0\)$"),
    ({"MAX_WALLCLOCK_SECONDS": "0"}, r"^MAX_WALLCLOCK_SECONDS=0.0: must be > 0"),
    ({"MAX_WALLCLOCK_SECONDS": "inf"}, r"^MAX_WALLCLOCK_SECONDS=inf: must be > 0"),
    ({"MAX_STEPS": "0"}, r"^MAX_STEPS=0: must be >= 1"),
    ({"WARMUP_STEPS": "-1"}, r"^WARMUP_STEPS=-1: must be >= 0"),
    ({"WARMDOWN_FRAC": "1.5"}, r"^WARMDOWN_FRAC=1.5: must be in \[0, 1\]"),
    ({"MATRIX_LR": "-0.01"}, r"^MATRIX_LR=-0.01: must be >= 0"),
    ({"EMBED_LR": "-1"}, r"^EMBED_LR=-1.0: must be >= 0"),
    ({"SCALAR_LR": "-1"}, r"^SCALAR_LR=-1.0: must be >= 0"),
    ({"MUON_MOMENTUM": "1"}, r"^MUON_MOMENTUM=1.0: must be in \[0, 1\)"),
    ({"MUON_MOMENTUM_START": "-0.1"}, r"^MUON_MOMENTUM_START=-0.1: must be in \[0, 1\)"),
    ({"MUON_MOMENTUM_WARMUP_STEPS": "-1"}, r"^MUON_MOMENTUM_WARMUP_STEPS=-1: must be >= 0"),
    ({"MUON_NS_STEPS": "0"}, r"^MUON_NS_STEPS=0: must be >= 1"),
    ({"WEIGHT_DECAY": "-0.04"}, r"^WEIGHT_DECAY=-0.04: must be >= 0"),
    ({"ADAM_BETAS": "0.9,1.0"}, r"^ADAM_BETAS=0.9,1.0: need two numbers in \[0, 1\) \(e.g. ADAM_BETAS=0.9,0.95\)"),
    ({"GRAD_CLIP": "-1"}, r"^GRAD_CLIP=-1.0: must be >= 0"),
    ({"EMA_DECAY": "1.5"}, r"^EMA_DECAY=1.5: must be in \[0, 1\]"),
    ({"ENABLE_LOOPING_AT": "-0.5"}, r"^ENABLE_LOOPING_AT=-0.5: must be in \[0, 1\]"),
    ({"QAT_THRESHOLD": "2"}, r"^QAT_THRESHOLD=2.0: must be in \[0, 1\]"),
    ({"QAT_BITS": "9"}, r"^QAT_BITS=9: must be in \[2, 8\]"),
    ({"QAT_CLIP_SIGMAS": "-1"}, r"^QAT_CLIP_SIGMAS=-1.0: must be >= 0"),
    ({"LOG_EVERY": "0"}, r"^LOG_EVERY=0: must be >= 1"),
    ({"VAL_EVERY": "-1"}, r"^VAL_EVERY=-1: must be >= 0"),
    ({"VAL_BATCH_SEQS": "0"}, r"^VAL_BATCH_SEQS=0: must be >= 1"),
    # TrainConfig: relations, on the final values (SEQ_LEN changed alone leaves the default batch)
    ({"SEQ_LEN": "1000"}, r"^TRAIN_BATCH_TOKENS=786432: must be a multiple of SEQ_LEN=1000, whole sequences \(e.g. "
                          r"TRAIN_BATCH_TOKENS=786000\)"),
    ({"MICRO_BATCH_TOKENS": "1000"}, r"^MICRO_BATCH_TOKENS=1000: must be a multiple of SEQ_LEN=2048"),
    # QuantConfig
    ({"MATRIX_BITS": "9"}, r"^MATRIX_BITS=9: must be in \[2, 8\] \(codes are stored as int8\)"),
    ({"EMBED_BITS": "1"}, r"^EMBED_BITS=1: must be in \[2, 8\]"),
    ({"PASSTHROUGH_MAX_NUMEL": "-1"}, r"^PASSTHROUGH_MAX_NUMEL=-1: must be >= 0"),
    ({"BLOCK_SIZE": "0"}, r"^BLOCK_SIZE=0: must be >= 1"),
    ({"DAMP": "0"}, r"^DAMP=0.0: must be > 0"),
    ({"DAMP_GROWTH": "1"}, r"^DAMP_GROWTH=1.0: must be > 1 \(each retry must damp more\)"),
    ({"MAX_DAMP_RETRIES": "-1"}, r"^MAX_DAMP_RETRIES=-1: must be >= 0"),
    ({"MIN_CLIP_SIGMA": "-1"}, r"^MIN_CLIP_SIGMA=-1.0: must be >= 0 \(0 = no floor\)"),
    ({"CLIP_SIGMAS": "3,0"}, r"^CLIP_SIGMAS=3.0,0.0: clips must be positive multiples of std"),
    ({"CLIP_POLICY": "sd"}, r"^CLIP_POLICY='sd': choose one of search, sdclip"),
    ({"SDCLIP_SIGMAS": "0"}, r"^SDCLIP_SIGMAS=0.0: must be > 0"),
    ({"SDCLIP_EMBED_SIGMAS": "-1"}, r"^SDCLIP_EMBED_SIGMAS=-1.0: must be > 0"),
    ({"LQER_RANK": "-1"}, r"^LQER_RANK=-1: must be in \[0, 256\] \(0 = off"),
    ({"BIT_ALLOCATION": "1", "CLIP_POLICY": "search"}, r"^BIT_ALLOCATION=1 with CLIP_POLICY='search': .* "
                                                        r"set CLIP_POLICY=sdclip"),
    ({"ALLOCATION_PROBES": "1,0"}, r"^ALLOCATION_PROBES=1.0,0.0: need positive multipliers"),
    ({"ALLOCATION_GRID": "-1"}, r"^ALLOCATION_GRID=-1.0: need positive multipliers"),
    ({"ALLOCATION_SEQS": "0"}, r"^ALLOCATION_SEQS=0: must be >= 1"),
    # CalibConfig
    ({"CALIB_SOURCE": "val"}, r"^CALIB_SOURCE='val': choose one of generated, train"),
    ({"CALIB_SEQS": "0"}, r"^CALIB_SEQS=0: must be >= 1"),
    ({"CALIB_SEQ_LEN": "1"}, r"^CALIB_SEQ_LEN=1: need calib_seq_len >= 2"),
    ({"CALIB_TEMPERATURE": "0"}, r"^CALIB_TEMPERATURE=0.0: must be > 0"),
    ({"CALIB_SEED": "-1"}, r"^CALIB_SEED=-1: must be >= 0"),
    ({"CALIB_BATCH_SEQS": "0"}, r"^CALIB_BATCH_SEQS=0: must be >= 1"),
    # EvalConfig
    ({"CONTEXT_LEN": "0"}, r"^CONTEXT_LEN=0: must be >= 1"),
    ({"STRIDE": "0"}, r"^STRIDE=0: must be >= 1"),
    ({"STRIDE": "4096"}, r"^STRIDE=4096: must be at most CONTEXT_LEN=2048"),
    ({"ROPE_SCALE": "0"}, r"^ROPE_SCALE=0.0: must be > 0 \(1 = as trained\)"),
    ({"BATCH_WINDOWS": "0"}, r"^BATCH_WINDOWS=0: must be >= 1"),
    ({"CHUNK_TOKENS": "0"}, r"^CHUNK_TOKENS=0: must be >= 1"),
    ({"TTT_EPOCHS": "0"}, r"^TTT_EPOCHS=0: must be >= 1"),
    ({"TTT_LR": "-0.002"}, r"^TTT_LR=-0.002: must be >= 0"),
    ({"TTT_MOMENTUM": "1"}, r"^TTT_MOMENTUM=1.0: must be in \[0, 1\)"),
    ({"TTT_GRAD_CLIP": "-1"}, r"^TTT_GRAD_CLIP=-1.0: must be >= 0 \(0 = no clip\)"),
    ({"TTT_BATCH_SEQS": "0"}, r"^TTT_BATCH_SEQS=0: must be >= 1"),
    ({"TTT_PARAMS": ","}, r"^TTT_PARAMS=',': name 'all' or comma-separated parameter name prefixes"),
    ({"TTT": "0"}, r"^HASH_EMBED=1 with TTT=0: .*needs ttt \(set HASH_EMBED=0 as well\)"),
    ({"HASH_BUCKETS": "0"}, r"^HASH_BUCKETS=0: must be >= 1"),
    ({"HASH_LR_MULT": "-1"}, r"^HASH_LR_MULT=-1.0: must be >= 0"),
    ({"NGRAM_SCORE": "mix"}, r"^NGRAM_SCORE='mix': choose blend or tilt"),
    ({"COMPLIANCE_CHUNKS": "0"}, r"^COMPLIANCE_CHUNKS=0: must be >= 1"),
    ({"COMPLIANCE_CHUNK_TOKENS": "0"}, r"^COMPLIANCE_CHUNK_TOKENS=0: must be >= 1"),
    # NgramConfig, as NGRAM_<FIELD>
    ({"NGRAM_ORDER": "0"}, r"^NGRAM_ORDER=0: must be >= 1 \(1 = unigram; the recipe uses 12\) \(NgramConfig.order=0\)"),
    ({"NGRAM_SMOOTHING": "good_turing"}, r"^NGRAM_SMOOTHING='good_turing': choose one of witten_bell, kneser_ney"),
    ({"NGRAM_DISCOUNT": "0"}, r"^NGRAM_DISCOUNT=0.0: must be in \(0, 1\] so every seen count stays >= 0"),
    ({"NGRAM_FLOOR": "1"}, r"^NGRAM_FLOOR=1.0: must be in \(0, 1\)"),
    ({"NGRAM_HASH_MODULUS": "0"}, r"^NGRAM_HASH_MODULUS=0: must be in \[1, 140737488355328\) so that id \* V fits"),
    ({"NGRAM_BOS_ID": "-1"}, r"^NGRAM_BOS_ID=-1: must be >= 0"),
    ({"NGRAM_MIX_FIT_ITERS": "0"}, r"^NGRAM_MIX_FIT_ITERS=0: must be >= 1"),
    ({"NGRAM_MIX_FIT_WINDOW": "0"}, r"^NGRAM_MIX_FIT_WINDOW=0: must be >= 1 tokens"),
]
# Fields without a bad value above, and why.
UNCHECKED = {"run_dir": "any folder name; empty means runs/<timestamp>_seed<seed>",
             "ngram_config": "its fields are the NGRAM_<FIELD> rows",
             "mix_weights": "not a KEY=VALUE setting; NgramConfig(mix_weights=...) is checked in tests/test_ngram.py"}


@pytest.mark.parametrize("settings, message", BAD_SETTINGS, ids=[" ".join(f"{k}={v}" for k, v in s.items())
                                                                 for s, _ in BAD_SETTINGS])
def test_a_bad_setting_is_one_line_naming_it_and_the_allowed_values(settings, message):
    with pytest.raises(ValueError, match=message) as err:
        _apply(settings)
    assert "\n" not in str(err.value)


def test_every_field_of_every_config_has_a_bad_value_in_the_table():
    from eval.ngram import NgramConfig
    from eval.run import EvalConfig
    tried = {k.lower() for settings, _ in BAD_SETTINGS for k in settings}
    for kind, prefix in [*((type(c), "") for c in _all_configs()), (EvalConfig, ""), (NgramConfig, "ngram_")]:
        hints = typing.get_type_hints(kind)
        for f in dataclasses.fields(kind):
            if hints[f.name] is not bool and f.name not in UNCHECKED:
                assert prefix + f.name in tried, f"{kind.__name__}.{f.name}: no bad value in BAD_SETTINGS"


@pytest.mark.parametrize("settings", [
    {"ROPE_DIMS": "0"}, {"ROPE_DIMS": "64"},                  # no RoPE; RoPE on every head dim (tests' tiny models)
    {"XSA_LAST_N": "20"}, {"NUM_LAYERS": "6"},                 # XSA on more layers than there are: all of them
    {"NUM_KV_HEADS": "8"}, {"NUM_KV_HEADS": "1"}, {"BIGRAM_BUCKETS": "0"}, {"BIGRAM_BUCKETS": "2"},
    {"EMA_DECAY": "0"}, {"EMA_DECAY": "1"}, {"WARMDOWN_FRAC": "0"}, {"WARMDOWN_FRAC": "1"}, {"QAT_THRESHOLD": "0"},
    {"QAT_CLIP_SIGMAS": "12.85"},
    {"GRAD_CLIP": "0"}, {"VAL_EVERY": "0"}, {"SEED": "0"}, {"SEED": "4294967295"}, {"ADAM_BETAS": "0,0.999"},
    {"SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "1024", "MICRO_BATCH_TOKENS": "2048"},  # micro above the batch: capped
    {"MATRIX_BITS": "2"}, {"MIN_CLIP_SIGMA": "0"}, {"MAX_DAMP_RETRIES": "0"}, {"CALIB_SEQ_LEN": "2"},
    {"STRIDE": "2048"}, {"TTT": "0", "HASH_EMBED": "0"}, {"TTT_LR": "0"}, {"NGRAM_DISCOUNT": "1"},
])
def test_boundary_settings_are_accepted(settings):
    _apply(settings)


def test_every_recipe_resolves_and_the_checks_run_on_the_final_values():
    for name in RECIPES:
        configs = _all_configs()
        resolve(*configs, env={}, cli={"RECIPE": name})
        for cfg in configs:
            type(cfg)(**to_dict(cfg))  # what resolve left passes the constructor's checks too
    # each value alone is in range; together they are not, whichever way they arrive
    with pytest.raises(ValueError, match=r"^NUM_HEADS=8 is not a multiple of NUM_KV_HEADS=3"):
        resolve(ModelConfig(), TrainConfig(), env={"NUM_KV_HEADS": "3"}, cli={"NUM_HEADS": "8"})
    m = ModelConfig()
    resolve(m, TrainConfig(), env={"NUM_HEADS": "6"}, cli={"MODEL_DIM": "384", "NUM_KV_HEADS": "3"})
    assert (m.num_heads, m.head_dim) == (6, 64)


def test_constructors_check_too_not_only_overrides():
    with pytest.raises(ValueError, match=r"^SEQ_LEN=0: must be >= 1"):
        TrainConfig(seq_len=0)
    with pytest.raises(ValueError, match=r"^RECIPE='sp4096': unknown recipe"):
        TrainConfig(recipe="sp4096")
    with pytest.raises(ValueError, match=r"^MAX_STEPS='5': must be >= 1"):  # a string where a number belongs
        TrainConfig(max_steps="5")
    with pytest.raises(ValueError, match=r"^ADAM_BETAS=0.9: need two numbers"):
        TrainConfig(adam_betas=(0.9,))
    stored = to_dict(ModelConfig())
    stored["num_kv_heads"] = 3
    with pytest.raises(ValueError, match="NUM_KV_HEADS=3"):
        from_dict(ModelConfig, stored)


# ------------------------------------------------------------------------------ misspelt environment variables

# Variables an environment holds for other programs: the shell, torchrun, CUDA, NCCL, Python, Hugging Face.
UNRELATED_ENV = ("PATH HOME USER SHELL LANG LC_ALL PWD OLDPWD TERM HOSTNAME LOGNAME TMPDIR EDITOR DISPLAY "
                 "CUDA_VISIBLE_DEVICES CUDA_HOME LOCAL_RANK RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK "
                 "GROUP_WORLD_SIZE ROLE_RANK ROLE_NAME ROLE_WORLD_SIZE MASTER_ADDR MASTER_PORT TORCHELASTIC_RUN_ID "
                 "OMP_NUM_THREADS NCCL_DEBUG TORCHINDUCTOR_CACHE_DIR PYTORCH_CUDA_ALLOC_CONF PYTHONPATH PYTHONHASHSEED "
                 "VIRTUAL_ENV HF_HOME HF_TOKEN TOKENIZERS_PARALLELISM WANDB_PROJECT SLURM_JOB_ID").split()


@pytest.mark.parametrize("env, message", [
    ({"NUM_LAYRES": "9"}, r"^environment variable NUM_LAYRES='9' names no setting: did you mean NUM_LAYERS\? "
                          r"\(rename it, or `unset NUM_LAYRES`\)$"),
    ({"SEQ_LNE": "1024"}, "did you mean SEQ_LEN"),
    ({"VAL_BATCH_SIZE": "8"}, "did you mean VAL_BATCH_SEQS"),        # the challenge's own train_gpt.py name
    ({"QK_GAIN_INIT": "4"}, "did you mean Q_GAIN_INIT"),              # ditto
    ({"CALIB_SEQ": "32"}, "did you mean CALIB_SEQS"),
    ({"MATRIX_BIT": "5"}, "did you mean MATRIX_BITS"),
])
def test_a_misspelt_setting_in_the_environment_is_an_error(env, message):
    with pytest.raises(ValueError, match=message):
        resolve(*_all_configs(), env={"PATH": "/bin", **env})


@pytest.mark.parametrize("env, message", [
    ({"TTT_EPOCH": "2"}, "did you mean TTT_EPOCHS"),
    ({"NGRAM_ODER": "8"}, "did you mean NGRAM_ORDER"),
    ({"TTT_CHUNK_TOKENS": "65536"}, "did you mean CHUNK_TOKENS"),     # the records' name for it
])
def test_a_misspelt_eval_setting_in_the_environment_is_an_error(env, message):
    from eval.run import EvalConfig
    with pytest.raises(ValueError, match=message):
        resolve(EvalConfig(), env={"HOME": "/root", **env})


def _kit_keys() -> dict[str, str]:
    """Every setting (lower case, n-gram ones as ngram_<field>) -> the config that owns it."""
    from eval.ngram import NgramConfig
    from eval.run import EvalConfig
    keys = {}
    for kind in (*(type(c) for c in _all_configs()), EvalConfig):
        keys.update({f.name: kind.__name__ for f in dataclasses.fields(kind) if f.name != "ngram_config"})
    keys.update({"ngram_" + f.name: "EvalConfig" for f in dataclasses.fields(NgramConfig)})
    return keys


def test_unrelated_variables_and_settings_of_other_stages_are_left_alone():
    from eval.run import EvalConfig
    unrelated = {k: "x" for k in (*UNRELATED_ENV, *os.environ) if k.isupper() and k.lower() not in _kit_keys()}
    unrelated["num_layres"] = "3"  # lower case: never a setting
    other = {k.upper(): "1" for k, owner in _kit_keys().items() if owner not in ("ModelConfig", "TrainConfig")}
    m, t = ModelConfig(), TrainConfig()
    assert resolve(m, t, env={**unrelated, **other}) == []  # `pgolf train` with quantize/eval settings exported
    resolve(*_all_configs(), env=unrelated)
    training = {k.upper(): "1" for k, owner in _kit_keys().items() if owner != "EvalConfig"}
    assert resolve(EvalConfig(), env={**unrelated, **training}) == []


def test_lookalike_settings_are_exactly_those_near_another_configs_setting():
    """A setting within the cutoff of another config's setting must not be taken for its typo when a command
    resolves only the other config (LOOKALIKE_SETTINGS); the set is derived here so a new field cannot slip by."""
    import difflib
    from submission.config import LOOKALIKE_SETTINGS, TYPO_CUTOFF
    keys = _kit_keys()
    near = {k for k in keys
            if difflib.get_close_matches(k, [other for other in keys if keys[other] != keys[k]], cutoff=TYPO_CUTOFF)}
    assert near == LOOKALIKE_SETTINGS
