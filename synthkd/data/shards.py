"""On-disk format of a synthetic data set: fixed-size safetensors shards plus a manifest.

Layout of an output directory::

    run.json                    written first by the main process: the settings, to refuse a
                                resume with different ones
    shard-00000.safetensors     images (N,C,H,W float32 in [0,1]), logits (N,K float32),
    shard-00001.safetensors     targets (N int64): one file per global shard id
    progress/rank-{r}.json      shards finished by rank r, so a killed run resumes
    manifest.json               written last: its presence means the set is complete

Shard ids are fixed by ``num_images`` and ``shard_size``, never by the number of processes,
so a run may be resumed with another world size without duplicating or losing a shard.
The directory must be on a filesystem every rank sees. No pickle is used anywhere.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from synthkd.errors import SynthkdError, warn
from synthkd.data.batches import SyntheticBatch
from synthkd.io import atomic_write, atomic_write_json, differences, read_json, sha256_file

if TYPE_CHECKING:  # pragma: no cover
    import accelerate

FORMAT = "synthkd-synthetic"
VERSION = 1
MANIFEST_NAME = "manifest.json"
RUN_NAME = "run.json"
PROGRESS_DIR = "progress"
TENSOR_KEYS = ("images", "logits", "targets")
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")
_PROGRESS_RE = re.compile(r"^rank-(\d+)\.json$")


def shard_name(shard_id: int) -> str:
    """File name of a global shard id; the id, not the rank, names it so resumes line up."""
    return f"shard-{shard_id:05d}.safetensors"


def _shard_id(name: str) -> int | None:
    match = _SHARD_RE.match(name)
    return int(match.group(1)) if match else None


def _plain_json(value: Any, what: str) -> Any:
    """Round-trip through JSON so tuples/lists compare equal to what a resume reads back."""
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} must be JSON-serialisable to be recorded in run.json: {error}") from error


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    """Load a shard's tensors; raises on anything that is not a readable safetensors file."""
    tensors = load_file(str(path))
    missing = [key for key in TENSOR_KEYS if key not in tensors]
    if missing:
        raise ValueError(f"missing tensors {missing}")
    return tensors


def _shard_report(path: Path) -> dict | None:
    """The report a shard carries in its metadata, if any (for shards adopted on resume)."""
    with safe_open(str(path), framework="pt") as f:
        text = (f.metadata() or {}).get("report")
    return json.loads(text) if text else None


def _sum_reports(reports: list[dict]) -> dict:
    """Numbers added, lists added element-wise, over the shards' reports."""
    total: dict[str, Any] = {}
    for report in reports:
        for key, value in report.items():
            if isinstance(value, list):
                previous = total.get(key, [0] * len(value))
                total[key] = [a + b for a, b in zip(previous, value)]
            else:
                total[key] = total.get(key, 0) + value
    return total


class _SingleProcess:
    """Stand-in for an Accelerator when running in one process without accelerate."""

    process_index = 0
    num_processes = 1
    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass


class SyntheticWriter:
    """Plans a synthetic set as fixed-size shards and writes this rank's share, resumably."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        method: str,
        config: dict,
        teacher: dict,
        num_images: int,
        num_classes: int,
        image_shape: tuple[int, int, int],
        shard_size: int,
        accelerator: "accelerate.Accelerator | None" = None,
    ) -> None:
        """Validate or record the run's settings, repair/adopt leftovers, and plan this rank's shards.

        Every rank computes the same plan between two barriers, so no rank can see another
        rank's fresh writes while planning (which would make the round-robin split disagree).
        """
        if num_images < 1 or num_classes < 1 or shard_size < 1:
            raise ValueError("num_images, num_classes and shard_size must be positive")
        if len(tuple(image_shape)) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape!r}")
        if "fingerprint" not in teacher:
            raise ValueError("teacher must contain a 'fingerprint' so the set records which teacher made it")
        self.out_dir = Path(out_dir)
        self.method = method
        self.config = _plain_json(config, "config")
        self.teacher = _plain_json(teacher, "teacher")
        self.num_images = int(num_images)
        self.num_classes = int(num_classes)
        self.image_shape = tuple(int(d) for d in image_shape)
        self.shard_size = int(shard_size)
        self.num_shards = math.ceil(self.num_images / self.shard_size)
        self.accelerator = accelerator if accelerator is not None else _SingleProcess()
        self.rank = int(self.accelerator.process_index)
        self.world_size = int(self.accelerator.num_processes)
        self.is_main = bool(self.accelerator.is_main_process)
        self.record = {
            "method": method,
            "config": self.config,
            "teacher": self.teacher,
            "num_images": self.num_images,
            "num_classes": self.num_classes,
            "shard_size": self.shard_size,
            "image_shape": list(self.image_shape),
        }

        # Main process records or checks settings and repairs leftovers while the others wait.
        # It never raises here: a lone raise would leave the other ranks hanging at the barrier,
        # so every rank detects problems identically after it.
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if not self._run_path.exists():
                if not self._foreign_files():
                    atomic_write_json(self._run_path, self.record)
            elif not self._mismatches():
                self._remove_stale_temp_files()
                if not self._finished_manifest_ok():
                    self._repair_progress()
        self.accelerator.wait_for_everyone()

        if not self._run_path.exists():
            raise SynthkdError(
                f"{self.out_dir} holds synthetic-set files ({', '.join(self._foreign_files()[:3])}) "
                f"but no {RUN_NAME}, so its settings cannot be checked; "
                "use a new --out directory or delete this one"
            )
        mismatches = self._mismatches()
        if mismatches:
            raise SynthkdError(
                f"{self.out_dir} holds a run with different settings (existing run -> now: "
                + "; ".join(mismatches)
                + "); use a new --out directory or delete it (nothing was overwritten)"
            )
        self._manifest: dict | None = read_json(self._manifest_path) if self._manifest_path.exists() else None
        own = self._progress_dir / f"rank-{self.rank}.json"
        self._own_entries: dict[str, dict] = {e["file"]: e for e in self._read_progress_file(own)}
        if self._manifest is not None:
            self._pending: list[int] = []
        else:
            done = {_shard_id(name) for name in self._merged_progress(hash_conflicts=False)}
            remaining = [i for i in range(self.num_shards) if i not in done]
            self._pending = remaining[self.rank :: self.world_size]
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ paths
    @property
    def _run_path(self) -> Path:
        return self.out_dir / RUN_NAME

    @property
    def _manifest_path(self) -> Path:
        return self.out_dir / MANIFEST_NAME

    @property
    def _progress_dir(self) -> Path:
        return self.out_dir / PROGRESS_DIR

    # ------------------------------------------------------------------ planning
    def shard_count(self, shard_id: int) -> int:
        """Images in a shard: all are ``shard_size`` except possibly the last."""
        self._check_id(shard_id)
        return min(self.shard_size, self.num_images - shard_id * self.shard_size)

    def shard_targets(self, shard_id: int) -> torch.Tensor:
        """Class-balanced labels fixed by the global position, so any rank makes the same plan."""
        count = self.shard_count(shard_id)
        return (torch.arange(count, dtype=torch.int64) + shard_id * self.shard_size) % self.num_classes

    def pending_shards(self) -> list[int]:
        """Shard ids this rank must still make (empty for a finished set)."""
        return list(self._pending)

    # ------------------------------------------------------------------ writing
    def write_shard(
        self, shard_id: int, images: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
        report: dict[str, Any] | None = None,
    ) -> None:
        """Save one shard atomically, then record it in this rank's progress file (resume point).

        ``report``: counts about how the shard was made (numbers, or lists per class), kept in the
        shard's metadata and summed over all shards into the manifest's ``report``."""
        self._check_id(shard_id)
        name = shard_name(shard_id)
        if shard_id not in self._pending and name not in self._own_entries:
            raise ValueError(
                f"shard {shard_id} is not pending for rank {self.rank}; write only ids from pending_shards()"
            )
        count = self.shard_count(shard_id)
        images = torch.as_tensor(images).detach().to("cpu", torch.float32).contiguous()
        logits = torch.as_tensor(logits).detach().to("cpu", torch.float32).contiguous()
        targets = torch.as_tensor(targets).detach().to("cpu")
        if targets.is_floating_point() or targets.is_complex():
            raise ValueError(f"targets must be integer class ids, got dtype {targets.dtype}")
        targets = targets.to(torch.int64).contiguous()
        if tuple(images.shape) != (count, *self.image_shape):
            raise ValueError(
                f"images for shard {shard_id} must be {(count, *self.image_shape)}, got {tuple(images.shape)}"
            )
        if tuple(logits.shape) != (count, self.num_classes):
            raise ValueError(
                f"logits for shard {shard_id} must be {(count, self.num_classes)}, got {tuple(logits.shape)}"
            )
        if tuple(targets.shape) != (count,):
            raise ValueError(f"targets for shard {shard_id} must be ({count},), got {tuple(targets.shape)}")
        if not bool(torch.isfinite(images).all()) or float(images.min()) < 0.0 or float(images.max()) > 1.0:
            raise ValueError(f"images for shard {shard_id} must be finite and in [0, 1]; clamp them before writing")
        if not bool(torch.isfinite(logits).all()):
            raise ValueError(f"logits for shard {shard_id} contain NaN or inf")
        if int(targets.min()) < 0 or int(targets.max()) >= self.num_classes:
            raise ValueError(f"targets for shard {shard_id} must be in [0, {self.num_classes})")

        path = self.out_dir / name
        tensors = {"images": images, "logits": logits, "targets": targets}
        metadata = {"format": FORMAT, "version": str(VERSION), "shard": str(shard_id)}
        if report is not None:
            report = _plain_json(report, "report")
            metadata["report"] = json.dumps(report, sort_keys=True)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        self._own_entries[name] = {
            "file": name,
            "count": count,
            "sha256": sha256_file(path),
            "rank": self.rank,
            "counts_per_class": torch.bincount(targets, minlength=self.num_classes).tolist(),
            **({"report": report} if report is not None else {}),
        }
        self._write_progress(self.rank, self._own_entries.values())

    def finalize(self) -> dict:
        """Wait for all ranks, write manifest.json (main process) and return it on every rank.

        Every rank checks completeness itself, so a missing shard raises on all ranks at once
        instead of leaving some waiting at a barrier.
        """
        self.accelerator.wait_for_everyone()
        if self._manifest is not None:
            return self._manifest
        merged = self._merged_progress(hash_conflicts=True)
        missing = [i for i in range(self.num_shards) if shard_name(i) not in merged]
        if missing:
            shown = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
            raise SynthkdError(
                f"{self.out_dir} is missing {len(missing)} of {self.num_shards} shards (ids {shown}); "
                "rerun the same `synthkd generate` command to make them"
            )
        if self.is_main:
            counts = [0] * self.num_classes
            shards = []
            for shard_id in range(self.num_shards):
                entry = merged[shard_name(shard_id)]
                for cls, n in enumerate(entry["counts_per_class"]):
                    counts[cls] += int(n)
                shards.append({key: entry[key] for key in ("file", "count", "sha256", "rank")})
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "method": self.method,
                "config": self.config,
                "teacher": self.teacher,
                "num_images": self.num_images,
                "num_classes": self.num_classes,
                "image_shape": list(self.image_shape),
                "shard_size": self.shard_size,
                "counts_per_class": counts,
                "shards": shards,
            }
            reports = [merged[shard_name(i)].get("report") for i in range(self.num_shards)]
            if any(report is not None for report in reports):
                manifest["report"] = _sum_reports([report for report in reports if report is not None])
                manifest["report"]["shards_without_report"] = sum(report is None for report in reports)
            atomic_write_json(self._manifest_path, manifest)
        self.accelerator.wait_for_everyone()
        self._manifest = read_json(self._manifest_path)
        self._pending = []
        return self._manifest

    # ------------------------------------------------------------------ internals
    def _check_id(self, shard_id: int) -> None:
        if not 0 <= shard_id < self.num_shards:
            raise ValueError(f"shard id {shard_id} out of range [0, {self.num_shards})")

    def _foreign_files(self) -> list[str]:
        """Set files in a directory without run.json: we cannot tell whose they are."""
        if not self.out_dir.is_dir():
            return []
        return sorted(
            p.name
            for p in self.out_dir.iterdir()
            if p.name in (MANIFEST_NAME, PROGRESS_DIR) or _shard_id(p.name) is not None
        )

    def _mismatches(self) -> list[str]:
        try:
            existing = read_json(self._run_path)
        except (OSError, json.JSONDecodeError) as error:
            return [f"{RUN_NAME} is unreadable ({error})"]
        return differences(existing, self.record)

    def _remove_stale_temp_files(self) -> None:
        """Temp files of writes killed before their rename; nobody else is writing now."""
        for directory in (self.out_dir, self._progress_dir):
            if directory.is_dir():
                for path in directory.glob(".*.tmp"):
                    path.unlink(missing_ok=True)

    def _finished_manifest_ok(self) -> bool:
        """True if a manifest exists and all its shards are intact; else drop it so we resume."""
        if not self._manifest_path.exists():
            return False
        try:
            manifest = read_json(self._manifest_path)
            bad = [
                s["file"]
                for s in manifest["shards"]
                if not (self.out_dir / s["file"]).is_file() or sha256_file(self.out_dir / s["file"]) != s["sha256"]
            ]
            complete = sorted(s["file"] for s in manifest["shards"]) == [shard_name(i) for i in range(self.num_shards)]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as error:
            bad, complete = [f"{MANIFEST_NAME} ({error})"], False
        if not bad and complete:
            return True
        warn(
            f"{self.out_dir} was finished but {', '.join(bad) or 'some shards'} are missing or changed; "
            "regenerating them"
        )
        self._manifest_path.unlink()
        return False

    def _read_progress_file(self, path: Path) -> list[dict]:
        if not path.exists():
            return []
        try:
            entries = read_json(path)["shards"]
            return [e for e in entries if isinstance(e, dict) and isinstance(e.get("file"), str)]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as error:
            warn(f"ignoring unreadable progress file {path} ({error})")
            return []

    def _progress_files(self) -> list[tuple[int, Path]]:
        if not self._progress_dir.is_dir():
            return []
        found = []
        for path in self._progress_dir.iterdir():
            match = _PROGRESS_RE.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found)

    def _write_progress(self, rank: int, entries) -> None:
        ordered = sorted(entries, key=lambda e: _shard_id(e["file"]))
        atomic_write_json(self._progress_dir / f"rank-{rank}.json", {"shards": ordered})

    def _entry_valid(self, entry: dict) -> bool:
        shard_id = _shard_id(entry["file"])
        return (
            shard_id is not None
            and shard_id < self.num_shards
            and entry.get("count") == self.shard_count(shard_id)
            and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("counts_per_class"), list)
            and len(entry["counts_per_class"]) == self.num_classes
        )

    def _merged_progress(self, *, hash_conflicts: bool) -> dict[str, dict]:
        """Completed shards from every rank's progress file (any earlier world size), by file."""
        merged: dict[str, dict] = {}
        for _, path in self._progress_files():
            for entry in self._read_progress_file(path):
                if not self._entry_valid(entry):
                    continue
                name = entry["file"]
                if name in merged and merged[name]["sha256"] != entry["sha256"] and hash_conflicts:
                    if sha256_file(self.out_dir / name) == entry["sha256"]:
                        merged[name] = entry
                    continue
                merged.setdefault(name, entry)
        return merged

    def _repair_progress(self) -> None:
        """Main process, before planning: drop progress entries whose file is gone or changed,
        and adopt shard files written by a rank killed before it recorded them."""
        hashes: dict[str, str | None] = {}

        def current_hash(name: str) -> str | None:
            if name not in hashes:
                path = self.out_dir / name
                hashes[name] = sha256_file(path) if path.is_file() else None
            return hashes[name]

        kept: set[str] = set()
        rejected: set[str] = set()  # recorded but changed: never adopt these back
        for rank, path in self._progress_files():
            entries = self._read_progress_file(path)
            good = []
            for entry in entries:
                name = entry["file"]
                if name in kept:
                    continue  # duplicate of an entry already kept
                if not self._entry_valid(entry):
                    warn(f"progress entry for {name} in {path.name} does not match this run; regenerating it")
                elif current_hash(name) is None:
                    warn(f"{name} is recorded as done but the file is missing; regenerating it")
                elif current_hash(name) != entry["sha256"]:
                    warn(f"{name} does not match its recorded checksum (corrupt or changed); regenerating it")
                    rejected.add(name)
                else:
                    good.append(entry)
                    kept.add(name)
            if len(good) != len(entries):
                self._write_progress(rank, good)

        adopted = []
        for path in sorted(self.out_dir.glob("shard-*.safetensors")):
            shard_id = _shard_id(path.name)
            if shard_id is None or path.name in kept or path.name in rejected or shard_id >= self.num_shards:
                continue
            count = self.shard_count(shard_id)
            try:
                tensors = _load_shard(path)
                targets = tensors["targets"]
                ok = (
                    tuple(tensors["images"].shape) == (count, *self.image_shape)
                    and tuple(tensors["logits"].shape) == (count, self.num_classes)
                    and tuple(targets.shape) == (count,)
                    and targets.dtype == torch.int64
                    and (count == 0 or (int(targets.min()) >= 0 and int(targets.max()) < self.num_classes))
                )
            except Exception as error:  # safetensors raises several types for a damaged file
                warn(f"{path.name} is unreadable ({error}); regenerating it")
                continue
            if not ok:
                warn(f"{path.name} has the wrong shapes for this run; regenerating it")
                continue
            entry = {
                "file": path.name,
                "count": count,
                "sha256": current_hash(path.name),
                "rank": self.rank,
                "counts_per_class": torch.bincount(targets, minlength=self.num_classes).tolist(),
            }
            report = _shard_report(path)
            if report is not None:
                entry["report"] = report
            adopted.append(entry)
        if adopted:
            own = self._progress_dir / f"rank-{self.rank}.json"
            self._write_progress(self.rank, [*self._read_progress_file(own), *adopted])


