"""Which frames and log-mel rows a row shows (`pipelines.windows`), against numbers worked out by hand from DMVR's
samplers (`dmvr/processors.py`: `sample_sequence`, `sample_linspace_sequence`, `sample_or_pad_sequence_indices`)
as scenic's AudioSet config calls them: 32 frames at stride 2 of 250 (25 per second, 10 s), 800 of 1000 log-mel
rows, 4 test clips."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines import build_loader, open_split
from pipelines.config import AugmentConfig, LoaderError, consecutive_misfit, frames_problem
from pipelines.windows import (
    audio_window,
    eval_clips,
    eval_windows,
    first_frame_choices,
    real_frames,
    spread_ids,
    synced_audio_start,
    train_window,
)
from shards.schema import FeatureParams

SCENIC = AugmentConfig(frames_used=32, frame_sampling="consecutive", frame_stride=2, audio_frames=800)
FPS25 = FeatureParams(num_frames=250, segment_s=10.0)  # 1000 log-mel rows


class Draws:
    """A stand-in for np.random.Generator whose integers() returns the given values in turn (and checks the
    range asked for), and whose random() gives U[0, 1) values."""

    def __init__(self, *values: int, high: int) -> None:
        self.values, self.high = list(values), high

    def integers(self, low: int, high: int) -> int:
        assert (low, high) == (0, self.high)
        return self.values.pop(0)

    def random(self, count: int) -> np.ndarray:
        return np.full(count, 0.5)


def test_eval_windows_are_dmvrs_linspace_cast_to_int():
    assert eval_windows(1000, 800, 4) == [0, 66, 133, 200]  # tf.linspace(0., 200., 4) = 0, 66.67, 133.33, 200
    assert eval_windows(250, 64, 4) == [0, 62, 124, 186]  # frames: max_offset = 250 - 32 * 2
    assert eval_windows(200, 160, 4) == [0, 13, 26, 40]
    assert eval_windows(1000, 800, 1) == [100] and eval_windows(250, 64, 1) == [93]  # the middle: (L - n·s) // 2
    assert eval_windows(60, 64, 3) == [0, 0, 0]  # a window longer than the clip starts at 0
    with pytest.raises(ValueError, match="num_test_clips must be at least 1"):
        eval_windows(10, 5, 0)


def test_consecutive_training_rows_start_their_audio_at_their_first_frame():
    # DMVR draws the video offset from [0, max(250 - 31 * 2, 1)) = [0, 188), the audio's at the same proportion.
    assert first_frame_choices(SCENIC, FPS25) == 188
    ids, start = train_window(Draws(0, high=188), SCENIC, FPS25)
    assert ids.tolist() == list(range(0, 63, 2)) and start == 0
    ids, start = train_window(Draws(187, high=188), SCENIC, FPS25)  # the last first frame: the clip ends at 249
    assert ids.tolist() == list(range(187, 250, 2)) and ids[-1] == FPS25.num_frames - 1
    assert start == 748  # 187 / 250 * 1000: the 800-row window runs 548 rows past the clip's end
    ids, start = train_window(Draws(1, high=94), SCENIC.replace(frame_stride=1), FeatureParams(num_frames=125))
    assert ids.tolist() == list(range(1, 33)) and start == 8  # 12.5 per second at stride 1: the same 2.56 s


def test_the_audio_start_rounds_half_to_even_as_tf_math_round():
    eight_fps = FeatureParams(num_frames=80)  # first · 1000 / 80 = first · 12.5
    assert [synced_audio_start(f, eight_fps) for f in (0, 1, 2, 3, 5)] == [0, 12, 25, 38, 62]
    assert [synced_audio_start(f, FPS25) for f in (0, 1, 93, 187)] == [0, 4, 372, 748]
    firsts = np.arange(80)
    np.testing.assert_array_equal(synced_audio_start(firsts, eight_fps), np.round(firsts * 12.5).astype(int))


def test_consecutive_test_clips_are_each_modalitys_linspace():
    clips = eval_clips(SCENIC, FPS25)
    assert [start for _, start in clips] == [0, 66, 133, 200]
    assert [ids.tolist() for ids, _ in clips] == [list(range(f, f + 63, 2)) for f in (0, 62, 124, 186)]
    assert clips[-1][0][-1] == 248  # DMVR leaves room for 32 · 2 frames: the last clip ends one frame early
    ((ids, start),) = eval_clips(SCENIC.replace(num_test_clips=1), FPS25)
    assert ids[0] == 93 and start == 100


def test_consecutive_frames_that_just_fit_the_clip():
    """64 stored frames over a 10 s audio window: the first frame is 0 or 1 in training (the last frame of a row
    is then the clip's last, 63), and 0 for every test clip (DMVR's linspace leaves room for 32 · 2 frames)."""
    tight, whole = FeatureParams(num_frames=64, segment_s=10.0), SCENIC.replace(audio_frames=1000)
    assert first_frame_choices(whole, tight) == 2
    assert train_window(Draws(1, high=2), whole, tight)[0].tolist() == list(range(1, 64, 2))
    assert [int(ids[0]) for ids, _ in eval_clips(whole, tight)] == [0, 0, 0, 0]
    assert frames_problem(whole, tight) is None
    assert frames_problem(whole, FeatureParams(num_frames=63, segment_s=10.0)) is not None  # 64 / 6.3 s > 10 s


def test_spread_frames_are_the_parts_of_the_audio_window():
    features = FeatureParams(num_frames=20)  # 2 per second
    aug = AugmentConfig(frames_used=8, audio_frames=800)
    assert spread_ids(0, aug, features, None).tolist() == [1, 3, 5, 7, 9, 11, 13, 15]  # 8 s: each part 1 s
    assert spread_ids(200, aug, features, np.zeros(8)).tolist() == [4, 6, 8, 10, 12, 14, 16, 18]
    assert [start for _, start in eval_clips(aug, features)] == [0, 66, 133, 200]


def test_real_frames_ends_at_the_last_row_that_is_not_zeros():
    logmel = np.zeros((10, 3), np.float16)
    assert real_frames(logmel) == 0
    logmel[[0, 5]] = 1.0  # rows 1..4 all zeros inside the real log-mel still count
    assert real_frames(logmel) == 6
    logmel[9, 2] = -15.9  # log(eps): silence is not padding
    assert real_frames(logmel) == 10


def test_audio_windows_repeat_the_real_log_mel_or_pad_zeros():
    logmel = np.zeros((10, 2), np.float16)
    logmel[:6] = np.arange(1, 7)[:, None]  # 6 real rows (1..6), then 4 rows of the shard job's padding
    rows = audio_window(logmel, 4, 8, "repeat")[:, 0].tolist()
    assert rows == [5, 6, 1, 2, 3, 4, 5, 6]  # DMVR: rows (4 + j) mod 6
    assert audio_window(logmel, 4, 8, "zeros")[:, 0].tolist() == [5, 6, 0, 0, 0, 0, 0, 0]
    assert audio_window(logmel, 7, 4, "repeat")[:, 0].tolist() == [2, 3, 4, 5]  # a start past the real rows
    assert audio_window(logmel, 12, 3, "zeros")[:, 0].tolist() == [0, 0, 0]  # past the stored rows
    assert not audio_window(np.zeros((10, 2), np.float16), 3, 12, "repeat").any()  # padding only: zeros
    assert audio_window(logmel, 0, 6, "repeat").dtype == np.float16


def test_consecutive_frames_that_do_not_fit_are_refused_with_the_rate_that_fits():
    four_fps = FeatureParams(num_frames=40)
    assert consecutive_misfit(SCENIC, four_fps) == (16.0, 8.0, 8.0)  # 32 · 2 frames at 4 per second: 16 s
    assert "span 16 s of shards of 4 frames per second" in frames_problem(SCENIC, four_fps)
    assert consecutive_misfit(SCENIC, FPS25) is None and frames_problem(SCENIC, FPS25) is None
    assert consecutive_misfit(SCENIC.replace(frame_sampling="spread"), four_fps) is None
    assert consecutive_misfit(SCENIC, FeatureParams(num_frames=62))[2] == 8.0  # 63 frames needed, 62 held
    assert frames_problem(SCENIC.replace(frames_used=41), four_fps) == "frames_used=41, but the shards hold 40 frames"


def test_choices_are_checked():
    for name in ("frame_sampling", "audio_pad"):
        with pytest.raises(ValueError, match=f"{name} must be one of"):
            AugmentConfig(**{name: "sideways"})


def test_the_loaders_refuse_consecutive_frames_that_do_not_fit(train_shards):
    """The demo's 2 s clips at 4 frames per second: 4 frames at stride 2 span 2 s, more than a 1.6 s window."""
    aug = AugmentConfig(audio_frames=160, frames_used=4, frame_sampling="consecutive", frame_stride=2)
    with pytest.raises(LoaderError, match=r"frame_stride=2 span 2 s .* at least 5 frames per second"):
        build_loader(open_split(train_shards), train=True, batch_size=2, loader="torch", augment=aug)
