"""Translation between the sidecar's view of the shared volume and the trainer's.

In Docker or Kubernetes the sidecar often mounts the outputs volume at another
path than the trainer (``/outputs`` here, ``/app/fluxgym/outputs`` there). Paths
read from train.sh are the trainer's view and must be mapped before the sidecar
opens them; paths written into train.sh must be mapped back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath


class PathMapError(ValueError):
    """A SIDECAR_PATH_MAP value is malformed."""


@dataclass(frozen=True)
class PathMap:
    """Ordered ``(sidecar_prefix, trainer_prefix)`` pairs; the longest matching prefix wins."""

    pairs: tuple[tuple[PurePosixPath, PurePosixPath], ...] = ()

    @classmethod
    def parse(cls, text: str) -> PathMap:
        """Parse ``sidecar_prefix:trainer_prefix[,...]``; both sides must be absolute."""
        pairs = []
        for item in filter(None, (part.strip() for part in text.split(","))):
            sidecar_side, separator, trainer_side = item.partition(":")
            if not separator or ":" in trainer_side:
                raise PathMapError(
                    f"{item!r} is not 'sidecar_prefix:trainer_prefix' "
                    "(expected e.g. /outputs:/app/fluxgym/outputs)"
                )
            sidecar_path, trainer_path = PurePosixPath(sidecar_side), PurePosixPath(trainer_side)
            if not (sidecar_path.is_absolute() and trainer_path.is_absolute()):
                raise PathMapError(f"{item!r}: both prefixes must be absolute paths")
            if ".." in sidecar_path.parts or ".." in trainer_path.parts:
                # A mapping through .. could point writes (train.sh, the ledger) anywhere.
                raise PathMapError(f"{item!r}: prefixes must not contain '..'")
            pairs.append((sidecar_path, trainer_path))
        return cls(tuple(pairs))

    def to_sidecar(self, trainer_path: str) -> str:
        """Map a path as the trainer sees it to the path the sidecar can open."""
        return self._translate(trainer_path, from_trainer=True)

    def to_trainer(self, sidecar_path: str) -> str:
        """Map a path the sidecar sees to the path to write into train.sh."""
        return self._translate(sidecar_path, from_trainer=False)

    def _translate(self, path: str, *, from_trainer: bool) -> str:
        pure = PurePosixPath(path)
        best: tuple[PurePosixPath, PurePosixPath] | None = None
        for sidecar_prefix, trainer_prefix in self.pairs:
            source, target = (
                (trainer_prefix, sidecar_prefix)
                if from_trainer
                else (sidecar_prefix, trainer_prefix)
            )
            if pure.is_relative_to(source) and (
                best is None or len(source.parts) > len(best[0].parts)
            ):
                best = (source, target)
        if best is None:
            return path
        return str(best[1] / pure.relative_to(best[0]))

    def __str__(self) -> str:
        return ",".join(f"{left}:{right}" for left, right in self.pairs)
