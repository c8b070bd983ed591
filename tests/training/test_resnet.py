"""The ResNets' parameter names and shapes are those their checkpoints were written with, so every existing
checkpoint loads (strictly) and exports as before. The digests were taken from the state dicts of the stage
loops the one stage builder (`_make_layer`) replaced."""

import hashlib

import pytest

from training.models import create_model

# name, arguments beyond 28x28x1 and 10 classes -> (sha256 of the state dict's "key shape" lines, in order; keys)
STATE_DICT_DIGESTS = {
    ("resnet18", ()): ("673afa5a804297c4", 124),
    ("resnet18", (("input_size", 224), ("in_channels", 3))): ("2c9de1c4d36aee76", 124),
    ("resnet34", ()): ("b458d4c7e57f5635", 220),
    ("resnet50", ()): ("95a86815b14486df", 322),
    ("resnet101", ()): ("aac7f5fed944585c", 628),
    ("resnet152", ()): ("b905f374509cfcd4", 934),
    ("resnet20", ()): ("4d3ba3244f94c72b", 130),
    ("resnet20", (("shortcut", "A"),)): ("11e7af128587334c", 118),
    ("resnet32", ()): ("f9d3c71cd431a572", 202),
    ("resnet44", ()): ("b7686f3950c8933d", 274),
    ("resnet56", ()): ("287b77a7f84b70c8", 346),
    ("resnet110", ()): ("c43a04a5444df77d", 670),
}


@pytest.mark.parametrize(("name", "extra"), list(STATE_DICT_DIGESTS))
def test_parameter_names_and_shapes_are_unchanged(name, extra):
    model = create_model(name, **({"in_channels": 1, "num_classes": 10, "input_size": 28} | dict(extra)))
    state = model.state_dict()
    lines = "\n".join(f"{k} {tuple(v.shape)}" for k, v in state.items())
    assert (hashlib.sha256(lines.encode()).hexdigest()[:16], len(state)) == STATE_DICT_DIGESTS[(name, extra)]

