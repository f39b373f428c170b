"""A stand-in for ai-toolkit's ``run.py`` training one LoRA job, on disk as ai-toolkit does.

Run as ``python run.py <job config> [-n NAME] [-r] [-l LOG]`` (a ``run.py`` shim runs this
file). Every rule below is ostris/ai-toolkit at 27a03a9; ``BaseSDTrainProcess`` is
``jobs/process/BaseSDTrainProcess.py``:

- config lookup, ``${VAR}`` and ``[name]``: ``toolkit/config.py`` ``get_config`` and
  ``preprocess_config``; save root ``<training_folder>/<process name>``:
  ``jobs/process/BaseTrainProcess.py`` ``__init__``, which also writes ``config.yaml`` there
  (``save_training_config``) on every start;
- resume: ``BaseSDTrainProcess.get_latest_save_path`` (globs ``<name>*.safetensors``,
  ``<name>*.pt``, ``<name>*``, the ``_LoRA/_refiner/_t2i/_cn`` filters on the whole path,
  ``max(paths, key=os.path.getctime)``), the weights loaded with no check (a broken file
  raises, and ``run.py`` ``main`` prints ``Error running job`` and exits 1), the step from the
  safetensors ``training_info`` metadata (``load_training_state_from_metadata``) unless
  ``train.start_step`` is set;
- ``optimizer.pt``: loaded when present, a failure caught and printed (``run``);
- the loop: ``for step in range(start_step, steps)``, a save after training step ``step``
  when ``step != start_step and step % save_every == 0`` with the save named and stamped
  ``step`` (so a resume trains that step once more), the tqdm bar described by the JOB name
  starting at the resumed step (``ToolkitProgressBar``), the final ``save()`` without a step;
- ``save``: ``<name>_<step:09d>.safetensors`` written in place, ``Saved checkpoint to``,
  then ONE ``optimizer.pt`` overwritten (``torch.save``: a zip archive), ``Saved optimizer
  to``, then ``clean_up_saves`` (``<name>_*`` ``.safetensors`` sorted by ctime, all but the
  newest ``max_step_saves_to_keep`` removed, ``Removing old save: <path>``).

Faults for tests (each once per output folder, remembered in a hidden marker file):
``STANDIN_HANG_AT_STEP=N`` (before training step N, 1-based: stop, stay alive),
``STANDIN_CRASH_AT_STEP=N`` (before step N: exit 1), ``STANDIN_KILL_MID_SAVE_AT_STEP=N``
(SIGKILL itself half-way through writing the save named step N),
``STANDIN_KILL_MID_OPTIMIZER_AT_STEP=N`` (the same inside that save's optimizer.pt);
``STANDIN_STEP_SECONDS`` (0.05), ``STANDIN_SAVE_BYTES`` (65536: the weights' size).
``<save root>/standin-steps.jsonl`` gets ``{"step": n, "attempt": k}`` per trained step.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import pickle
import re
import signal
import struct
import sys
import time
import zipfile
from typing import Any

from tqdm import tqdm

TOOLKIT_ROOT = os.path.dirname(os.path.abspath(sys.argv[0]))  # where run.py is
SUFFIXES = (".json", ".jsonc", ".yaml", ".yml")


def find_config(argument: str) -> str:
    config_path = os.path.join(TOOLKIT_ROOT, "config", argument)
    if not os.path.exists(config_path):
        for suffix in SUFFIXES:
            if os.path.exists(config_path + suffix):
                return config_path + suffix
    if os.path.exists(argument):
        return argument
    raise ValueError(f"Could not find config file {argument}")


def load_config(argument: str, name: str | None) -> dict[str, Any]:
    path = find_config(argument)
    with open(path, encoding="utf-8") as handle:
        text = handle.read()

    def replace(match: re.Match[str]) -> str:
        value = os.environ.get(match[1])
        if value is None:
            raise ValueError(f"Environment variable {match[1]} not set.")
        return value

    text = re.sub(r"\$\{([^}]+)\}", replace, text)
    if path.endswith((".json", ".jsonc")):
        config = json.loads(text)
    else:
        import yaml

        config = yaml.safe_load(text)
    name = name if name is not None else config["config"]["name"]
    return json.loads(json.dumps(config).replace("[name]", name))


# ------------------------------------------------------------------ files, as ai-toolkit writes


def write_safetensors(path: str, metadata: dict[str, str], size: int, kill_half_way: bool) -> None:
    count = size // 4
    header = {
        "lora_weight": {"dtype": "F32", "shape": [count], "data_offsets": [0, count * 4]},
        "__metadata__": metadata,
    }
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", len(raw)) + raw + bytes(count * 4)
    write_in_place(path, data, kill_half_way)


def write_in_place(path: str, data: bytes, kill_half_way: bool) -> None:
    with open(path, "wb") as handle:  # truncates: nothing is atomic in ai-toolkit's saves
        if kill_half_way:
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.fsync(handle.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        handle.write(data)


def read_safetensors_metadata(path: str) -> dict[str, str]:
    """What safe_open would read, and its refusal of a cut file."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(length))
    end = max(
        (entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"),
        default=0,
    )
    if 8 + length + end != size:
        raise ValueError(f"Error while deserializing header: incomplete file {path}")
    return header.get("__metadata__", {})


def optimizer_bytes(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:  # torch.save's container
        archive.writestr("optimizer/data.pkl", pickle.dumps(state))
    return buffer.getvalue()


def load_optimizer(path: str) -> dict[str, Any]:
    with zipfile.ZipFile(path) as archive:
        state: dict[str, Any] = pickle.loads(archive.read("optimizer/data.pkl"))
    return state


# ------------------------------------------------------------------ the process


class Job:
    def __init__(self, config: dict[str, Any]) -> None:
        self.job_name = config["config"]["name"]
        process = config["config"]["process"][0]
        self.name = process.get("name", self.job_name)
        folder = process.get("training_folder", config["config"].get("training_folder"))
        self.save_root = os.path.join(folder, self.name)
        save, train = process.get("save", {}), process.get("train", {})
        self.save_every = save.get("save_every", 1000)
        self.keep = save.get("max_step_saves_to_keep", 5)
        self.steps = train.get("steps", 1000)
        self.start_step = train.get("start_step")
        self.step_seconds = float(os.environ.get("STANDIN_STEP_SECONDS", "0.05"))
        self.save_bytes = int(os.environ.get("STANDIN_SAVE_BYTES", "65536"))
        self.step_num = 0
        self.optimizer: dict[str, Any] = {"state": {"step": 0}}
        os.makedirs(self.save_root, exist_ok=True)
        with open(os.path.join(self.save_root, "config.yaml"), "w") as handle:
            json.dump(config, handle)  # save_training_config (yaml.dump upstream)
        self.attempt = self._next_attempt()

    def _next_attempt(self) -> int:
        marker = os.path.join(self.save_root, ".standin-attempts")
        attempt = 1
        if os.path.exists(marker):
            with open(marker) as handle:
                attempt += int(handle.read())
        with open(marker, "w") as handle:
            handle.write(str(attempt))
        return attempt

    def fault(self, kind: str, step: int) -> bool:
        """Whether fault ``kind`` fires at ``step`` now (once per output folder)."""
        wanted = os.environ.get(f"STANDIN_{kind}_AT_STEP")
        marker = os.path.join(self.save_root, f".standin-{kind.lower()}-done")
        if wanted is None or int(wanted) != step or os.path.exists(marker):
            return False
        open(marker, "w").close()
        return True

    def latest_save_path(self) -> str | None:
        patterns = [f"{self.name}*.safetensors", f"{self.name}*.pt", f"{self.name}*"]
        paths: list[str] = []
        for pattern in patterns:
            paths.extend(glob.glob(os.path.join(self.save_root, pattern)))
        paths = [path for path in paths if os.path.exists(path)]
        for mark in ("_LoRA", "_refiner", "_t2i", "_cn"):
            if mark not in self.name:
                paths = [path for path in paths if mark not in path]
        return max(paths, key=os.path.getctime) if paths else None

    def load(self) -> None:
        latest = self.latest_save_path()
        if latest is not None:
            print(f"#### IMPORTANT RESUMING FROM {latest} ####", flush=True)
            print(f"Loading from {latest}", flush=True)
            meta = read_safetensors_metadata(latest)  # network.load_weights: raises when cut
            info = json.loads(meta.get("training_info", "{}"))
            if "step" in info and self.start_step is None:
                self.step_num = info["step"]
                print(f"Found step {self.step_num} in metadata, starting from there", flush=True)
        if self.start_step is not None:
            self.step_num = self.start_step
        optimizer_path = os.path.join(self.save_root, "optimizer.pt")
        if os.path.exists(optimizer_path):
            try:
                print(f"Loading optimizer state from {optimizer_path}", flush=True)
                self.optimizer = load_optimizer(optimizer_path)
            except Exception as error:  # ai-toolkit's run() catches everything here
                print(f"Failed to load optimizer state from {optimizer_path}", flush=True)
                print(error, flush=True)
            print("Updating optimizer LR from params", flush=True)

    def save(self, step: int | None = None) -> None:
        suffix = f"_{str(step).zfill(9)}" if step is not None else ""
        file_path = os.path.join(self.save_root, f"{self.name}{suffix}.safetensors")
        info = json.dumps({"step": self.step_num, "epoch": 0})
        metadata = {"training_info": info, "ss_output_name": self.job_name}
        kill = step is not None and self.fault("KILL_MID_SAVE", step)
        write_safetensors(file_path, metadata, self.save_bytes, kill)
        print(f"Saved checkpoint to {file_path}", flush=True)
        optimizer_path = os.path.join(self.save_root, "optimizer.pt")
        kill = step is not None and self.fault("KILL_MID_OPTIMIZER", step)
        write_in_place(optimizer_path, optimizer_bytes(self.optimizer), kill)
        print(f"Saved optimizer to {optimizer_path}", flush=True)
        self.clean_up_saves()

    def clean_up_saves(self) -> None:
        items = glob.glob(os.path.join(self.save_root, f"{self.name}_*"))
        saves = sorted(
            (item for item in items if item.endswith(".safetensors")), key=os.path.getctime
        )
        for item in saves[: -self.keep]:  # [:-0] is empty: 0 keeps every save, as upstream
            print(f"Removing old save: {item}", flush=True)
            os.remove(item)

    def train(self) -> None:
        steps_file = os.path.join(self.save_root, "standin-steps.jsonl")
        start = self.step_num
        bar = tqdm(total=self.steps, desc=self.job_name, leave=True, initial=self.step_num)
        for step in range(start, self.steps):
            self.step_num = step
            if self.fault("HANG", step + 1):
                while True:  # a hung collective: alive, no progress
                    time.sleep(1)
            if self.fault("CRASH", step + 1):
                raise RuntimeError(f"stand-in crash before step {step + 1}")
            time.sleep(self.step_seconds)
            self.optimizer["state"]["step"] += 1
            with open(steps_file, "a") as handle:
                handle.write(json.dumps({"step": step + 1, "attempt": self.attempt}) + "\n")
            if step != start and self.save_every and step % self.save_every == 0:
                print(f"\nSaving at step {step}", flush=True)
                self.save(step)
            bar.update(step + 1 - bar.n)
            self.step_num = step + 1
        bar.close()
        self.save()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config_file_list", nargs="+")
    parser.add_argument("-r", "--recover", action="store_true")
    parser.add_argument("-n", "--name", default=None)
    parser.add_argument("-l", "--log", default=None)
    args = parser.parse_args()
    print(f"Running {len(args.config_file_list)} job(s)", flush=True)
    for config_file in args.config_file_list:
        try:
            job = Job(load_config(config_file, args.name))
            print(f"# Running job: {job.job_name}", flush=True)
            job.load()
            job.train()
        except Exception as error:
            print(f"Error running job: {error}", flush=True)
            if not args.recover:
                raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
