"""Split verification: real shards of the demo dataset, damaged one way per test, must be reported by file and key."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_tool
from torchvision.io import encode_jpeg

from experiments.demo_data import make_demo_dataset
from preprocess import verify
from preprocess.verify import VerifyReport, verify_split
from shards.schema import LABELS_DTYPE, LOGMEL_DTYPE, LOGMEL_EXT, MANIFEST_NAME, frame_ext, sample_exts
from shards.tar import iter_tar_samples
from shards.writer import ShardWriter

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg (apt-get install ffmpeg)")

REPO = Path(__file__).resolve().parents[2]
SHARD0, SHARD1 = "shard-000000.tar", "shard-000001.tar"
IDX0, IDX1 = "shard-000000.idx", "shard-000001.idx"
BLOCK = tarfile.BLOCKSIZE
Samples = list[tuple[str, dict[str, bytes]]]


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sound split: 6 training clips of the demo dataset in two shards of 3."""
    demo = make_demo_dataset(tmp_path_factory.mktemp("demo"), clips=8, seconds=2.0, workers=2)
    out = tmp_path_factory.mktemp("shards") / "train"
    argv = ["--segments", str(demo.train_csv), "--labels", str(demo.class_labels_csv)]
    argv += ["--videos", str(demo.videos_dir), "--out", str(out), "--segment-seconds", "2", "--fps", "4"]
    argv += ["--shard-size", "3"]
    assert load_tool("shard_audioset").main([*argv, "--quiet"]) == 0
    return out


@pytest.fixture
def split(clean: Path, tmp_path: Path) -> Path:
    """A copy of the clean split to damage."""
    return Path(shutil.copytree(clean, tmp_path / "train"))


def keys_of(folder: Path, shard: str) -> list[str]:
    return [key for key, _ in iter_tar_samples(folder / shard)]


def edit_manifest(folder: Path, edit: Callable[[dict], None]) -> None:
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=1))


def rewrite_shard(folder: Path, shard: str, edit: Callable[[Samples], Samples]) -> None:
    """Write `shard` again with its samples passed through `edit`, and fix the manifest's bytes, sha256 and
    counts so that only the checks of the samples themselves can catch the edit."""
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    exts = sample_exts(manifest["features"]["num_frames"])
    samples = edit(list(iter_tar_samples(folder / shard)))
    with ShardWriter(folder / shard) as writer:
        for key, members in samples:
            writer.add(key, [(f"{key}.{ext}", members[ext]) for ext in exts])
        info = writer.close()

    def fix(data: dict) -> None:
        entry = next(s for s in data["shards"] if s["name"] == shard)
        entry.update(bytes=info.bytes, sha256=info.sha256, num_samples=info.num_samples)
        data["num_samples"] = sum(s["num_samples"] for s in data["shards"])

    edit_manifest(folder, fix)


def replace_member(index: int, ext: str, payload: bytes) -> Callable[[Samples], Samples]:
    """An edit for `rewrite_shard`: member `ext` of sample `index` becomes `payload`."""

    def edit(samples: Samples) -> Samples:
        samples[index][1][ext] = payload
        return samples

    return edit


def member_offset(folder: Path, idx: str, sample: int, ext: str) -> int:
    """Data offset of member `ext` of sample `sample`, read from the DALI index."""
    tokens = (folder / idx).read_text().splitlines()[1 + sample].split()
    return int(tokens[tokens.index(ext) + 1])


def only_error(report: VerifyReport) -> str:
    assert len(report.errors) == 1, report.errors
    return report.errors[0]


def test_clean_split_is_ok(clean: Path) -> None:
    report = verify_split(clean)
    assert report.errors == []
    assert (report.num_shards, report.num_samples, report.frames_decoded) == (2, 6, 48)
    assert report.summary().startswith("OK: 6 samples in 2 shards")


def test_flipped_jpeg_byte_is_a_sha256_mismatch(split: Path) -> None:
    offset = member_offset(split, IDX1, 1, frame_ext(3)) + 300
    data = bytearray((split / SHARD1).read_bytes())
    data[offset] ^= 0x01
    (split / SHARD1).write_bytes(data)
    report = verify_split(split)
    assert "sha256" in report.errors[0]
    assert all(error.startswith(f"{SHARD1}: ") for error in report.errors)
    assert "_state/shard-000001.json" in report.errors[0]
    assert "tools/shard_audioset.py" in report.errors[0]


