"""The synthetic-set format: write/read round trip, resume after a kill, and corruption handling."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from synthkd.data.activations import ActivationDataset, ActivationWriter
from synthkd.data.batches import SyntheticBatch
from synthkd.data.format import shard_name
from synthkd.data.reader import SyntheticDataset, is_synthetic_dir
from synthkd.data.writer import SyntheticWriter
from synthkd.errors import SynthkdError

SHAPE = (3, 4, 4)
CLASSES = 3


class Rank:
    """Stand-in for an Accelerator: several ranks simulated one after another in one process."""

    def __init__(self, index: int, world: int) -> None:
        self.process_index = index
        self.num_processes = world
        self.is_main_process = index == 0

    def wait_for_everyone(self) -> None:
        pass


def make_writer(out, *, num_images=10, shard_size=4, config=None, accelerator=None) -> SyntheticWriter:
    return SyntheticWriter(
        out,
        method="fake",
        config=config if config is not None else {"iterations": 200, "lr": 0.1},
        teacher={"fingerprint": "abc123", "arch": "tiny"},
        num_images=num_images,
        num_classes=CLASSES,
        image_shape=SHAPE,
        shard_size=shard_size,
        accelerator=accelerator,
    )


def fake_batch(writer: SyntheticWriter, shard_id: int):
    """Deterministic per-shard tensors so a read-back can be checked exactly."""
    n = writer.shard_count(shard_id)
    gen = torch.Generator().manual_seed(shard_id)
    images = torch.rand(n, *SHAPE, generator=gen)
    logits = torch.randn(n, CLASSES, generator=gen)
    return images, logits, writer.shard_targets(shard_id)


def write(writer: SyntheticWriter, ids=None) -> None:
    for shard_id in writer.pending_shards() if ids is None else ids:
        writer.write_shard(shard_id, *fake_batch(writer, shard_id))


def assert_fair_partition(plans: list[list[int]], shards: set[int]) -> None:
    """The ranks' plans cover ``shards`` exactly once, in order, and differ in size by at most one."""
    assert sorted(i for plan in plans for i in plan) == sorted(shards)
    assert all(plan == sorted(plan) for plan in plans)
    assert max(map(len, plans)) - min(map(len, plans)) <= 1


def shard_files(out) -> list[str]:
    return sorted(p.name for p in out.glob("shard-*.safetensors"))


def test_round_trip_and_class_balance(tmp_path):
    out = tmp_path / "set"
    writer = make_writer(out, num_images=10, shard_size=4)
    assert writer.num_shards == 3
    assert [writer.shard_count(i) for i in range(3)] == [4, 4, 2]
    assert writer.shard_targets(1).tolist() == [1, 2, 0, 1]
    assert writer.shard_targets(1).dtype == torch.int64
    assert writer.pending_shards() == [0, 1, 2]
    assert not is_synthetic_dir(out)
    write(writer)
    manifest = writer.finalize()

    assert is_synthetic_dir(out)
    assert manifest["format"] == "synthkd-synthetic" and manifest["version"] == 1
    assert manifest["num_images"] == 10 and manifest["shard_size"] == 4
    assert manifest["counts_per_class"] == [4, 3, 3]
    assert [s["file"] for s in manifest["shards"]] == [shard_name(i) for i in range(3)]
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["teacher"]["fingerprint"] == "abc123"
    assert json.loads((out / "manifest.json").read_text()) == manifest

    data = SyntheticDataset(out)
    assert len(data) == 10
    assert data.images.shape == (10, *SHAPE) and data.images.dtype == torch.float32
    assert data.logits.shape == (10, CLASSES)
    assert data.targets.tolist() == [i % CLASSES for i in range(10)]
    expected = torch.cat([fake_batch(writer, i)[0] for i in range(3)])
    assert torch.equal(data.images, expected)
    assert isinstance(data[5], SyntheticBatch) and data[5].targets == 2
    image, logits, target = data[5]
    assert image.shape == SHAPE and logits.shape == (CLASSES,) and target == 2 and isinstance(target, int)

    # A rerun of a finished set has nothing to do and returns the same manifest.
    again = make_writer(out, num_images=10, shard_size=4)
    assert again.pending_shards() == []
    assert again.finalize() == manifest


