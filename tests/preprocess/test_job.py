"""The shard job end to end on clips made by ffmpeg: shards, manifest, failures, determinism, resume, DALI."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO_SECONDS, audioset_args, load_tool, tool_command
from media import make_clip, make_not_a_video

from preprocess.datasets import read_audioset_classes, read_audioset_segments
from preprocess.job_state import STATE_DIR, plan_shards
from shards.index import index_from_tar
from shards.manifest import load_manifest
from shards.schema import FAILURES_NAME, SchemaError, decode_sample
from shards.tar import iter_tar_samples

shard_audioset = load_tool("shard_audioset")
shard_vggsound = load_tool("shard_vggsound")


def read_split(folder: Path) -> dict[str, object]:
    """Every sample of a split, read back through the schema, by key."""
    manifest = load_manifest(folder)
    samples = {}
    for shard in manifest.shards:
        for key, members in iter_tar_samples(folder / shard.name):
            samples[key] = decode_sample(key, members, manifest.features, manifest.num_classes)
    return samples


def test_plan_is_a_seeded_partition():
    plan = plan_shards(10, 3, seed=1)
    assert [len(p) for p in plan] == [3, 3, 2, 2]
    assert sorted(np.concatenate(plan).tolist()) == list(range(10))
    assert [p.tolist() for p in plan] == [p.tolist() for p in plan_shards(10, 3, seed=1)]
    assert [p.tolist() for p in plan] != [p.tolist() for p in plan_shards(10, 3, seed=2)]


def test_audioset_split_end_to_end(demo, tmp_path, capsys):
    out = tmp_path / "train"
    assert shard_audioset.main(audioset_args(demo, out, "--shard-size", "4", "--workers", "2")) == 0
    assert "9 samples in 3 shards (0 without audio, 0 shorter than the segment, padded); skipped: none" in (
        capsys.readouterr().out
    )
    manifest = load_manifest(out)
    assert manifest.clips == {"no_audio": 0, "padded": 0}
    classes = read_audioset_classes(demo.class_labels_csv)
    rows = {r.key: r for r in read_audioset_segments(demo.train_csv, [mid for mid, _ in classes])}
    samples = read_split(out)
    assert set(samples) == set(rows) and manifest.num_samples == 9 and len(manifest.shards) == 3
    for key, sample in samples.items():
        assert tuple(sample.labels) == rows[key].labels
        assert sample.meta["has_audio"] and sample.meta["frames_decoded"] == 8
        assert sample.logmel.shape == (200, 128)
    for shard in manifest.shards:  # the index beside each shard is what reading the tar gives
        assert (out / shard.index_name).read_text() == index_from_tar(out / shard.name)
    real = np.concatenate(
        [s.logmel[: s.meta["fbank_frames_computed"]].astype(np.float64).ravel() for s in samples.values()]
    )
    assert manifest.logmel.mean == pytest.approx(real.mean(), abs=1e-2)
    assert manifest.logmel.std == pytest.approx(real.std(), abs=1e-2)
    assert [c["id"] for c in manifest.classes] == [mid for mid, _ in classes] and manifest.multi_label
    order = [key for shard in manifest.shards for key, _ in iter_tar_samples(out / shard.name)]
    assert order != sorted(order, key=list(rows).index)  # shuffled across shards


@pytest.mark.slow
def test_same_inputs_give_the_same_shards(demo, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert shard_audioset.main(audioset_args(demo, a, "--shard-size", "4", "--workers", "1")) == 0
    assert shard_audioset.main(audioset_args(demo, b, "--shard-size", "4", "--workers", "2")) == 0
    assert (a / "manifest.json").read_text().replace(str(a), "") == (b / "manifest.json").read_text().replace(
        str(b), ""
    )
    for shard in load_manifest(a).shards:
        assert (a / shard.name).read_bytes() == (b / shard.name).read_bytes()


def test_second_run_does_nothing_and_other_arguments_are_refused(demo, tmp_path, capsys):
    out = tmp_path / "train"
    assert shard_audioset.main(audioset_args(demo, out, "--shard-size", "4")) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert shard_audioset.main(audioset_args(demo, out, "--shard-size", "4")) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert shard_audioset.main(audioset_args(demo, out, "--shard-size", "5")) == 1
    err = capsys.readouterr().err
    assert "shard_size" in err and str(out) in err


@pytest.mark.slow
def test_bad_clips_are_recorded_and_the_job_goes_on(demo, tmp_path, capsys):
    videos = tmp_path / "videos"
    shutil.copytree(demo.videos_dir, videos)
    lines = demo.train_csv.read_text().splitlines()
    ytids = [line.split(",")[0] for line in lines[3:]]
    make_not_a_video(videos / f"{ytids[0]}.mp4")
    (videos / f"{ytids[1]}.mp4").unlink()
    (videos / f"{ytids[2]}.mp4").unlink()
    make_clip(videos / f"{ytids[2]}.m4a", video=False)
    (videos / f"{ytids[3]}.mp4").unlink()
    make_clip(videos / f"{ytids[3]}.mp4", audio=False)
    (videos / f"{ytids[4]}.mp4").unlink()
    make_clip(videos / f"{ytids[4]}.mp4", seconds=DEMO_SECONDS / 2)  # ends halfway through its segment
    args = ["--segments", str(demo.train_csv), "--labels", str(demo.class_labels_csv), "--videos", str(videos),
            "--out", str(tmp_path / "out"), "--segment-seconds", str(DEMO_SECONDS), "--quiet"]  # fmt: skip
    assert shard_audioset.main(args) == 0
    summary = capsys.readouterr().out
    assert "6 samples in 1 shards (1 without audio, 1 shorter than the segment, padded)" in summary
    assert "1 missing_file" in summary and "1 no_video" in summary
    manifest = load_manifest(tmp_path / "out")
    assert manifest.clips == {"no_audio": 1, "padded": 1}
    reasons = {f["key"].rsplit("_", 1)[0]: f["reason"] for f in manifest.failures}
    assert reasons == {ytids[0]: "unreadable", ytids[1]: "missing_file", ytids[2]: "no_video"}
    with open(tmp_path / "out" / FAILURES_NAME) as f:
        rows = list(csv.DictReader(f))
    assert {r["reason"] for r in rows} == {"unreadable", "missing_file", "no_video"}
    assert all(r["source"].startswith(str(demo.train_csv)) for r in rows)
    silent = read_split(tmp_path / "out")[f"{ytids[3]}_0"]
    assert silent.meta["has_audio"] is False
    assert shard_audioset.main([*args[:-3], "--out", str(tmp_path / "req"), "--require-audio", "--quiet",
                                "--segment-seconds", str(DEMO_SECONDS)]) == 0  # fmt: skip
    assert {f["reason"] for f in load_manifest(tmp_path / "req").failures} >= {"no_audio"}


@pytest.mark.slow
def test_killed_job_resumes_to_the_same_shards(demo, tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    args = ["--shard-size", "1", "--workers", "1"]
    assert shard_audioset.main(audioset_args(demo, clean, *args)) == 0
    proc = subprocess.Popen(tool_command("shard_audioset", *audioset_args(demo, killed, *args)), start_new_session=True)
    deadline = time.monotonic() + 60
    while not list((killed / STATE_DIR).glob("shard-*.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (killed / STATE_DIR).glob("shard-*.json"))
    assert done and len(done) < 9, f"the job was not killed mid-way ({len(done)} of 9 shards done)"
    assert not (killed / "manifest.json").exists()
    kept = {p: (killed / STATE_DIR / p).stat().st_mtime_ns for p in done}
    assert subprocess.run(tool_command("shard_audioset", *audioset_args(demo, killed, *args))).returncode == 0
    assert {p: (killed / STATE_DIR / p).stat().st_mtime_ns for p in done} == kept  # finished shards not redone
    assert not list(killed.glob("*.tmp"))
    assert (killed / "manifest.json").read_text().replace(str(killed), "") == (
        clean / "manifest.json"
    ).read_text().replace(str(clean), "")
    assert sorted(read_split(killed)) == sorted(read_split(clean))


# Run in a fresh interpreter: the shard tool, each decoding worker noting whether torch was imported before its own
# start-up ran, and the job's process noting whether it imported torch at all.
SPY_ON_TORCH = """
import runpy, sys
from pathlib import Path
import preprocess.job as job
report, tool = Path(sys.argv[1]), sys.argv[2]
init_worker = job._init_worker

