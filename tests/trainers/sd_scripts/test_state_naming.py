"""sd-scripts' state folder names (sidecar.trainers.sd_scripts.state_naming)."""

from __future__ import annotations

import pytest

from sidecar.trainers.sd_scripts.state_naming import FINAL_STATE_PROBLEM, state_naming


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("my-lora-step00000100-state", ("step", 100)),
        ("my-lora-step123456789-state", ("step", 123456789)),  # %08d is a minimum width
        ("my-lora-000004-state", ("epoch", 4)),
        ("my-lora-state", ("final", None)),
        ("other-state", ("final", None)),  # another run's end-of-training state
        ("other-step00000100-state", None),
        # Too few digits for a step: the end-of-training state of a run named "my-lora-step100".
        ("my-lora-step100-state", ("final", None)),
        ("sample", None),
    ],
)
def test_names_of_one_output_name(name: str, expected: object) -> None:
    assert state_naming("my-lora").classify(name) == expected


def test_without_an_output_name_any_prefix_counts() -> None:
    naming = state_naming(None)
    assert naming.classify("x-000004-state") == ("epoch", 4)
    assert naming.classify("x-step00000002-state") == ("step", 2)
    assert naming.classify("before-upgrade") is None


def test_only_the_final_state_is_refused() -> None:
    naming = state_naming("my-lora")
    assert naming.refusal("final") == FINAL_STATE_PROBLEM
    assert [naming.refusal(kind) for kind in ("step", "epoch", "accelerate")] == [None] * 3


def test_fluxgyms_sample_folder_is_never_state() -> None:
    assert state_naming("my-lora").ignored_folders == frozenset({"sample"})