def test_real_accelerator_single_process(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    writer = make_writer(tmp_path / "set", num_images=5, shard_size=2, accelerator=accelerate.Accelerator(cpu=True))
    assert writer.pending_shards() == [0, 1, 2]
    write(writer)
    assert writer.finalize()["num_images"] == 5
    assert len(SyntheticDataset(tmp_path / "set")) == 5


def test_write_shard_validates_shapes(tmp_path):
    writer = make_writer(tmp_path / "set")
    images, logits, targets = fake_batch(writer, 0)
    with pytest.raises(ValueError, match="images"):
        writer.write_shard(0, images[:3], logits, targets)
    with pytest.raises(ValueError, match="logits"):
        writer.write_shard(0, images, logits[:, :2], targets)
    with pytest.raises(ValueError, match="targets"):
        writer.write_shard(0, images, logits, targets[:2])
    with pytest.raises(ValueError, match="images"):
        writer.write_shard(2, images, logits, targets)  # last shard holds only 2
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        writer.write_shard(0, images * 3, logits, targets)
    with pytest.raises(ValueError, match="out of range"):
        writer.write_shard(3, images, logits, targets)
    assert shard_files(tmp_path / "set") == []


def test_resume_after_kill(tmp_path):
    out = tmp_path / "set"
    first = make_writer(out, num_images=10, shard_size=2)
    write(first, [0, 2])  # then "killed": no finalize
    assert not (out / "manifest.json").exists()
    with pytest.raises(SynthkdError, match="interrupted.*resumes"):
        SyntheticDataset(out)

    second = make_writer(out, num_images=10, shard_size=2)
    assert second.pending_shards() == [1, 3, 4]
    write(second)
    manifest = second.finalize()
    assert [s["file"] for s in manifest["shards"]] == [shard_name(i) for i in range(5)]
    assert shard_files(out) == [shard_name(i) for i in range(5)]
    data = SyntheticDataset(out)
    assert len(data) == 10
    assert torch.bincount(data.targets).tolist() == manifest["counts_per_class"] == [4, 3, 3]
    assert torch.equal(data.images[4:6], fake_batch(second, 2)[0])  # kept from the first run


def test_a_resume_sweeps_only_the_temp_files_of_its_own_writes(tmp_path):
    """A reused directory (a --cache-dir) keeps the user's own hidden .tmp files."""
    out = tmp_path / "set"
    write(make_writer(out, num_images=10, shard_size=2), [0])  # then "killed"
    ours = [out / f".{shard_name(1)}.a1b2c3d4.tmp", out / ".manifest.json.k_9zq0xy.tmp", out / ".run.json.abcdefgh.tmp"]
    users = [out / ".notes.tmp", out / f".{shard_name(1)}.tmp", out / "mine" / ".draft.txt.abcdefgh.tmp",
             out / f".{shard_name(99)}.a1b2c3d4.tmp"]
    for path in ours + users:
        path.parent.mkdir(exist_ok=True)
        path.write_text("x")
    make_writer(out, num_images=10, shard_size=2)
    assert [path.exists() for path in ours + users] == [False] * len(ours) + [True] * len(users)


def test_unrecorded_shard_is_adopted(tmp_path):
    out = tmp_path / "set"
    first = make_writer(out, num_images=6, shard_size=2)
    write(first, [0, 1])
    # Killed between the shard's rename and the progress write: drop shard 1 from progress.
    progress = out / "progress" / "rank-0.json"
    record = json.loads(progress.read_text())
    record["shards"] = [e for e in record["shards"] if e["file"] != shard_name(1)]
    progress.write_text(json.dumps(record))
    before = (out / shard_name(1)).read_bytes()

    second = make_writer(out, num_images=6, shard_size=2)
    assert second.pending_shards() == [2]
    write(second)
    manifest = second.finalize()
    assert (out / shard_name(1)).read_bytes() == before
    assert manifest["counts_per_class"] == [2, 2, 2]
    assert len(SyntheticDataset(out)) == 6


def test_recorded_but_missing_or_changed_shard_is_regenerated(tmp_path, capsys):
    out = tmp_path / "set"
    first = make_writer(out, num_images=8, shard_size=2)
    write(first, [0, 1, 2])
    (out / shard_name(0)).unlink()
    data = bytearray((out / shard_name(2)).read_bytes())
    data[-5] ^= 0xFF
    (out / shard_name(2)).write_bytes(bytes(data))

    second = make_writer(out, num_images=8, shard_size=2)
    assert second.pending_shards() == [0, 2, 3]
    err = capsys.readouterr().err
    assert shard_name(0) in err and shard_name(2) in err
    write(second)
    second.finalize()
    assert len(SyntheticDataset(out)) == 8


def test_different_config_is_refused(tmp_path):
    out = tmp_path / "set"
    first = make_writer(out, config={"iterations": 200, "lr": 0.1})
    write(first, [0])
    run_before = (out / "run.json").read_bytes()
    progress_before = (out / "progress" / "rank-0.json").read_bytes()
    with pytest.raises(SynthkdError) as info:
        make_writer(out, config={"iterations": 100, "lr": 0.1})
    message = str(info.value)
    assert "existing run -> now: config.iterations: 200 -> 100" in message
    assert "lr" not in message
    assert "--out" in message
    assert (out / "run.json").read_bytes() == run_before
    assert (out / "progress" / "rank-0.json").read_bytes() == progress_before
    with pytest.raises(SynthkdError, match="num_images"):
        make_writer(out, num_images=12)


def test_finished_set_refuses_different_config(tmp_path):
    out = tmp_path / "set"
    writer = make_writer(out)
    write(writer)
    writer.finalize()
    manifest_before = (out / "manifest.json").read_bytes()
    with pytest.raises(SynthkdError, match="config.lr"):
        make_writer(out, config={"iterations": 200, "lr": 0.5})
    assert (out / "manifest.json").read_bytes() == manifest_before


def test_corrupt_shard_is_named_and_regenerated(tmp_path):
    out = tmp_path / "set"
    writer = make_writer(out, num_images=10, shard_size=4)
    write(writer)
    writer.finalize()
    path = out / shard_name(1)
    data = bytearray(path.read_bytes())
    for offset in (-1, -9, -17):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))

    with pytest.raises(SynthkdError) as info:
        SyntheticDataset(out)
    message = str(info.value)
    assert shard_name(1) in message and "corrupt" in message and "synthkd generate" in message
    assert shard_name(0) not in message

    # Truncated header: load fails even without checksum verification.
    path.write_bytes(b"\x00" * 4)
    with pytest.raises(SynthkdError, match=shard_name(1)):
        SyntheticDataset(out, verify=False)

    # The advertised fix: delete the shard, rerun the same command, only it is regenerated.
    path.unlink()
    untouched = (out / shard_name(0)).read_bytes()
    rerun = make_writer(out, num_images=10, shard_size=4)
    assert rerun.pending_shards() == [1]
    write(rerun)
    rerun.finalize()
    assert (out / shard_name(0)).read_bytes() == untouched
    assert len(SyntheticDataset(out)) == 10


