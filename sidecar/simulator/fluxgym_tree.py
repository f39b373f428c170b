"""Builds a FluxGym-shaped folder whose train.sh drives the simulated trainer.

The layout matches what the sidecar meets in a real FluxGym install (REFERENCE section 1):
``app.py`` marks the root, ``sd-scripts/flux_train_network.py`` is the script train.sh names
relative to the root, and ``outputs/<name>/`` holds train.sh, dataset.toml and
sample_prompts.txt. train.sh is one of FluxGym's own generated scripts (shipped as package
data in ``scripts/``) with ``/app/fluxgym`` replaced by the new root, so every quirk of the real
file - the glued ``\\--sample_prompts=...`` line, the dangling final backslash - is kept.
``bin/accelerate`` stands in for the accelerate CLI; put ``bin`` first on PATH (see
:meth:`FluxgymTree.env`) and ``bash outputs/<name>/train.sh`` from the root runs the simulator.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import sidecar
from sidecar.atomic_files import replace_atomically

FLUXGYM_ROOT_IN_SCRIPTS = "/app/fluxgym"
NAME_IN_SCRIPTS = "my-lora"
FIXTURE_SCRIPTS = (
    "fluxgym-20g-default.sh",
    "fluxgym-20g-nosample.sh",
    "fluxgym-12g-save-state-steps.sh",
)
# FluxGym slugifies the LoRA name; anything else would break the unquoted --output_name.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

# Files the scripts reference; only their existence matters to the simulator.
_MODEL_FILES = (
    "models/unet/flux1-dev.sft",
    "models/clip/clip_l.safetensors",
    "models/clip/t5xxl_fp16.safetensors",
    "models/vae/ae.sft",
)


@dataclass(frozen=True)
class FluxgymTree:
    """Paths of a built tree; ``env`` gives the environment to run its train.sh in."""

    root: Path
    name: str
    bin_dir: Path
    output_dir: Path
    train_script: Path

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A copy of os.environ with ``bin_dir`` first on PATH, updated with ``extra``."""
        environment = dict(os.environ)
        environment["PATH"] = os.pathsep.join(
            part for part in (str(self.bin_dir), environment.get("PATH", "")) if part
        )
        environment.update(extra or {})
        return environment

    @property
    def command(self) -> list[str]:
        """How FluxGym starts training: bash with the absolute script path, cwd = ``root``."""
        return ["bash", str(self.train_script)]


def fixture_script(fixture: str) -> str:
    """The text of one of FluxGym's generated train.sh files shipped with this package."""
    if fixture not in FIXTURE_SCRIPTS:
        raise ValueError(
            f"unknown fixture {fixture!r}; expected one of {', '.join(FIXTURE_SCRIPTS)}"
        )
    script = resources.files("sidecar.simulator").joinpath("scripts", fixture)
    return script.read_text(encoding="utf-8")


def append_advanced_options(script: str, extra_trainer_args: str) -> str:
    """Append flags the way FluxGym adds its advanced options: one ``  --flag value`` line each.

    The base script ends with a dangling `` \\``; each option goes on a new line, and the last
    line has no backslash, exactly like FluxGym's generated files.
    """
    lines = _option_lines(shlex.split(extra_trainer_args))
    if not lines:
        return script
    joined = " \\\n".join(f"  {line}" for line in lines)
    separator = "\n" if script.rstrip(" ").endswith("\\") else " \\\n"
    return script + separator + joined


def _option_lines(tokens: list[str]) -> list[str]:
    lines: list[list[str]] = []
    for token in tokens:
        if token.startswith("--") or not lines:
            lines.append([token])
        else:
            lines[-1].append(token)
    return [" ".join(shlex.quote(token) for token in line) for line in lines]


def render_train_script(root: Path, name: str, template: str, extra_trainer_args: str = "") -> str:
    """Point a FluxGym script at ``root`` and ``name``, then append advanced options."""
    # The name first: the root path could itself contain "my-lora".
    text = template.replace(NAME_IN_SCRIPTS, name).replace(FLUXGYM_ROOT_IN_SCRIPTS, str(root))
    return append_advanced_options(text, extra_trainer_args)


def build_fluxgym_tree(
    root: Path,
    *,
    name: str = "my-lora",
    fixture: str = "fluxgym-20g-default.sh",
    extra_trainer_args: str = "",
    script_text: str | None = None,
) -> FluxgymTree:
    """Create (or refresh) a FluxGym tree at ``root`` and return its paths.

    ``script_text`` replaces the fixture as the template; ``/app/fluxgym`` and ``my-lora`` in
    it are substituted all the same. Calling this again on the same root rewrites train.sh and
    the helper files but leaves training outputs alone, so a test can change the script (say,
    add ``--resume``) between runs.
    """
    if not _NAME_PATTERN.fullmatch(name):
        raise ValueError(f"name {name!r} must be a FluxGym-style slug (letters, digits, . _ -)")
    root = Path(root).resolve()
    template = fixture_script(fixture) if script_text is None else script_text
    output_dir = root / "outputs" / name
    bin_dir = root / "bin"
    for folder in (output_dir, bin_dir, root / "sd-scripts", root / "datasets" / name):
        folder.mkdir(parents=True, exist_ok=True)
    (root / "app.py").touch()
    for relative in _MODEL_FILES:
        model = root / relative
        model.parent.mkdir(parents=True, exist_ok=True)
        model.touch()
    _write_launchers(root, bin_dir)
    _write_dataset(root, output_dir, name)
    train_script = output_dir / "train.sh"
    # A bash still reading the old script keeps its inode; see REFERENCE section 4.
    replace_atomically(train_script, render_train_script(root, name, template, extra_trainer_args))
    return FluxgymTree(root, name, bin_dir, output_dir, train_script)


def _write_launchers(root: Path, bin_dir: Path) -> None:
    # The generated files import the simulator from the checkout that built the tree, so a
    # test's tree never picks up some other installed copy (or none at all).
    package_parent = Path(sidecar.__file__).resolve().parent.parent
    path_line = f"import sys; sys.path.insert(0, {str(package_parent)!r})"
    (root / "sd-scripts" / "flux_train_network.py").write_text(
        f"{path_line}\nfrom sidecar.simulator.trainer import main\nraise SystemExit(main())\n"
    )
    accelerate = bin_dir / "accelerate"
    accelerate.write_text(
        f"#!{sys.executable}\n"
        f"{path_line}\n"
        "from sidecar.simulator.accelerate_shim import main\n"
        "raise SystemExit(main())\n"
    )
    accelerate.chmod(0o755)


def _write_dataset(root: Path, output_dir: Path, name: str) -> None:
    dataset_dir = root / "datasets" / name
    (dataset_dir / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (dataset_dir / "1.txt").write_text(f"{name}, a photo\n")
    (output_dir / "dataset.toml").write_text(
        "[general]\n"
        "shuffle_caption = false\n"
        "caption_extension = '.txt'\n"
        "keep_tokens = 1\n"
        "\n"
        "[[datasets]]\n"
        "resolution = 512\n"
        "batch_size = 1\n"
        "keep_tokens = 1\n"
        "\n"
        "  [[datasets.subsets]]\n"
        f"  image_dir = '{dataset_dir}'\n"
        f"  class_tokens = '{name}'\n"
        "  num_repeats = 10\n"
    )
    (output_dir / "sample_prompts.txt").write_text(f"{name}, a portrait photo\n")
