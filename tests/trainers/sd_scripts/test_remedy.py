"""A repeated hang's remedy applied to FluxGym's own train.sh, and what bash then passes."""

from __future__ import annotations

from pathlib import Path

import pytest
from bash_argv import argv_bash_passes

import sidecar.simulator
from sidecar.trainers.sd_scripts import SD_SCRIPTS, launch_script
from sidecar.trainers.shell.train_script import parse_train_script

FIXTURES = Path(sidecar.simulator.__file__).parent / "scripts"
DEFAULT = (FIXTURES / "fluxgym-20g-default.sh").read_text()


def test_a_dataloader_wait_loads_in_the_main_process(tmp_path):
    (tmp_path / "bash").mkdir()
    """FluxGym's --persistent_data_loader_workers --max_data_loader_n_workers 2 (sd-scripts
    1586) become --max_data_loader_n_workers 0, and bash passes exactly that."""
    script = tmp_path / "train.sh"
    script.write_text(DEFAULT)
    changed, old, new = launch_script.remedy(script, "dataloader_wait")
    assert changed and old == DEFAULT and script.read_text() == new
    assert (tmp_path / "train.sh.orig").read_text() == DEFAULT, "the original is kept"
    command = parse_train_script(new)
    assert command.option("--max_data_loader_n_workers") == "0"
    assert not command.has_option("--persistent_data_loader_workers")
    argv = argv_bash_passes(new, tmp_path / "bash")
    assert "--persistent_data_loader_workers" not in argv
    index = argv.index("--max_data_loader_n_workers")
    assert argv[index + 1] == "0"
    # Applied once: the same remedy again changes nothing.
    assert launch_script.remedy(script, "dataloader_wait")[0] is False


@pytest.mark.parametrize(("blocks", "fewer"), [("18", "9"), ("3", "1"), ("1", "1")])
def test_block_swapping_halves_the_blocks_down_to_one(blocks, fewer):
    text = DEFAULT.replace("--sdpa", f"--sdpa --blocks_to_swap {blocks}")
    remedied = launch_script.with_remedy(text, "cuda_sync")
    assert parse_train_script(remedied).option("--blocks_to_swap") == fewer
    assert (remedied == text) is (blocks == "1"), "one block left: nothing changes"


def test_classes_without_a_script_remedy_change_nothing():
    for hang in ("cuda_sync", "collective_wait", "hang_in_save", "unknown", "nonsense"):
        assert launch_script.with_remedy(DEFAULT, hang) == DEFAULT


def test_a_remedy_is_the_same_run():
    """The run boundary must not take the remedied script for a user's new run."""
    remedied = launch_script.with_remedy(DEFAULT, "dataloader_wait")
    assert SD_SCRIPTS.run_identity(remedied) == SD_SCRIPTS.run_identity(DEFAULT)
    other = DEFAULT.replace("--learning_rate 8e-4", "--learning_rate 1e-4")
    assert other != DEFAULT
    assert SD_SCRIPTS.run_identity(other) != SD_SCRIPTS.run_identity(DEFAULT)