class SyntheticDataset(torch.utils.data.Dataset):
    """Reads a finished synthetic set; checks checksums so a corrupt shard is named, not trained on."""

    def __init__(self, path: str | os.PathLike, verify: bool = True) -> None:
        """Load every shard eagerly (sets are small) after checking the manifest and checksums."""
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_NAME
        if not manifest_path.is_file():
            if (self.path / RUN_NAME).is_file():
                raise SynthkdError(
                    f"{self.path} is an unfinished synthetic set (no {MANIFEST_NAME}): its generation was "
                    "interrupted; rerunning the same `synthkd generate` command resumes it"
                )
            raise SynthkdError(
                f"{self.path} is not a synthetic set (no {MANIFEST_NAME}); "
                "make one with `synthkd generate ... --out DIR` and pass that DIR"
            )
        try:
            manifest = read_json(manifest_path)
        except (OSError, json.JSONDecodeError) as error:
            raise SynthkdError(
                f"{manifest_path} is unreadable ({error}); delete it and rerun the same `synthkd generate` command"
            ) from error
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise SynthkdError(
                f"{manifest_path} is not a synthkd synthetic-set manifest; "
                "make one with `synthkd generate ... --out DIR`"
            )
        if manifest.get("version") != VERSION:
            raise SynthkdError(
                f"{self.path} uses synthetic-set format version {manifest.get('version')}, this synthkd reads "
                f"version {VERSION}; regenerate it with this synthkd's `synthkd generate`"
            )
        self.manifest: dict = manifest
        num_classes = int(manifest["num_classes"])
        parts: dict[str, list[torch.Tensor]] = {key: [] for key in TENSOR_KEYS}
        for shard in manifest["shards"]:
            name = shard["file"]
            if _shard_id(name) is None:
                raise SynthkdError(f"{manifest_path} lists an invalid shard name {name!r}; regenerate the set")
            shard_path = self.path / name
            fix = (
                f"delete {shard_path} and rerun the same `synthkd generate` command to regenerate just that shard"
            )
            if not shard_path.is_file():
                raise SynthkdError(
                    f"shard {name} of {self.path} is missing; "
                    "rerun the same `synthkd generate` command to regenerate it"
                )
            if verify and sha256_file(shard_path) != shard["sha256"]:
                raise SynthkdError(f"shard {name} of {self.path} is corrupt (checksum mismatch); {fix}")
            try:
                tensors = _load_shard(shard_path)
            except Exception as error:  # safetensors raises several types for a damaged file
                raise SynthkdError(f"shard {name} of {self.path} is corrupt (cannot load: {error}); {fix}") from error
            count = int(shard["count"])
            images, logits, targets = (tensors[key] for key in TENSOR_KEYS)
            if (
                images.ndim != 4
                or images.shape[0] != count
                or tuple(logits.shape) != (count, num_classes)
                or tuple(targets.shape) != (count,)
                or images.dtype != torch.float32
                or logits.dtype != torch.float32
                or targets.dtype != torch.int64
            ):
                raise SynthkdError(
                    f"shard {name} of {self.path} is corrupt (holds {images.shape[0]} images with shapes "
                    f"{tuple(images.shape)}/{tuple(logits.shape)}/{tuple(targets.shape)}, manifest says {count}); {fix}"
                )
            parts["images"].append(images)
            parts["logits"].append(logits)
            parts["targets"].append(targets)
        if not parts["images"]:
            raise SynthkdError(f"{manifest_path} lists no shards; regenerate the set with `synthkd generate`")
        try:
            self.images = torch.cat(parts["images"])
        except RuntimeError as error:
            raise SynthkdError(
                f"shards of {self.path} have different image shapes ({error}); regenerate the set"
            ) from error
        self.logits = torch.cat(parts["logits"])
        self.targets = torch.cat(parts["targets"])
        if int(self.targets.min()) < 0:
            raise SynthkdError(f"{self.path} holds negative targets; regenerate the set with `synthkd generate`")
        counts = torch.bincount(self.targets, minlength=num_classes).tolist()
        expected_shape = manifest.get("image_shape")
        if (
            len(self.targets) != int(manifest["num_images"])
            or counts != list(manifest.get("counts_per_class", counts))
            or (expected_shape is not None and list(self.images.shape[1:]) != list(expected_shape))
        ):
            raise SynthkdError(
                f"{self.path} holds {len(self.targets)} images of shape {tuple(self.images.shape[1:])} with class "
                f"counts {counts}, but its manifest says {manifest['num_images']} of {expected_shape} with "
                f"{manifest.get('counts_per_class')}; regenerate the set with `synthkd generate`"
            )

    @property
    def num_classes(self) -> int:
        """Number of teacher classes (width of ``logits``)."""
        return int(self.manifest["num_classes"])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> SyntheticBatch:
        """(image C x H x W in [0,1], teacher logits, generator target)."""
        return SyntheticBatch(self.images[i], self.logits[i], int(self.targets[i]))


def load_written_shards(path: str | os.PathLike, loaded: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """The shards of a set that is still being made (read between generation rounds, when
    no write is in flight), added to ``loaded`` (name -> tensors) so each file is read once."""
    for shard in sorted(Path(path).glob("shard-*.safetensors")):
        if _shard_id(shard.name) is not None and shard.name not in loaded:
            try:
                loaded[shard.name] = _load_shard(shard)
            except Exception as error:  # safetensors raises several types for a damaged file
                raise SynthkdError(f"shard {shard} is corrupt ({error}); delete it and rerun to regenerate it") from error
    return loaded


def is_synthetic_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a finished synthetic set, so callers can tell it from a real data set."""
    manifest_path = Path(path) / MANIFEST_NAME
    if not manifest_path.is_file():
        return False
    try:
        manifest = read_json(manifest_path)
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT
