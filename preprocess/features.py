"""Log-mel features exactly as the AST/MBT recipe computes them, cut or padded to the segment length."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shards.manifest import LogmelStats
from shards.schema import FeatureParams


class NonFiniteAudioError(ValueError):
    """The waveform or its log-mel holds NaN or ±inf: kept, the clip would make the split's mean/std NaN."""


@dataclass
class Logmel:
    """(T, num_mel_bins) float32 log-mel and what was done to reach T frames."""

    values: np.ndarray
    frames_computed: int
    pad_frames: int
    cut_frames: int

    def stats(self) -> LogmelStats:
        """Sums over the real (not padded) frames, for the split's mean/std."""
        real = self.values[: self.values.shape[0] - self.pad_frames].astype(np.float64)
        return LogmelStats(count=real.size, total=float(real.sum()), total_sq=float(np.square(real).sum()))


def compute_logmel(waveform: np.ndarray, params: FeatureParams) -> Logmel:
    """kaldi fbank of a mono waveform at `params.sample_rate_hz`, padded with zeros or cut to `fbank_frames`.

    As in AST: the waveform mean is removed, then fbank with htk_compat, Hann window, no energy, dither 0;
    a short result is zero-padded at the end (AST's ZeroPad2d), a long one cut. A waveform shorter than one
    window gives no frames, so all T frames are padding. NonFiniteAudioError when a waveform sample is not finite
    or the log-mel overflows (samples far beyond [-1, 1]).
    """
    if bad := int(np.count_nonzero(~np.isfinite(waveform))):
        raise NonFiniteAudioError(f"{bad} of {waveform.size} decoded audio samples are NaN or infinite")
    target = params.fbank_frames
    window = round(params.sample_rate_hz * params.frame_length_ms / 1000)
    if waveform.size >= window:
        import torch  # here: the shard job plans without torch's ~500 MB and seconds (preprocess.job)
        import torchaudio

        wav = torch.from_numpy(np.array(waveform, dtype=np.float32))[None]  # a writable copy
        fbank = torchaudio.compliance.kaldi.fbank(
            wav - wav.mean(),
            htk_compat=params.htk_compat,
            sample_frequency=params.sample_rate_hz,
            use_energy=params.use_energy,
            window_type=params.window_type,
            num_mel_bins=params.num_mel_bins,
            dither=params.dither,
            frame_length=params.frame_length_ms,
            frame_shift=params.frame_shift_ms,
        ).numpy()
    else:
        fbank = np.zeros((0, params.num_mel_bins), dtype=np.float32)
    if bad := int(np.count_nonzero(~np.isfinite(fbank))):
        peak = float(np.abs(waveform).max())
        raise NonFiniteAudioError(f"{bad} of {fbank.size} log-mel values are NaN or infinite (audio peak {peak:.3g})")
    computed = fbank.shape[0]
    values = np.zeros((target, params.num_mel_bins), dtype=np.float32)
    values[: min(computed, target)] = fbank[:target]
    return Logmel(
        values=values,
        frames_computed=computed,
        pad_frames=max(target - computed, 0),
        cut_frames=max(computed - target, 0),
    )
