"""A stand-in for OneTrainer's ``scripts/train.py``: its command line, config layering,
backup layout and write order, pruning, ``continue_last_backup`` rule and console lines,
with no model. Copied to ``<tree>/OneTrainer/scripts/train.py`` by the tests, so that the
launch script runs what a user's runs (``python scripts/train.py --config-path ...``).

Every rule cites where OneTrainer (Nerogar/OneTrainer, master 23df3832) has it. Training is
a sleep per step. ``<workspace>/standin-steps.jsonl`` gets one line per trained step,
``{"step": n, "attempt": k}``, so a test can prove no gap and no repeat.

Faults, for tests (each fires once per workspace, a marker file recording that it did, so a
relaunch runs clean): ``STANDIN_HANG_AT_STEP=N`` (before training step N, stop making
progress and stay alive), ``STANDIN_CRASH_AT_STEP=N`` (exit 1 before training step N),
``STANDIN_KILL_MID_SAVE_AT_STEP=N`` (SIGKILL itself in the backup of global step N, after
``STANDIN_KILL_AFTER`` = ``weights`` | ``optimizer`` (default) | ``meta``).
``STANDIN_STEP_SECONDS`` (0.05), ``STANDIN_STEPS_PER_EPOCH`` (5: OneTrainer's comes from
the data set), ``STANDIN_SAVE_FILE_SECONDS`` (0: pause after each backup file).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import struct
import sys
import time
import zipfile
from datetime import datetime
from pathlib import Path

# TrainConfig.default_values, the keys this stand-in uses ("ema": EMAMode, OFF by default).
DEFAULTS = {
    "training_method": "LORA",
    "workspace_dir": "workspace/run",
    "output_model_destination": "models/model.safetensors",
    "continue_last_backup": False,
    "epochs": 100,
    "batch_size": 1,
    "backup_after": 30,
    "backup_after_unit": "MINUTE",
    "rolling_backup": False,
    "rolling_backup_count": 3,
    "backup_before_save": True,
    "ema": "OFF",
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    # modules/util/args/TrainArgs.parse_args: the same options and destinations.
    parser = argparse.ArgumentParser(description="One Trainer Training Script.")
    parser.add_argument("--preset-path", dest="preset_path")
    parser.add_argument("--config-path", dest="config_path", required=True)
    parser.add_argument("--secrets-path", dest="secrets_path")
    parser.add_argument("--config-value", dest="config_values", action="append")
    parser.add_argument("--callback-path", dest="callback_path")
    parser.add_argument("--command-path", dest="command_path")
    return parser.parse_args(argv)


def load_config(args: argparse.Namespace) -> dict:
    # scripts/train.py main: defaults, then the preset, then the config, then each
    # --config-value in order; a bool is true for true/1/yes.
    config = dict(DEFAULTS)
    for path in (args.preset_path, args.config_path):
        if path:
            with open(path) as handle:
                config.update(json.load(handle))
    for config_value in args.config_values or []:
        key, _, value = config_value.partition("=")
        default = DEFAULTS.get(key)
        if isinstance(default, bool):
            config[key] = value.lower() in ("true", "1", "yes")
        elif isinstance(default, int):
            config[key] = int(value)
        else:
            config[key] = value
    return config


def timestamp() -> str:
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")  # time_util.get_string_timestamp


class Progress:
    """modules/util/TrainProgress.py."""

    def __init__(self, epoch=0, epoch_step=0, epoch_sample=0, global_step=0):
        self.epoch, self.epoch_step = epoch, epoch_step
        self.epoch_sample, self.global_step = epoch_sample, global_step

    def next_step(self, batch_size: int) -> None:
        self.epoch_step += 1
        self.epoch_sample += batch_size
        self.global_step += 1

    def next_epoch(self) -> None:
        self.epoch_step = self.epoch_sample = 0
        self.epoch += 1

    def filename_string(self) -> str:
        return f"{self.global_step}-{self.epoch}-{self.epoch_step}"


def last_backup_path(workspace: str) -> str | None:
    # TrainConfig.get_last_backup_path: every directory, names sorted descending, the first;
    # nothing about its contents is checked.
    backups = os.path.join(workspace, "backup")
    if os.path.exists(backups):
        names = sorted(
            (n for n in os.listdir(backups) if os.path.isdir(os.path.join(backups, n))),
            reverse=True,
        )
        if names:
            return os.path.join(backups, names[0])
    return None


def load_backup(path: str, training_method: str) -> Progress | None:
    """InternalModelLoaderMixin._load_internal_data and the LoRA loader's __load_internal."""
    meta_path = os.path.join(path, "meta.json")
    progress = None
    if os.path.exists(meta_path):
        with open(meta_path) as handle:
            meta = json.load(handle)["train_progress"]  # a cut file raises, as upstream
        progress = Progress(
            meta["epoch"], meta["epoch_step"], meta["epoch_sample"], meta["global_step"]
        )
        optimizer = os.path.join(path, "optimizer", "optimizer.pt")
        if os.path.exists(optimizer):  # contextlib.suppress(FileNotFoundError) upstream
            with zipfile.ZipFile(optimizer) as archive:  # torch.load fails on a cut archive
                archive.read("optimizer/data.pkl")
    if training_method == "LORA":
        if progress is None:
            # LoRALoaderMixin._load: not an internal model, and a folder is no .safetensors
            raise RuntimeError(f"could not load LoRA from {path}: not an internal model")
        lora = os.path.join(path, "lora", "lora.safetensors")
        if os.path.exists(lora):  # __load_internal: without it, no weights and no error
            read_safetensors(lora)
    else:
        # A fine tune loads its weights either way: without meta.json the progress is lost
        # without a word and training starts again at step 0.
        read_safetensors(os.path.join(path, "unet", "diffusion_pytorch_model.safetensors"))
    return progress