def test_not_a_synthetic_set(tmp_path):
    with pytest.raises(SynthkdError, match="synthkd generate .* --out DIR"):
        SyntheticDataset(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "manifest.json").write_text('{"format": "other"}')
    assert not is_synthetic_dir(tmp_path / "plain")
    assert not is_synthetic_dir(tmp_path / "nowhere")
    with pytest.raises(SynthkdError, match="not a synthkd synthetic-set manifest"):
        SyntheticDataset(tmp_path / "plain")


def test_resume_with_different_world_size(tmp_path):
    out = tmp_path / "set"
    num_images, shard_size = 22, 2  # 11 shards
    # First run: 3 ranks; rank 0 finishes two of its shards, rank 1 one, rank 2 none, then a kill.
    old = [make_writer(out, num_images=num_images, shard_size=shard_size, accelerator=Rank(r, 3)) for r in range(3)]
    assert_fair_partition([w.pending_shards() for w in old], set(range(11)))
    done = set(old[0].pending_shards()[:2] + old[1].pending_shards()[:1])
    write(old[0], old[0].pending_shards()[:2])
    write(old[1], old[1].pending_shards()[:1])

    # Resume with 2 ranks: together they take exactly the missing shards, none twice.
    new = [make_writer(out, num_images=num_images, shard_size=shard_size, accelerator=Rank(r, 2)) for r in range(2)]
    pending = [w.pending_shards() for w in new]
    assert_fair_partition(pending, set(range(11)) - done)
    for w in new:
        write(w)
    manifests = [w.finalize() for w in new]
    assert manifests[0] == manifests[1]
    manifest = manifests[0]
    assert [s["file"] for s in manifest["shards"]] == [shard_name(i) for i in range(11)]
    ranks = {s["file"]: s["rank"] for s in manifest["shards"]}
    assert all(ranks[shard_name(i)] == r for r, ids in enumerate(pending) for i in ids)  # who made it
    data = SyntheticDataset(out)
    assert len(data) == num_images
    assert torch.bincount(data.targets).tolist() == manifest["counts_per_class"] == [8, 7, 7]


