"""What the tests' tiny model configs start from, whatever the default recipe is."""
import dataclasses

from submission.config import RECIPES, ModelConfig

# RECIPE=sp1024's model fields (March stack: BigramHash, value embeddings, second embedding, no loops, no parallel
# residuals, plain skips, q gain 1.5, MLP 3x). A test written for one of that stack's mechanisms pins them, so that it
# keeps testing the model it was written for when the defaults move.
SP1024_MODEL = {k: v for k, v in RECIPES["sp1024"].items() if k in {f.name for f in dataclasses.fields(ModelConfig)}}
# Both generations at once, for tests of what runs the whole model (cached decoding, scoring streams, TTT,
# compliance): the sp1024 tables plus the sp8192 structure scaled to 2 layers (layer 1 looped once, parallel
# residuals on it, gated skips).
EVERY_FEATURE_2_LAYERS = {**SP1024_MODEL, "num_loops": 1, "loop_layers": (1, 1), "parallel_last_n": 1,
                          "skip_gates": True}