def write_safetensors(path: str, values: int = 16) -> None:
    data = bytes(4 * values)
    header = json.dumps({"w": {"dtype": "F32", "shape": [values], "data_offsets": [0, len(data)]}})
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header.encode() + data)


def read_safetensors(path: str) -> None:
    with open(path, "rb") as handle:
        raw = handle.read()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    if len(raw) != 8 + length + header["w"]["data_offsets"][1]:
        raise RuntimeError(f"{path}: incomplete safetensors file")


def write_torch_zip(path: str, member: str) -> None:
    with zipfile.ZipFile(path, "w") as archive:  # torch.save writes a zip archive
        archive.writestr(member, b"\x80\x02}q\x00." + bytes(2048))


class Trainer:
    def __init__(self, config: dict, attempt: int):
        self.config = config
        self.attempt = attempt
        self.workspace = config["workspace_dir"]
        self.steps_per_epoch = int(os.environ.get("STANDIN_STEPS_PER_EPOCH", "5"))
        self.step_seconds = float(os.environ.get("STANDIN_STEP_SECONDS", "0.05"))
        self.file_seconds = float(os.environ.get("STANDIN_SAVE_FILE_SECONDS", "0"))
        self.progress = Progress()

    def start(self) -> None:
        # GenericTrainer.start: the config is saved into <workspace>/config first.
        config_dir = os.path.join(self.workspace, "config")
        os.makedirs(config_dir, exist_ok=True)
        with open(os.path.join(config_dir, f"{timestamp()}.json"), "w") as handle:
            json.dump(self.config, handle)
        if self.config["continue_last_backup"]:
            path = last_backup_path(self.workspace)
            if path:
                print(f"Continuing training from backup '{path}'...", flush=True)
                self.progress = load_backup(path, self.config["training_method"]) or Progress()
            else:
                print("No backup found, continuing without backup...", flush=True)

    def needs_backup(self) -> bool:
        # TimedActionMixin.repeating_action_needed("backup", ..., start_at_zero=False), STEP
        # and EPOCH units (timed ones are not simulated).
        every, unit = int(self.config["backup_after"]), self.config["backup_after_unit"]
        if every == 0:
            return False
        if unit == "STEP":
            return (self.progress.global_step + 1) % every == 0
        if unit == "EPOCH":
            p = self.progress
            return p.epoch % every == 0 and p.epoch_step == 0 and p.epoch > 0
        return False

    def train(self) -> None:
        # GenericTrainer.train: the backup is made at the top of the loop, before the batch.
        epochs = int(self.config["epochs"])
        for _ in range(self.progress.epoch, epochs):
            self.bar("epoch", self.progress.epoch, epochs)
            for _ in range(self.progress.epoch_step, self.steps_per_epoch):
                if self.needs_backup():
                    self.backup()
                self.bar("step", self.progress.epoch_step, self.steps_per_epoch)
                step = self.progress.global_step + 1
                self.fault_before(step)
                time.sleep(self.step_seconds)
                self.progress.next_step(int(self.config["batch_size"]))
                with open(os.path.join(self.workspace, "standin-steps.jsonl"), "a") as steps:
                    steps.write(json.dumps({"step": step, "attempt": self.attempt}) + "\n")
                self.bar("step", self.progress.epoch_step, self.steps_per_epoch)
            self.progress.next_epoch()

    def end(self) -> None:
        # GenericTrainer.end: a last backup (backup_before_save), then the final model.
        if self.config["backup_before_save"]:
            self.backup()
        destination = self.config["output_model_destination"]
        print("Saving " + destination, flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(destination)), exist_ok=True)
        write_safetensors(destination)

    def backup(self) -> None:
        # GenericTrainer.__backup: <workspace>/backup/<timestamp>-backup-<progress>.
        name = f"{timestamp()}-backup-{self.progress.filename_string()}"
        path = os.path.join(self.workspace, "backup", name)
        print("Creating Backup " + path, flush=True)
        kill_at = self.fault_step("STANDIN_KILL_MID_SAVE_AT_STEP", "kill-mid-save")
        kill_after = os.environ.get("STANDIN_KILL_AFTER", "optimizer")
        killing = kill_at == self.progress.global_step
        # Weights first (LoRASaverMixin._save_internal / the fine tune's diffusers folders).
        lora = self.config["training_method"] == "LORA"
        weights = os.path.join(path, "lora" if lora else "unet")
        os.makedirs(weights, exist_ok=True)
        write_safetensors(
            os.path.join(
                weights, "lora.safetensors" if lora else "diffusion_pytorch_model.safetensors"
            )
        )
        self.written(killing and kill_after == "weights")
        # InternalModelSaverMixin._save_internal_data: optimizer, ema, then meta.json.
        os.makedirs(os.path.join(path, "optimizer"), exist_ok=True)
        write_torch_zip(os.path.join(path, "optimizer", "optimizer.pt"), "optimizer/data.pkl")
        self.written(killing and kill_after == "optimizer")
        if self.config["ema"] != "OFF":
            os.makedirs(os.path.join(path, "ema"), exist_ok=True)
            write_torch_zip(os.path.join(path, "ema", "ema.pt"), "ema/data.pkl")
            self.written(False)
        p = self.progress
        meta = {"epoch": p.epoch, "epoch_step": p.epoch_step, "epoch_sample": p.epoch_sample}
        with open(os.path.join(path, "meta.json"), "w") as handle:
            json.dump({"train_progress": {**meta, "global_step": p.global_step}}, handle)
        self.written(killing and kill_after == "meta")
        # GenericTrainer.__save_backup_config: onetrainer_config/args.json last.
        os.makedirs(os.path.join(path, "onetrainer_config"), exist_ok=True)
        with open(os.path.join(path, "onetrainer_config", "args.json"), "w") as handle:
            json.dump(self.config, handle)
        # finally: __prune_backups(rolling_backup_count) when rolling_backup is on.
        if self.config["rolling_backup"]:
            self.prune(int(self.config["rolling_backup_count"]))

    def written(self, kill: bool) -> None:
        if kill:
            self.mark("kill-mid-save")
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(self.file_seconds)

    def prune(self, keep: int) -> None:
        # GenericTrainer.__prune_backups: every directory past the `keep` greatest names.
        backups = os.path.join(self.workspace, "backup")
        names = sorted(
            (n for n in os.listdir(backups) if os.path.isdir(os.path.join(backups, n))),
            reverse=True,
        )
        for name in names[keep:]:
            shutil.rmtree(os.path.join(backups, name), ignore_errors=True)

    def bar(self, description: str, n: int, total: int) -> None:
        # tqdm's default format, as GenericTrainer.train's "epoch" and "step" bars draw it.
        percent = 100 * n // total if total else 0
        filled = "#" * (10 * n // total if total else 0)
        sys.stderr.write(
            f"\r{description}: {percent:3d}%|{filled:<10}| {n}/{total} "
            f"[00:00<00:00, {1 / max(self.step_seconds, 1e-3):.2f}it/s, loss=0.1]"
        )
        sys.stderr.flush()

    def fault_step(self, variable: str, marker: str) -> int | None:
        value = os.environ.get(variable)
        if not value or os.path.exists(self.marker_path(marker)):
            return None
        return int(value)

    def fault_before(self, step: int) -> None:
        if self.fault_step("STANDIN_CRASH_AT_STEP", "crash") == step:
            self.mark("crash")
            print(f"RuntimeError: stand-in crash before step {step}", flush=True)
            sys.exit(1)
        if self.fault_step("STANDIN_HANG_AT_STEP", "hang") == step:
            self.mark("hang")
            while True:  # no progress, process alive (a hung collective, a stuck loader)
                time.sleep(3600)

    def marker_path(self, marker: str) -> str:
        return os.path.join(self.workspace, f".standin-fired-{marker}")

    def mark(self, marker: str) -> None:
        Path(self.marker_path(marker)).touch()


def next_attempt(workspace: str) -> int:
    path = Path(workspace) / ".standin-attempts"
    attempt = (len(path.read_text().splitlines()) if path.exists() else 0) + 1
    with open(path, "a") as handle:
        handle.write(f"{attempt}\n")
    return attempt


def main(argv: list[str]) -> int:
    config = load_config(parse_args(argv))
    os.makedirs(config["workspace_dir"], exist_ok=True)
    trainer = Trainer(config, next_attempt(config["workspace_dir"]))
    trainer.start()
    trainer.train()
    trainer.end()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
