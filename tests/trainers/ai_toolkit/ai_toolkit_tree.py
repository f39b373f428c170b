"""An ai-toolkit checkout and job on disk, as the stand-in and the sidecar see them (the
ai-toolkit tests' shared helpers)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

STANDIN = Path(__file__).resolve().parent / "standin.py"


def load_standin() -> ModuleType:
    """The stand-in as a module (its writers make real save files), under a name of its own:
    other trainers' tests have a ``standin.py`` too."""
    spec = importlib.util.spec_from_file_location("ai_toolkit_standin", STANDIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class ToolkitTree:
    """``<root>/ai-toolkit/run.py`` (running the stand-in), a job config in its config folder,
    the launch script beside it and the training folder ``<root>/output``."""

    root: Path
    toolkit: Path
    config: Path
    train_script: Path
    training_folder: Path
    name: str

    @property
    def save_root(self) -> Path:
        return self.training_folder / self.name

    def steps(self) -> list[dict[str, int]]:
        lines = (self.save_root / "standin-steps.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**os.environ, "STANDIN_STEP_SECONDS": "0.01", **(extra or {})}


def build_toolkit_tree(
    root: Path,
    *,
    name: str = "my-lora",
    steps: int = 30,
    save_every: int = 5,
    keep: int = 3,
    config_format: str = "yaml",
) -> ToolkitTree:
    toolkit = root / "ai-toolkit"
    (toolkit / "config").mkdir(parents=True, exist_ok=True)
    training_folder = root / "output"
    # The save root exists before the first start, as ai-toolkit's UI makes it (startJob.ts):
    # the sidecar takes the output folder from the command only once it exists.
    (training_folder / name).mkdir(parents=True, exist_ok=True)
    (toolkit / "run.py").write_text(
        f"import runpy\nrunpy.run_path({str(STANDIN)!r}, run_name='__main__')\n"
    )
    document = {
        "job": "extension",
        "config": {
            "name": name,
            "process": [
                {
                    "type": "sd_trainer",
                    "training_folder": str(training_folder),
                    "save": {"save_every": save_every, "max_step_saves_to_keep": keep},
                    "train": {"steps": steps},
                }
            ],
        },
    }
    config = toolkit / "config" / f"{name}.{config_format}"
    if config_format == "json":
        config.write_text(json.dumps(document, indent=2))
    else:
        import yaml

        config.write_text(yaml.safe_dump(document))
    script = toolkit / "train.sh"
    script.write_text(f"cd {toolkit}\nexec {sys.executable} run.py config/{config.name}\n")
    return ToolkitTree(root, toolkit, config, script, training_folder, name)