def spy(*args):
    with report.open("a") as f:
        f.write(f"worker {'torch' in sys.modules}\\n")
    init_worker(*args)

job._init_worker = spy
sys.argv = [tool, *sys.argv[3:]]
try:
    runpy.run_path(tool, run_name="__main__")
finally:
    with report.open("a") as f:
        f.write(f"job {'torch' in sys.modules}\\n")
"""


def test_workers_share_the_jobs_torch_and_a_done_job_never_imports_it(demo, tmp_path):
    out, report = tmp_path / "train", tmp_path / "report.txt"
    command = [sys.executable, "-c", SPY_ON_TORCH, str(report), tool_command("shard_audioset")[1],
               *audioset_args(demo, out, "--shard-size", "4", "--workers", "2")]  # fmt: skip
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert report.read_text().splitlines() == ["worker True", "worker True", "job True"]
    report.unlink()
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert report.read_text().splitlines() == ["job False"]  # nothing to decode: no workers, no torch


def test_limit_takes_the_first_rows(demo, tmp_path):
    assert shard_audioset.main(audioset_args(demo, tmp_path / "l", "--limit", "3")) == 0
    assert load_manifest(tmp_path / "l").num_samples == 3


def test_vggsound_split_end_to_end(demo, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    rows = []
    for i, line in enumerate(demo.train_csv.read_text().splitlines()[3:] + demo.eval_csv.read_text().splitlines()[3:]):
        ytid = line.split(",")[0]
        start = 30 * i
        shutil.copy(demo.videos_dir / f"{ytid}.mp4", videos / f"{ytid}_{start:06d}.mp4")
        label = "dog barking" if i % 2 else "playing bass guitar, electric"
        rows.append(f'{ytid},{start},"{label}",{"test" if i >= 9 else "train"}')
    (tmp_path / "vggsound.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "vgg"
    args = ["--csv", str(tmp_path / "vggsound.csv"), "--videos", str(videos), "--split", "test", "--out", str(out),
            "--segment-seconds", str(DEMO_SECONDS), "--quiet"]  # fmt: skip
    assert shard_vggsound.main(args) == 0
    manifest = load_manifest(out)
    assert manifest.num_samples == 3 and not manifest.multi_label
    assert [c["name"] for c in manifest.classes] == ["dog barking", "playing bass guitar, electric"]
    for key, sample in read_split(out).items():
        assert len(sample.labels) == 1 and key.endswith(f"_{int(key.rsplit('_', 1)[1]):06d}")


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["shard_audioset", "shard_vggsound", "make_demo_data", "bench_preprocess"])
def test_tools_have_help_and_usage_errors(tool):
    help_run = subprocess.run(tool_command(tool, "--help"), capture_output=True, text=True)
    assert help_run.returncode == 0 and "usage:" in help_run.stdout
    assert subprocess.run(tool_command(tool, "--no-such-flag"), capture_output=True).returncode == 2


@pytest.mark.slow
def test_missing_inputs_exit_1_naming_the_file(demo, tmp_path):
    run = subprocess.run(
        tool_command("shard_audioset", "--segments", str(tmp_path / "nope.csv"), "--labels",
                     str(demo.class_labels_csv), "--videos", str(demo.videos_dir), "--out", str(tmp_path / "o")),
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 1 and "nope.csv" in run.stderr
    with pytest.raises(SchemaError, match="no manifest"):
        load_manifest(tmp_path / "o")


@pytest.mark.dali
def test_dali_reads_the_shards_with_our_index(demo, tmp_path):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    out = tmp_path / "train"
    assert shard_audioset.main(audioset_args(demo, out, "--shard-size", "4")) == 0
    manifest = load_manifest(out)
    tars = [str(out / s.name) for s in manifest.shards]
    for tar in tars:  # DALI's own index tool (it shells out to GNU tar) gives the same file byte for byte
        dali_idx = tmp_path / "dali.idx"
        subprocess.run([sys.executable, "-m", "wds2idx", tar, str(dali_idx)], check=True, capture_output=True)
        assert dali_idx.read_text() == Path(tar).with_suffix(".idx").read_text()

    @pipeline_def(batch_size=manifest.num_samples, num_threads=1, device_id=None)
    def read_all():
        jpeg, mel, labels = fn.readers.webdataset(
            paths=tars, index_paths=[t.removesuffix(".tar") + ".idx" for t in tars],
            ext=["frame00.jpg", "logmel.f16", "labels.i32"], dtypes=[types.UINT8, types.FLOAT16, types.INT32],
            missing_component_behavior="error",
        )  # fmt: skip
        return fn.decoders.image(jpeg, device="cpu"), mel, labels

    pipe = read_all()
    pipe.build()
    images, mels, labels = pipe.run()
    ours = read_split(out)
    order = [key for s in manifest.shards for key, _ in iter_tar_samples(out / s.name)]
    for i, key in enumerate(order):
        assert np.array_equal(np.array(mels[i]).reshape(200, 128), ours[key].logmel)
        assert np.array(labels[i]).tolist() == ours[key].labels.tolist()
        assert np.array(images[i]).shape[0] == 256


def test_manifest_is_json_with_per_shard_checksums(demo, tmp_path):
    out = tmp_path / "m"
    assert shard_audioset.main(audioset_args(demo, out, "--shard-size", "5")) == 0
    data = json.loads((out / "manifest.json").read_text())
    assert data["schema_version"] == 2 and data["num_samples"] == 9 and data["features"]["fbank_frames"] == 200
    assert all(len(s["sha256"]) == 64 and s["bytes"] == (out / s["name"]).stat().st_size for s in data["shards"])


def test_progress_in_a_log_file_is_plain_lines(demo, tmp_path):
    """Sharding with its output going to a file (a SLURM .out): a plain progress line (here only the last: a line
    every 30 s), then the summary; no carriage return of a progress bar."""
    args = [a for a in audioset_args(demo, tmp_path / "out") if a != "--quiet"]
    with open(tmp_path / "job.out", "w") as log:
        subprocess.run(tool_command("shard_audioset", *args), stdout=log, stderr=subprocess.STDOUT, check=True)
    text = (tmp_path / "job.out").read_text()
    assert "\r" not in text
    progress, summary = text.splitlines()
    assert progress.startswith("audioset/balanced_train 9/9 clips/s ") and progress.endswith(" eta 0:00:00")
    assert summary.startswith(f"{tmp_path / 'out'}: 9 samples in 1 shards (0 without audio")
