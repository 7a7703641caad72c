"""Hostile inputs before any decode: links and FIFOs in the video folder, option values ffmpeg cannot produce or
that allocate without bound, name templates, CSV fields that cannot become a tar member name, split names, the
SLURM environment."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import pytest
from conftest import audioset_args, load_tool
from test_hostile_pre_job import args_with_videos, demo_ytids, keys_in

from preprocess.cli import add_job_arguments, check_options, partition
from preprocess.datasets import ClipRow, DatasetError, read_audioset_segments, split_name_from_segments
from preprocess.job_state import JobError
from preprocess.vggsound import read_vggsound
from preprocess.videos import AUDIOSET_NAME_TEMPLATES, VideoIndex, check_name_templates
from shards.manifest import load_manifest
from shards.schema import MAX_FRAMES

shard_audioset = load_tool("shard_audioset")

HEADER = "# Segments csv\n# num_ytids=1\n# YTID, start_seconds, end_seconds, positive_labels\n"


def row(ytid: str) -> ClipRow:
    return ClipRow(f"{ytid}_0", ytid, 0.0, 10.0, (0,), "x.csv:4")


def test_links_that_loop_or_dangle_folders_and_fifos_are_not_videos(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "loop1.mp4").symlink_to("loop2.mp4")
    (folder / "loop2.mp4").symlink_to("loop1.mp4")
    (folder / "self.mp4").symlink_to("self.mp4")
    (folder / "dangling.mp4").symlink_to(tmp_path / "nowhere.mp4")
    (folder / "sub.mp4").mkdir()
    os.mkfifo(folder / "fifo.mp4")
    (folder / "good.mp4").write_bytes(b"")
    (folder / "link.mp4").symlink_to("good.mp4")
    index = VideoIndex(folder)
    for ytid in ("loop1", "loop2", "self", "dangling", "sub", "fifo"):
        with pytest.raises(FileNotFoundError, match=f"clip {ytid}_0"):
            index.find(row(ytid), AUDIOSET_NAME_TEMPLATES)
    assert index.find(row("good"), AUDIOSET_NAME_TEMPLATES) == folder / "good.mp4"
    assert index.find(row("link"), AUDIOSET_NAME_TEMPLATES) == folder / "link.mp4"


def test_a_link_loop_in_the_video_folder_is_a_missing_clip(demo, tmp_path):
    videos = tmp_path / "videos"
    shutil.copytree(demo.videos_dir, videos)
    ytid = demo_ytids(demo)[0]
    (videos / f"{ytid}.mp4").unlink()
    (videos / f"{ytid}.mp4").symlink_to(f"{ytid}.mp4")
    (videos / "a-folder").mkdir()
    (videos / "dangling.mp4").symlink_to(tmp_path / "nowhere")
    out = tmp_path / "out"
    assert shard_audioset.main(args_with_videos(demo, out, videos, "--limit", "3")) == 0
    assert [(f["key"], f["reason"]) for f in load_manifest(out).failures] == [(f"{ytid}_0", "missing_file")]
    assert len(keys_in(out)) == 2


def test_frames_per_clip_are_bounded_by_the_shard_schema() -> None:
    parser = argparse.ArgumentParser()
    add_job_arguments(parser)
    check_options(parser.parse_args(["--videos", "v", "--frames", str(MAX_FRAMES)]))
    with pytest.raises(JobError, match=rf"--frames must be in 1\.\.{MAX_FRAMES} "):
        check_options(parser.parse_args(["--videos", "v", "--frames", str(MAX_FRAMES + 1)]))


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--short-side", "255", "--short-side must be an even number of pixels in 16..4096"),
        ("--short-side", "8", "--short-side must be an even"),
        ("--short-side", "100000", "--short-side must be an even"),
        ("--segment-seconds", "0", "--segment-seconds must be in [0.01, 3600]"),
        ("--segment-seconds", "-1", "--segment-seconds must be in"),
        ("--segment-seconds", "nan", "--segment-seconds must be in"),
        ("--segment-seconds", "inf", "--segment-seconds must be in"),
        ("--segment-seconds", "86400", "--segment-seconds must be in"),
        ("--frames", "0", f"--frames must be in 1..{MAX_FRAMES}"),
        ("--frames", str(MAX_FRAMES + 1), f"--frames must be in 1..{MAX_FRAMES}"),
        ("--shard-size", "0", "--shard-size must be in 1..10000"),
        ("--shard-size", "1000000000", "--shard-size must be in 1..10000"),
        ("--workers", "0", "--workers must be in 1..1024"),
        ("--workers", "-3", "--workers must be in 1..1024"),
        ("--limit", "0", "--limit must be at least 1"),
        ("--seed", "-1", "--seed must be at least 0"),
        ("--num-jobs", "0", "--num-jobs must be at least 1"),
        ("--decode-timeout", "0", "--decode-timeout must be a positive number of seconds"),
        ("--decode-timeout", "nan", "--decode-timeout must be a positive"),
    ],
)
def test_option_out_of_range_is_refused_before_any_work(demo, tmp_path, capsys, option, value, says):
    out = tmp_path / "out"
    assert shard_audioset.main([*audioset_args(demo, out), option, value]) == 1
    err = capsys.readouterr().err
    assert says in err and "got " in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("template", "says"),
    [
        ("{ytid:>999999999}.mp4", "widths <= 99"),  # would allocate a GB string per row
        ("{start:{end_s}}.mp4", "no nested fields"),  # a width taken from the CSV
        ("{ytid.__class__}.mp4", "KeyError"),
        ("{ytid[0]}.mp4", "KeyError"),
        ("{id}.mp4", "KeyError"),
        ("{ytid:d}.mp4", "ValueError"),
        ("{ytid", "ValueError"),
        ("../{ytid}.*", "file names in the folder, not paths"),  # formerly: every clip 'missing_file'
    ],
)
def test_bad_name_template_stops_the_job_before_any_work(demo, tmp_path, capsys, template, says):
    out = tmp_path / "out"
    assert shard_audioset.main([*audioset_args(demo, out), "--name-template", template]) == 1
    err = capsys.readouterr().err
    assert says in err and "{start_ms}" in err and not out.exists()  # formerly: every clip 'missing_file'
    with pytest.raises(DatasetError):
        check_name_templates([template])


def test_good_templates_pass_the_check():
    check_name_templates([*AUDIOSET_NAME_TEMPLATES, "{ytid}_{start_s:06d}.*", "clip-{ytid!s}-{end:.1f}s.[mw]*"])


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("a" * 65 + ', 0, 10, ""', "at most 64"),  # its member names would not fit a tar header
        ('abc, 1e300, 1e301, ""', "[0, 1000000]"),  # key abc_1000...0 with 300 digits
        ('abc, 0, 99999999, ""', "[0, 1000000]"),
    ],
)
def test_csv_fields_that_cannot_become_a_member_name_name_the_line(tmp_path, line, says):
    path = tmp_path / "eval_segments.csv"
    path.write_text(HEADER + line + "\n")
    with pytest.raises(DatasetError, match=r"eval_segments\.csv:4") as err:
        read_audioset_segments(path, [])
    assert says in str(err.value) and len(str(err.value)) < 300  # the field is quoted cut short


@pytest.mark.parametrize("start", ["1_0", "１０", "1e1", "-0", "0x10", "nan", "inf", "10."])
def test_seconds_are_digits_with_an_optional_point(tmp_path, start):
    path = tmp_path / "eval_segments.csv"
    path.write_text(HEADER + f'abc, {start}, 20, ""\n', encoding="utf-8")
    if start == "10.":
        assert read_audioset_segments(path, [])[0].start_s == 10.0
        return
    with pytest.raises(DatasetError, match=r"eval_segments\.csv:4: start .* is not a number of seconds"):
        read_audioset_segments(path, [])


def test_vggsound_start_out_of_range_names_the_line(tmp_path):
    path = tmp_path / "vggsound.csv"
    path.write_text("abc,1,dog,train\nabd," + "9" * 400 + ",dog,train\n")
    shown = r"start '9{40}'… \(360 more characters\)"
    with pytest.raises(DatasetError, match=rf"vggsound\.csv:2: {shown} is not a whole number of seconds in"):
        read_vggsound(path, "train")


@pytest.mark.parametrize("name", ["..csv", "...csv", "_segments.csv", ".hidden_segments.csv", "a b.csv"])
def test_split_name_that_is_not_a_folder_name_is_refused(name):
    with pytest.raises(DatasetError, match="not a usable split name"):
        split_name_from_segments(Path("/data") / name)


def test_segments_file_named_dot_dot_does_not_shard_into_the_parent(demo, tmp_path, capsys, monkeypatch):
    odd = tmp_path / "..csv"
    odd.write_text(demo.train_csv.read_text())
    monkeypatch.chdir(tmp_path)
    args = audioset_args(demo, tmp_path / "unused")
    del args[args.index("--out") : args.index("--out") + 2]  # the default: data/shards/audioset/<split>
    args[1] = str(odd)
    assert shard_audioset.main(args) == 1
    assert "not a usable split name" in capsys.readouterr().err and not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    "env",
    [{"SLURM_ARRAY_TASK_COUNT": "four"}, {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": ""}],
)
def test_garbage_slurm_variables_are_named(env):
    with pytest.raises(JobError, match="environment variable SLURM_ARRAY_TASK_"):
        partition(None, None, env)
