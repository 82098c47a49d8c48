"""The resumable shard store: planning, progress files, repair and atomic shard writes, shared
by synthetic image sets (:class:`SyntheticWriter`) and activation sets
(:class:`synthkd.data.activations.ActivationWriter`).

A set is ``num_jobs`` shards, each written atomically and then recorded in its rank's progress
file. Every rank computes the same plan between two barriers, so no rank sees another rank's
fresh writes while planning (which would make the round-robin split disagree). A rerun with
the same settings keeps what is intact, adopts shards written but not recorded, remakes
missing or changed ones, and may use another number of processes.

Fault injection for tests: with ``SYNTHKD_KILL_AFTER_SHARDS=N`` in the environment a process
SIGKILLs itself right after committing its N-th shard, as a crash would, so resume tests do
not depend on how fast the child runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch

from synthkd.errors import SynthkdError, one_line, warn
from synthkd.io import atomic_write_json, changed_settings, read_json, refuse_changed_settings, sha256_file, temp_target

from .format import (
    IMAGE_TENSORS, MANIFEST_NAME, PROGRESS_DIR, RUN_NAME, SHARD_PATTERN, SYNTHETIC, SetFormat,
    load_shard, plain_json, progress_name, progress_rank, save_shard, shard_name, shard_report,
    sum_reports,
)

if TYPE_CHECKING:  # pragma: no cover
    import accelerate

KILL_AFTER_SHARDS_ENV = "SYNTHKD_KILL_AFTER_SHARDS"


class _KillSwitch:
    """Counts the shards this process committed (over every store it opened) and SIGKILLs it
    after the number in ``SYNTHKD_KILL_AFTER_SHARDS``; does nothing when that is unset."""

    committed = 0

    @classmethod
    def shard_committed(cls) -> None:
        limit = os.environ.get(KILL_AFTER_SHARDS_ENV)
        if not limit:
            return
        cls.committed += 1
        if cls.committed >= int(limit):
            os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


class _SingleProcess:
    """Stand-in for an Accelerator when running in one process without accelerate."""

    process_index = 0
    num_processes = 1
    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass


class ShardStore(ABC):
    """The resumable protocol over ``num_jobs`` shards; a kind of set says where job ``j``'s
    file lives (:meth:`job_file`, :attr:`FILE_PATTERN`), what a valid shard holds
    (:meth:`check_tensors`), what its progress entry adds (:meth:`entry_fields`) and what its
    manifest looks like (:meth:`build_manifest`, :meth:`manifest_shards`)."""

    FORMAT: SetFormat
    FILE_PATTERN = SHARD_PATTERN  # relative path of a shard file; groups give the job
    TENSORS: tuple[str, ...] = ()

    def __init__(self, out_dir: str | os.PathLike, record: dict[str, Any], num_jobs: int,
                 accelerator: "accelerate.Accelerator | None" = None) -> None:
        """Record or check the run's settings, repair or adopt leftovers, and plan this rank's jobs."""
        self.out_dir = Path(out_dir)
        self.record = plain_json(record, "settings")
        self.num_jobs = int(num_jobs)
        self.accelerator = accelerator if accelerator is not None else _SingleProcess()
        self.rank = int(self.accelerator.process_index)
        self.world_size = int(self.accelerator.num_processes)
        self.is_main = bool(self.accelerator.is_main_process)
        # The main process records or checks settings and repairs leftovers while the others wait.
        # It never raises here: a lone raise would leave the other ranks hanging at the barrier,
        # so every rank detects problems identically after it.
        if self.is_main:
            self._prepare_directory()
        self.accelerator.wait_for_everyone()
        self._check_run()
        self._manifest: dict | None = read_json(self._manifest_path) if self._manifest_path.exists() else None
        self._own_entries = {e["file"]: e for e in self._read_progress_file(self._progress_path(self.rank))}
        self._remaining: set[int] = set()
        self._pending = [] if self._manifest is not None else self._plan()
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ what a kind of set defines
    @abstractmethod
    def job_file(self, job: int) -> str:
        """Path of job ``job``'s shard, relative to the set."""

    @abstractmethod
    def job_of(self, match: re.Match) -> int:
        """The job of a file whose relative path matched :attr:`FILE_PATTERN`."""

    @abstractmethod
    def job_count(self, job: int) -> int:
        """Rows in job ``job``'s shard."""

    @abstractmethod
    def check_tensors(self, job: int, tensors: dict[str, torch.Tensor]) -> None:
        """Raise ValueError unless ``tensors`` (as stored) are a valid shard for ``job``."""

    def entry_fields(self, job: int, tensors: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
        """What a progress entry records beyond file, count, sha256 and rank."""
        return {}

    def entry_matches(self, job: int, entry: dict) -> bool:
        """Whether a progress entry's extra fields fit this run."""
        return True

    @abstractmethod
    def build_manifest(self, entries: list[dict]) -> dict:
        """The manifest from every job's progress entry, in job order."""

    @abstractmethod
    def manifest_shards(self, manifest: dict) -> list[dict]:
        """The ``{"file", "sha256", ...}`` entries a manifest lists."""

    # ------------------------------------------------------------------ paths and names
    @property
    def _run_path(self) -> Path:
        return self.out_dir / RUN_NAME

    @property
    def _manifest_path(self) -> Path:
        return self.out_dir / MANIFEST_NAME

    @property
    def _progress_dir(self) -> Path:
        return self.out_dir / PROGRESS_DIR

    def _progress_path(self, rank: int) -> Path:
        return self._progress_dir / progress_name(rank)

    def _job_of_file(self, relative: str) -> int | None:
        """The job a relative path is the shard of, or None (another file, or out of range)."""
        match = re.fullmatch(self.FILE_PATTERN, relative)
        job = self.job_of(match) if match else None
        return job if job is not None and 0 <= job < self.num_jobs and self.job_file(job) == relative else None

    def _shard_files(self) -> list[str]:
        """Relative paths of every file that looks like a shard of this kind of set."""
        if not self.out_dir.is_dir():
            return []
        found = (p.relative_to(self.out_dir).as_posix() for p in self.out_dir.rglob("*.safetensors"))
        return sorted(name for name in found if re.fullmatch(self.FILE_PATTERN, name))

    # ------------------------------------------------------------------ planning
    def _prepare_directory(self) -> None:
        """Main process, before planning: record the settings, or clean up after a killed run."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not self._run_path.exists():
            if not self._foreign_files():
                atomic_write_json(self._run_path, self.record)
        elif not self._mismatches():
            self._remove_stale_temp_files()
            if not self._finished_manifest_ok():
                self._repair_progress()

    def _check_run(self) -> None:
        """Every rank: refuse a directory whose settings are unknown or differ from this run's."""
        if not self._run_path.exists():
            raise SynthkdError(
                f"{self.out_dir} holds {self.FORMAT.noun} files ({', '.join(self._foreign_files()[:3])}) "
                f"but no {RUN_NAME}, so its settings cannot be checked; "
                "use a new --out directory or delete this one"
            )
        refuse_changed_settings(f"{self.out_dir} holds a {self.FORMAT.noun}", self._recorded(), self.record)

    def plan_unit(self, job: int) -> int:
        """Jobs of one unit are made together by one rank (e.g. the shards one computation writes)."""
        return job

    def share(self, remaining: list[int]) -> list[int]:
        """This rank's jobs among those no rank has finished: round-robin over the units left."""
        units = sorted({self.plan_unit(job) for job in remaining})
        mine = set(units[self.rank :: self.world_size])
        return [job for job in remaining if self.plan_unit(job) in mine]

    def _plan(self) -> list[int]:
        """This rank's share of the jobs no rank has finished (every rank knows all of them)."""
        done = {self._job_of_file(name) for name in self._merged_progress(hash_conflicts=False)}
        self._remaining = {job for job in range(self.num_jobs) if job not in done}
        return self.share(sorted(self._remaining))

    def pending_jobs(self) -> list[int]:
        """Jobs this rank must still make (empty for a finished set)."""
        return list(self._pending)

    def committed_file(self, job: int, poll_seconds: float = 0.05) -> Path:
        """The shard file of ``job`` once it is committed, by this rank or another one writing the
        same directory (waiting for it): a rank that makes shards from another rank's ones reads
        them as they are recorded, never a stale file of an earlier run that is being remade."""
        name = self.job_file(job)
        while (job in self._remaining and name not in self._own_entries
               and name not in self._merged_progress(hash_conflicts=False)):
            time.sleep(poll_seconds)
        return self.out_dir / name

    # ------------------------------------------------------------------ writing
    def commit(self, job: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """Save job ``job``'s shard atomically, then record it in this rank's progress file."""
        if not 0 <= job < self.num_jobs:
            raise ValueError(f"shard id {job} out of range [0, {self.num_jobs})")
        name = self.job_file(job)
        if job not in self._pending and name not in self._own_entries:
            raise ValueError(f"{name} is not pending for rank {self.rank}; write only the pending shards")
        self.check_tensors(job, tensors)
        path = self.out_dir / name
        save_shard(path, tensors, metadata)
        self._own_entries[name] = self._entry(job, tensors, path)
        self._write_progress(self.rank, self._own_entries.values())
        _KillSwitch.shard_committed()

    def _entry(self, job: int, tensors: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
        return {"file": self.job_file(job), "count": self.job_count(job), "sha256": sha256_file(path),
                "rank": self.rank, **self.entry_fields(job, tensors, path)}

    def finalize(self) -> dict:
        """Wait for all ranks, write manifest.json (main process) and return it on every rank.

        Every rank checks completeness itself, so a missing shard raises on all ranks at once
        instead of leaving some waiting at a barrier.
        """
        self.accelerator.wait_for_everyone()
        if self._manifest is not None:
            return self._manifest
        merged = self._merged_progress(hash_conflicts=True)
        missing = [self.job_file(job) for job in range(self.num_jobs) if self.job_file(job) not in merged]
        if missing:
            shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise SynthkdError(
                f"{self.out_dir} is missing {len(missing)} of {self.num_jobs} shards ({shown}); "
                f"rerun the same `{self.FORMAT.command}` command to make them"
            )
        if self.is_main:
            atomic_write_json(self._manifest_path, self.build_manifest([merged[self.job_file(j)] for j in range(self.num_jobs)]))
        self.accelerator.wait_for_everyone()
        self._manifest = read_json(self._manifest_path)
        self._pending, self._remaining = [], set()
        return self._manifest

    # ------------------------------------------------------------------ resuming
    def _foreign_files(self) -> list[str]:
        """Set files in a directory without run.json: we cannot tell whose they are."""
        if not self.out_dir.is_dir():
            return []
        own = [p.name for p in self.out_dir.iterdir() if p.name in (MANIFEST_NAME, PROGRESS_DIR)]
        return sorted(own + self._shard_files())

    def _recorded(self) -> Any:
        """The settings recorded in run.json, or why they cannot be read."""
        try:
            return read_json(self._run_path)
        except (OSError, json.JSONDecodeError) as error:
            return f"{RUN_NAME} is unreadable ({one_line(error)})"

    def _mismatches(self) -> list[str]:
        return changed_settings(self._recorded(), self.record)

    def _remove_stale_temp_files(self) -> None:
        """Temp files of this store's writes killed before their rename (nobody else is writing
        now); other files, such as a user's own in a reused --cache-dir, are left alone."""
        for path in self.out_dir.rglob(".*.tmp"):
            target = temp_target(path)
            if target is not None and self._writes(target):
                path.unlink(missing_ok=True)

    def _writes(self, path: Path) -> bool:
        """Whether ``path`` is a file this store writes: run.json, the manifest, a progress file, a shard."""
        relative = path.relative_to(self.out_dir).as_posix()
        return (relative in (RUN_NAME, MANIFEST_NAME) or self._job_of_file(relative) is not None
                or (path.parent == self._progress_dir and progress_rank(path.name) is not None))

    def _finished_manifest_ok(self) -> bool:
        """True if a manifest exists and all its shards are intact; else drop it so we resume."""
        if not self._manifest_path.exists():
            return False
        try:
            listed = self.manifest_shards(read_json(self._manifest_path))
            bad = [s["file"] for s in listed
                   if not (self.out_dir / s["file"]).is_file() or sha256_file(self.out_dir / s["file"]) != s["sha256"]]
            complete = sorted(s["file"] for s in listed) == sorted(self.job_file(j) for j in range(self.num_jobs))
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as error:
            bad, complete = [f"{MANIFEST_NAME} ({error})"], False
        if not bad and complete:
            return True
        warn(f"{self.out_dir} was finished but {', '.join(bad) or 'some shards'} are missing or changed; "
             "regenerating them")
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
        found = ((progress_rank(path.name), path) for path in self._progress_dir.iterdir())
        return sorted((rank, path) for rank, path in found if rank is not None)

    def _write_progress(self, rank: int, entries: Iterable[dict]) -> None:
        ordered = sorted(entries, key=lambda e: self._job_of_file(e["file"]))
        atomic_write_json(self._progress_path(rank), {"shards": ordered})

    def _entry_valid(self, entry: dict) -> bool:
        job = self._job_of_file(entry["file"])
        return (job is not None and entry.get("count") == self.job_count(job)
                and isinstance(entry.get("sha256"), str) and self.entry_matches(job, entry))

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
        kept, rejected = self._keep_intact_entries()
        adopted = [entry for name in self._shard_files() if name not in kept and name not in rejected
                   for entry in [self._adopt(name)] if entry is not None]
        if adopted:
            own = self._progress_path(self.rank)
            self._write_progress(self.rank, [*self._read_progress_file(own), *adopted])

    def _keep_intact_entries(self) -> tuple[set[str], set[str]]:
        """Rewrite progress files without entries whose shard is missing or changed; returns the
        files kept and those recorded but changed (never adopted back)."""
        kept: set[str] = set()
        rejected: set[str] = set()
        for rank, path in self._progress_files():
            entries = self._read_progress_file(path)
            good = []
            for entry in entries:
                name = entry["file"]
                if name in kept:
                    continue  # duplicate of an entry already kept
                file = self.out_dir / name
                if not self._entry_valid(entry):
                    warn(f"progress entry for {name} in {path.name} does not match this run; regenerating it")
                elif not file.is_file():
                    warn(f"{name} is recorded as done but the file is missing; regenerating it")
                elif sha256_file(file) != entry["sha256"]:
                    warn(f"{name} does not match its recorded checksum (corrupt or changed); regenerating it")
                    rejected.add(name)
                else:
                    good.append(entry)
                    kept.add(name)
            if len(good) != len(entries):
                self._write_progress(rank, good)
        return kept, rejected

    def _adopt(self, name: str) -> dict | None:
        """The progress entry of an unrecorded but valid shard file, or None (it is remade)."""
        job = self._job_of_file(name)
        if job is None:
            return None
        path = self.out_dir / name
        try:
            tensors = load_shard(path, self.TENSORS)
        except Exception as error:  # safetensors raises several types for a damaged file
            warn(f"{name} is unreadable ({error}); regenerating it")
            return None
        try:
            self.check_tensors(job, tensors)
        except ValueError as error:
            warn(f"{name} does not fit this run ({error}); regenerating it")
            return None
        return self._entry(job, tensors, path)


class SyntheticWriter(ShardStore):
    """Plans a synthetic image set as fixed-size shards and writes this rank's share, resumably."""

    FORMAT = SYNTHETIC
    TENSORS = IMAGE_TENSORS

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
        if num_images < 1 or num_classes < 1 or shard_size < 1:
            raise ValueError("num_images, num_classes and shard_size must be positive")
        if len(tuple(image_shape)) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape!r}")
        if "fingerprint" not in teacher:
            raise ValueError("teacher must contain a 'fingerprint' so the set records which teacher made it")
        self.method = method
        self.config = plain_json(config, "config")
        self.teacher = plain_json(teacher, "teacher")
        self.num_images = int(num_images)
        self.num_classes = int(num_classes)
        self.image_shape = tuple(int(d) for d in image_shape)
        self.shard_size = int(shard_size)
        self.num_shards = math.ceil(self.num_images / self.shard_size)
        record = {"method": method, "config": self.config, "teacher": self.teacher, "num_images": self.num_images,
                  "num_classes": self.num_classes, "shard_size": self.shard_size, "image_shape": list(self.image_shape)}
        super().__init__(out_dir, record, self.num_shards, accelerator)

    # ------------------------------------------------------------------ planning
    def shard_count(self, shard_id: int) -> int:
        """Images in a shard: all are ``shard_size`` except possibly the last."""
        if not 0 <= shard_id < self.num_shards:
            raise ValueError(f"shard id {shard_id} out of range [0, {self.num_shards})")
        return min(self.shard_size, self.num_images - shard_id * self.shard_size)

    def shard_targets(self, shard_id: int) -> torch.Tensor:
        """Class-balanced labels fixed by the global position, so any rank makes the same plan."""
        count = self.shard_count(shard_id)
        return (torch.arange(count, dtype=torch.int64) + shard_id * self.shard_size) % self.num_classes

    def pending_shards(self) -> list[int]:
        """Shard ids this rank must still make (empty for a finished set)."""
        return self.pending_jobs()

    def write_shard(
        self, shard_id: int, images: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
        report: dict[str, Any] | None = None,
    ) -> None:
        """Save one shard atomically, then record it in this rank's progress file (resume point).

        ``report``: counts about how the shard was made (numbers, or lists per class), kept in the
        shard's metadata and summed over all shards into the manifest's ``report``."""
        targets = torch.as_tensor(targets).detach().to("cpu")
        if targets.is_floating_point() or targets.is_complex():
            raise ValueError(f"targets must be integer class ids, got dtype {targets.dtype}")
        tensors = {
            "images": torch.as_tensor(images).detach().to("cpu", torch.float32).contiguous(),
            "logits": torch.as_tensor(logits).detach().to("cpu", torch.float32).contiguous(),
            "targets": targets.to(torch.int64).contiguous(),
        }
        metadata = {"format": SYNTHETIC.name, "version": str(SYNTHETIC.version), "shard": str(shard_id)}
        if report is not None:
            metadata["report"] = json.dumps(plain_json(report, "report"), sort_keys=True)
        self.commit(shard_id, tensors, metadata)

    # ------------------------------------------------------------------ the kind of set
    def job_file(self, job: int) -> str:
        return shard_name(job)

    def job_of(self, match: re.Match) -> int:
        return int(match.group(1))

    def job_count(self, job: int) -> int:
        return self.shard_count(job)

    def check_tensors(self, job: int, tensors: dict[str, torch.Tensor]) -> None:
        count = self.shard_count(job)
        images, logits, targets = (tensors[key] for key in IMAGE_TENSORS)
        expected = {"images": (count, *self.image_shape), "logits": (count, self.num_classes), "targets": (count,)}
        for key, shape in expected.items():
            if tuple(tensors[key].shape) != shape:
                raise ValueError(f"{key} for shard {job} must be {shape}, got {tuple(tensors[key].shape)}")
        if images.dtype != torch.float32 or logits.dtype != torch.float32 or targets.dtype != torch.int64:
            raise ValueError(f"shard {job} must hold float32 images and logits and int64 targets")
        if not bool(torch.isfinite(images).all()) or float(images.min()) < 0.0 or float(images.max()) > 1.0:
            raise ValueError(f"images for shard {job} must be finite and in [0, 1]; clamp them before writing")
        if not bool(torch.isfinite(logits).all()):
            raise ValueError(f"logits for shard {job} contain NaN or inf")
        if int(targets.min()) < 0 or int(targets.max()) >= self.num_classes:
            raise ValueError(f"targets for shard {job} must be in [0, {self.num_classes})")

    def entry_fields(self, job: int, tensors: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
        report = shard_report(path)
        counts = torch.bincount(tensors["targets"], minlength=self.num_classes).tolist()
        return {"counts_per_class": counts, **({"report": report} if report is not None else {})}

    def entry_matches(self, job: int, entry: dict) -> bool:
        counts = entry.get("counts_per_class")
        return isinstance(counts, list) and len(counts) == self.num_classes

    def build_manifest(self, entries: list[dict]) -> dict:
        counts = [sum(int(entry["counts_per_class"][c]) for entry in entries) for c in range(self.num_classes)]
        manifest = {
            "format": SYNTHETIC.name, "version": SYNTHETIC.version, "method": self.method, "config": self.config,
            "teacher": self.teacher, "num_images": self.num_images, "num_classes": self.num_classes,
            "image_shape": list(self.image_shape), "shard_size": self.shard_size, "counts_per_class": counts,
            "shards": [{key: entry[key] for key in ("file", "count", "sha256", "rank")} for entry in entries],
        }
        reports = [entry.get("report") for entry in entries]
        if any(report is not None for report in reports):
            manifest["report"] = sum_reports([report for report in reports if report is not None])
            manifest["report"]["shards_without_report"] = sum(report is None for report in reports)
        return manifest

    def manifest_shards(self, manifest: dict) -> list[dict]:
        return manifest["shards"]
