"""Translating paths between the sidecar's and the trainer's view of a shared volume."""

from __future__ import annotations

import pytest

from sidecar.run.path_map import PathMap, PathMapError


def test_round_trip_through_the_longest_prefix():
    """The most specific pair wins in both directions."""
    mapping = PathMap.parse("/outputs:/app/fluxgym/outputs,/outputs/special:/data/special")
    assert mapping.to_sidecar("/app/fluxgym/outputs/my-lora/x") == "/outputs/my-lora/x"
    assert mapping.to_sidecar("/data/special/a") == "/outputs/special/a"
    assert mapping.to_trainer("/outputs/special/a") == "/data/special/a"
    assert mapping.to_trainer("/outputs/my-lora") == "/app/fluxgym/outputs/my-lora"


def test_prefixes_match_whole_components():
    """/outputs-old is not under /outputs."""
    mapping = PathMap.parse("/outputs:/app/out")
    assert mapping.to_trainer("/outputs-old/x") == "/outputs-old/x"


def test_unmapped_paths_pass_through():
    """With no map, paths are the same on both sides."""
    assert PathMap.parse("").to_sidecar("/a/b c") == "/a/b c"


@pytest.mark.parametrize("text", ["/a", "a:/b", "/a:b", "/a:/b:/c"])
def test_malformed_maps_are_refused(text):
    """Each pair needs two absolute prefixes separated by one colon."""
    with pytest.raises(PathMapError):
        PathMap.parse(text)