@pytest.mark.parametrize(
    ("damage", "last_good_sample"),
    [
        ("cut_in_a_payload", 0),  # tarfile raises ReadError
        ("cut_at_a_header", 1),  # tarfile stops silently: only the missing end-of-archive marker tells
        ("junk_header", 0),  # tarfile stops silently at an invalid header past the first
    ],
)
def test_damaged_tar_names_the_last_sample_read(split: Path, damage: str, last_good_sample: int) -> None:
    key = keys_of(split, SHARD1)[last_good_sample]
    data = bytearray((split / SHARD1).read_bytes())
    if damage == "cut_in_a_payload":
        data = data[: member_offset(split, IDX1, 1, LOGMEL_EXT) + 100]
    elif damage == "cut_at_a_header":
        data = data[: member_offset(split, IDX1, 2, frame_ext(0)) - BLOCK]
    else:
        header = member_offset(split, IDX1, 1, frame_ext(0)) - BLOCK
        data[header : header + BLOCK] = b"junk" * (BLOCK // 4)
    (split / SHARD1).write_bytes(data)
    report = verify_split(split)
    assert len(report.errors) == 2, report.errors
    assert report.errors[0].startswith(f"{SHARD1}: {len(data)} bytes" if "cut" in damage else f"{SHARD1}: sha256")
    assert report.errors[1].startswith(f"{SHARD1}: cannot be read after sample {key} (")


def test_tar_that_is_not_a_tar_is_an_error(split: Path) -> None:
    (split / SHARD0).write_bytes(b"x" * 100)
    report = verify_split(split)
    assert any(error.startswith(f"{SHARD0}: cannot be read before its first sample") for error in report.errors)


def test_missing_shard(split: Path) -> None:
    (split / SHARD0).unlink()
    error = only_error(verify_split(split))
    assert error.startswith(f"{SHARD0}: listed in {MANIFEST_NAME} but missing")


def test_missing_index(split: Path) -> None:
    (split / IDX0).unlink()
    error = only_error(verify_split(split))
    assert error.startswith(f"{IDX0}: index of {SHARD0} is missing")
    assert "_state/shard-000000.json" in error


def test_edited_index_names_the_line_and_sample(split: Path) -> None:
    lines = (split / IDX0).read_text().splitlines(keepends=True)
    tokens = lines[2].split()
    tokens[1] = str(int(tokens[1]) + 512)
    lines[2] = " ".join(tokens) + "\n"
    (split / IDX0).write_text("".join(lines))
    error = only_error(verify_split(split))
    assert error.startswith(f"{IDX0}: line 3 (sample {keys_of(split, SHARD0)[1]}) differs")


def test_manifest_sample_count(split: Path) -> None:
    def add_one(data: dict) -> None:
        data["shards"][1]["num_samples"] += 1
        data["num_samples"] += 1

    edit_manifest(split, add_one)
    error = only_error(verify_split(split))
    assert error.startswith(f"{SHARD1}: 3 samples, {MANIFEST_NAME} lists 4")


def test_manifest_total_that_does_not_add_up(split: Path) -> None:
    edit_manifest(split, lambda data: data.update(num_samples=7))
    error = only_error(verify_split(split))
    assert "num_samples is 7 but its lists add up to 6" in error


def test_stray_shard_files(split: Path) -> None:
    shutil.copy(split / SHARD0, split / "shard-000007.tar")
    shutil.copy(split / IDX0, split / "shard-000007.idx")
    report = verify_split(split)
    assert len(report.errors) == 2, report.errors
    assert report.errors[0].startswith("shard-000007.idx: not listed in manifest.json")
    assert report.errors[1].startswith("shard-000007.tar: not listed in manifest.json")


def test_logmel_of_the_wrong_size_is_a_schema_error(split: Path) -> None:
    key = keys_of(split, SHARD0)[1]
    rewrite_shard(split, SHARD0, replace_member(1, LOGMEL_EXT, b"\0" * 100))
    error = only_error(verify_split(split))
    assert error.startswith(f"{SHARD0}: {key}: {LOGMEL_EXT} has 100 bytes")


def test_non_finite_logmel(split: Path) -> None:
    key = keys_of(split, SHARD1)[2]
    logmel = np.zeros((200, 128), LOGMEL_DTYPE)
    logmel[5, 7] = np.nan
    rewrite_shard(split, SHARD1, replace_member(2, LOGMEL_EXT, logmel.tobytes()))
    error = only_error(verify_split(split))
    assert error.startswith(f"{SHARD1}: {key}: {LOGMEL_EXT} holds 1 NaN or infinite values")


def test_frame_of_another_size(split: Path) -> None:
    key = keys_of(split, SHARD0)[0]
    other = encode_jpeg(torch.zeros(3, 256, 300, dtype=torch.uint8)).numpy().tobytes()
    rewrite_shard(split, SHARD0, replace_member(0, frame_ext(5), other))
    error = only_error(verify_split(split))
    assert error.startswith(f"{SHARD0}: {key}: frames differ in size")
    assert f"{frame_ext(5)} 300x256" in error
    assert verify_split(split, decode_jpeg=False).errors == []


def test_jpeg_that_does_not_decode(split: Path) -> None:
    key = keys_of(split, SHARD0)[2]
    rewrite_shard(split, SHARD0, replace_member(2, frame_ext(0), b"\xff\xd8" + b"junk" * 50 + b"\xff\xd9"))
    error = only_error(verify_split(split))
    assert error.startswith(f"{SHARD0}: {key}: {frame_ext(0)} does not decode")


def test_short_side_other_than_the_manifest(split: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    edit_manifest(split, lambda data: data["features"].update(short_side_px=128))
    report = verify_split(split)
    assert len(report.errors) == 6
    assert report.errors[0].startswith(f"{SHARD0}: {keys_of(split, SHARD0)[0]}: frames are ")
    assert "short side 256 px; the manifest says 128 px" in report.errors[0]
    monkeypatch.setattr(verify, "MAX_SAMPLE_ERRORS_PER_SHARD", 1)
    report = verify_split(split)
    assert len(report.errors) == 4
    assert report.errors[1].startswith(f"{SHARD0}: 2 more sample errors not listed")


def test_single_label_dataset_wants_one_label_per_clip(split: Path) -> None:
    labels = {
        key: np.frombuffer(members["labels.i32"], LABELS_DTYPE).size
        for shard in (SHARD0, SHARD1)
        for key, members in iter_tar_samples(split / shard)
    }
    edit_manifest(split, lambda data: data.update(multi_label=False))
    report = verify_split(split)
    flagged = sorted(key for key, size in labels.items() if size != 1)
    assert flagged, "the demo clips all carry several labels"
    assert len(report.errors) == len(flagged)
    assert all("is single-label" in error for error in report.errors)


def test_key_in_two_shards(split: Path) -> None:
    key = keys_of(split, SHARD0)[0]

    def rename_first(samples: Samples) -> Samples:
        return [(key, samples[0][1]), *samples[1:]]

    rewrite_shard(split, SHARD1, rename_first)
    error = only_error(verify_split(split))
    assert error.startswith(f"{SHARD1}: {key}: key also in {SHARD0}")


def test_manifest_of_another_schema_version(split: Path) -> None:
    edit_manifest(split, lambda data: data.update(schema_version=3))
    report = verify_split(split)
    assert "schema version 3" in only_error(report)
    assert report.num_shards == 0


def test_missing_manifest(split: Path) -> None:
    (split / MANIFEST_NAME).unlink()
    assert "no manifest" in only_error(verify_split(split))


def test_workers_find_what_one_process_finds(split: Path) -> None:
    (split / IDX1).unlink()
    edit_manifest(split, lambda data: data["features"].update(short_side_px=128))
    serial = verify_split(split)
    assert len(serial.errors) == 7
    assert verify_split(split, workers=2).errors == serial.errors


@pytest.mark.slow
def test_cli(clean: Path, split: Path) -> None:
    tool = [sys.executable, str(REPO / "tools" / "verify_shards.py")]
    ok = subprocess.run([*tool, str(clean), "--workers", "1"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("OK: 6 samples in 2 shards")
    (split / SHARD1).write_bytes((split / SHARD1).read_bytes()[:5000])
    failed = subprocess.run([*tool, str(split), "--no-decode"], capture_output=True, text=True)
    assert failed.returncode == 1
    assert failed.stdout.startswith("FAILED: ")
    assert f"{SHARD1}: cannot be read before its first sample (cut short" in failed.stderr  # 5000 bytes: in sample 0
    assert "Traceback" not in failed.stderr


def test_cli_usage(capsys: pytest.CaptureFixture[str]) -> None:
    main = load_tool("verify_shards").main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main([".", "--workers", "0"])
    assert exit_info.value.code == 2
    capsys.readouterr()
