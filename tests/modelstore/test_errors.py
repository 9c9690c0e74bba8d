"""Store errors as values: the model they concern (its canonical AIR) and that model's source, never changed once
raised; a malformed identifier is kept as given and names no source."""

from __future__ import annotations

import pytest

from modelstore import parse_air
from modelstore.errors import InvalidModelId, ModelNotFound, concerning


@pytest.mark.parametrize(
    ("given", "air", "source"),
    [
        ("civitai:101055@128080", "civitai:101055@128080", "civitai"),
        ("urn:air:sdxl:checkpoint:civitai:101055@128080", "civitai:101055@128080", "civitai"),
        ("hf:owner/repo.name", "huggingface:owner/repo.name", "huggingface"),
        ("builtin:tiny-sdxl-base@1", "builtin:tiny-sdxl-base@1", "builtin"),
        ("/srv/models/base.safetensors", "local:/srv/models/base.safetensors", "local"),
    ],
)
def test_an_error_names_its_model_and_the_models_source(given: str, air: str, source: str) -> None:
    with pytest.raises(ModelNotFound) as caught, concerning(parse_air(given).canonical):
        raise ModelNotFound("no such version")
    assert (caught.value.air, caught.value.source, caught.value.message) == (air, source, "no such version")


def test_attaching_a_model_makes_a_new_error_and_leaves_the_shared_one_alone() -> None:
    shared = ModelNotFound("gone")  # e.g. one download's error, raised to every waiter
    mine = shared.about("civitai:1@2")
    assert (mine.air, mine.source) == ("civitai:1@2", "civitai")
    assert (shared.air, shared.source) == (None, None) and type(mine) is ModelNotFound


@pytest.mark.parametrize("given", ["civitai:abc", "hf:", "civitai:1@2+x+y"])
def test_a_malformed_identifier_is_kept_as_given_and_names_no_source(given: str) -> None:
    with pytest.raises(InvalidModelId) as caught:
        parse_air(given)
    assert (caught.value.air, caught.value.source) == (given, None)
