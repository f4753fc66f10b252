"""Tests for submission/config.py: one override path (environment, then KEY=VALUE) with typed, named errors."""
from __future__ import annotations

import pytest

from submission.config import ModelConfig, TrainConfig, from_dict, resolve, to_dict


def test_defaults_are_the_recipe():
    m, t = ModelConfig(), TrainConfig()
    assert (m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads, m.head_dim) == (11, 512, 8, 4, 64)
    assert (m.bigram_buckets, m.bigram_dim, m.rope_dims, m.xsa_last_n) == (3072, 112, 16, 11)
    assert t.max_wallclock_seconds == 600.0 and t.train_batch_tokens == 786_432


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
    """embed2 became the default after artifacts were stored without the field (the P1 record's): such a config
    must rebuild the model it was made with, not today's default."""
    old = to_dict(ModelConfig())
    del old["embed2"]
    assert ModelConfig().embed2 and not from_dict(ModelConfig, old).embed2
    assert from_dict(ModelConfig, to_dict(ModelConfig())).embed2  # a config that names it keeps its value
    assert set(ModelConfig.ABSENT_MEANS) <= set(to_dict(ModelConfig()))  # only real fields


def test_command_line_items_must_be_key_value():
    from submission.config import parse_overrides
    assert parse_overrides(["SEED=1", "RUN_DIR=a=b"]) == {"SEED": "1", "RUN_DIR": "a=b"}
    with pytest.raises(ValueError, match=r"expected KEY=VALUE settings, got \['SEED'\]"):
        parse_overrides(["SEED"])


# ---------------------------------------------------------------------------------------------------- recipes

def _all_configs():
    from tools.calibrate import CalibConfig
    from tools.gptq import QuantConfig
    return ModelConfig(), TrainConfig(), QuantConfig(), CalibConfig()


def test_every_recipe_key_names_exactly_one_config_field_and_the_default_recipe_is_the_defaults():
    from submission.config import RECIPES
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
    changed = resolve(m, t, q, c, env={"WARMDOWN_FRAC": "0.5"}, cli={"RECIPE": "sp8192", "NUM_LOOPS": "1"})
    assert t.recipe == "sp8192" and m.vocab_size == 8192 and m.mlp_mult == 4.0 and m.loop_layers == (4, 5)
    assert m.num_loops == 1 and t.warmdown_frac == 0.5  # the recipe's 2 and 0.667 overridden
    assert m.parallel_last_n == 4 and m.skip_gates and t.muon_row_normalize and t.weight_decay == 0.085
    assert q.clip_policy == "sdclip" and q.gptq_tied_embedding and not m.embed2 and m.bigram_buckets == 0
    assert "num_loops: 0 -> 2 (recipe:sp8192)" in changed and "num_loops: 2 -> 1 (cli)" in changed
    m, t = ModelConfig(), TrainConfig()
    resolve(m, t, env={"RECIPE": "sp8192"})
    assert t.recipe == "sp8192" and m.vocab_size == 8192
    with pytest.raises(ValueError, match=r"RECIPE='sp4096': unknown recipe \(known: sp1024, sp8192\)"):
        resolve(ModelConfig(), TrainConfig(), env={}, cli={"RECIPE": "sp4096"})


def test_relations_between_fields_are_checked_on_the_final_values():
    with pytest.raises(ValueError, match="LOOP_LAYERS=9,11 NUM_LOOPS=2"):
        resolve(ModelConfig(), TrainConfig(), env={}, cli={"RECIPE": "sp8192", "LOOP_LAYERS": "9,11"})
    m = ModelConfig()
    resolve(m, TrainConfig(), env={}, cli={"LOOP_LAYERS": "9,11"})  # no loops: the span is not used
    assert m.loop_layers == (9, 11)
