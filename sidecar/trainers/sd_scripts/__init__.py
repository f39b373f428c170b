"""kohya-ss sd-scripts, as FluxGym launches it: train.sh dialect and rewriting, state folder
names, progress lines. :data:`SD_SCRIPTS` is all of it as one
:class:`~sidecar.trainers.base.Trainer`.
"""

from __future__ import annotations

from pathlib import Path

from sidecar.observe.progress import TqdmBar
from sidecar.trainers.sd_scripts import launch_script, progress_lines, train_script
from sidecar.trainers.sd_scripts import state_naming as naming

__all__ = ["SD_SCRIPTS", "SdScripts"]


class SdScripts:
    """sd-scripts behind the :class:`~sidecar.trainers.base.Trainer` seam (no state of its own)."""

    name = "sd-scripts"

    def state_naming(self, output_name: str | None) -> naming.SdScriptsStateNaming:
        return naming.state_naming(output_name)

    def step_bar(self, text: str) -> TqdmBar | None:
        return progress_lines.step_bar(text)

    def read_launch_script(self, text: str) -> train_script.TrainCommand:
        return train_script.parse_train_script(text)

    def rewritten_launch_script(
        self, text: str, *, resume_from: str | None, ensure_save_state: bool
    ) -> str:
        return launch_script.rewritten_train_script(
            text, resume_from=resume_from, ensure_save_state=ensure_save_state
        )

    def rewrite_launch_script(
        self, script: Path, *, resume_from: str | None, ensure_save_state: bool
    ) -> tuple[bool, str, str]:
        return launch_script.rewrite_train_script(
            script, resume_from=resume_from, ensure_save_state=ensure_save_state
        )

    def add_save_state(self, script: Path) -> tuple[bool, str, str]:
        return launch_script.add_save_state(script)

    def launch_script_diff(
        self, old: str, new: str, script: Path, *, context: int = 0
    ) -> list[str]:
        return launch_script.script_diff(old, new, script, context=context)


SD_SCRIPTS = SdScripts()