def test_finalize_reports_missing_shards(tmp_path):
    out = tmp_path / "set"
    ranks = [make_writer(out, num_images=8, shard_size=2, accelerator=Rank(r, 2)) for r in range(2)]
    write(ranks[0])  # rank 1 never writes its shards (1 and 3)
    with pytest.raises(SynthkdError, match=rf"missing 2 of 4 shards \({shard_name(1)}, {shard_name(3)}\)"):
        ranks[0].finalize()
    assert not (out / "manifest.json").exists()


def write_reported_set(out, reverse: bool) -> None:
    """A small set whose shards carry reports, their keys inserted in either order."""
    writer = make_writer(out, num_images=6, shard_size=2)
    for shard_id in writer.pending_shards():
        items = [("drawn", [shard_id, 1, 2]), ("kept", 2), ("rejected", shard_id)]
        report = dict(reversed(items) if reverse else items)
        writer.write_shard(shard_id, *fake_batch(writer, shard_id), report=report)
    writer.finalize()


def test_identical_runs_write_identical_bytes(tmp_path):
    """Shard bytes depend only on their contents, not on the process (safetensors writes its
    metadata in hash order) nor on the order a report was built in: identical runs, identical sha256."""
    script = "import sys; from test_shards import write_reported_set; write_reported_set(sys.argv[1], sys.argv[2] == '1')"
    for name, reverse in (("a", False), ("b", True)):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / name), str(int(reverse))],
                       cwd=Path(__file__).parent, check=True, timeout=120)
    write_reported_set(tmp_path / "c", reverse=False)
    digests = [
        {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / name).glob("shard-*.safetensors")}
        for name in "abc"
    ]
    assert len(digests[0]) == 3 and digests[0] == digests[1] == digests[2]
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text()) for name in "abc"]
    assert manifests[0] == manifests[1] == manifests[2]
    assert manifests[0]["report"]["kept"] == 6


ACTIVATION_SHAPES = [(2, 3), (4,)]


def activation_writer(out, num_inputs=5) -> ActivationWriter:
    record = {"method": "fake", "config": {"cuts": ["layer1"]}, "teacher": {"fingerprint": "abc123"}}
    return ActivationWriter(out, record, ACTIVATION_SHAPES, num_inputs=num_inputs, shard_size=2, accelerator=None)


def activation_inputs(writer: ActivationWriter, k: int, shard: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(10 * k + shard)
    return torch.randn(writer.shard_count(shard), *ACTIVATION_SHAPES[k], generator=generator)


def test_activation_sets_resume_through_the_same_store(tmp_path):
    out = tmp_path / "activations"
    first = activation_writer(out)
    jobs = first.pending()
    assert sorted(jobs) == [(k, s) for k in range(2) for s in range(3)]
    for k, s in jobs[:4]:  # then "killed"
        first.write(k, s, activation_inputs(first, k, s))
    with pytest.raises(ValueError, match="shape"):
        first.write(*jobs[4], torch.zeros(1, 9))

    second = activation_writer(out)
    assert sorted(second.pending()) == sorted(jobs[4:])
    for k, s in second.pending():
        second.write(k, s, activation_inputs(second, k, s))
    manifest = second.finalize()
    assert [[shard["count"] for shard in shards] for shards in manifest["neighbourhoods"]] == [[2, 2, 1]] * 2
    data = ActivationDataset(out)
    assert len(data) == 5 and [x.shape for x in data[4]] == [(2, 3), (4,)]
    assert torch.equal(data.inputs[1][2:4], activation_inputs(second, 1, 1))

    # A finished set from before the shared store (no progress files) is recognised as finished,
    # and one interrupted then (shards, no manifest) resumes by adopting its shards.
    shutil.rmtree(out / "progress")
    assert activation_writer(out).finalize() == manifest
    shutil.rmtree(out / "progress", ignore_errors=True)
    (out / "manifest.json").unlink()
    (out / "nb-01" / shard_name(2)).unlink()
    third = activation_writer(out)
    assert third.pending() == [(1, 2)]
    third.write(1, 2, activation_inputs(third, 1, 2))
    assert third.finalize() == manifest  # deterministic bytes: the same checksums
    with pytest.raises(SynthkdError, match="other settings"):
        activation_writer(out, num_inputs=6)
