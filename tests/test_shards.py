"""The synthetic-set format: write/read round trip, resume after a kill, and corruption handling."""

from __future__ import annotations

import json

import pytest
import torch

from synthkd.data.shards import SyntheticDataset, SyntheticWriter, is_synthetic_dir, shard_name
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
    assert old[0].pending_shards() == [0, 3, 6, 9]
    assert old[1].pending_shards() == [1, 4, 7, 10]
    assert old[2].pending_shards() == [2, 5, 8]
    write(old[0], [0, 3])
    write(old[1], [1])
    done = {0, 1, 3}

    # Resume with 2 ranks: together they take exactly the missing shards, none twice.
    new = [make_writer(out, num_images=num_images, shard_size=shard_size, accelerator=Rank(r, 2)) for r in range(2)]
    pending = [w.pending_shards() for w in new]
    assert not set(pending[0]) & set(pending[1])
    assert sorted(pending[0] + pending[1]) == sorted(set(range(11)) - done)
    assert pending[0] == [2, 5, 7, 9] and pending[1] == [4, 6, 8, 10]
    for w in new:
        write(w)
    manifests = [w.finalize() for w in new]
    assert manifests[0] == manifests[1]
    manifest = manifests[0]
    assert [s["file"] for s in manifest["shards"]] == [shard_name(i) for i in range(11)]
    assert {s["file"]: s["rank"] for s in manifest["shards"]}[shard_name(10)] == 1
    data = SyntheticDataset(out)
    assert len(data) == num_images
    assert torch.bincount(data.targets).tolist() == manifest["counts_per_class"] == [8, 7, 7]


def test_finalize_reports_missing_shards(tmp_path):
    out = tmp_path / "set"
    ranks = [make_writer(out, num_images=8, shard_size=2, accelerator=Rank(r, 2)) for r in range(2)]
    write(ranks[0])  # rank 1 never writes its shards (1 and 3)
    with pytest.raises(SynthkdError, match=r"ids 1, 3"):
        ranks[0].finalize()
    assert not (out / "manifest.json").exists()
