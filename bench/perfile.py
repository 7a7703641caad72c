"""The per-file baseline `tools/bench_pipeline.py` measures the loaders against: data loaded the way CAV-MAE's and
AST's `src/dataloader.py` load it, at this project's output. Per clip: its frames as separate JPEG files
(`frame_{i}/{clip}.jpg`) opened with PIL and each passed through their torchvision transform (Resize(224, bicubic),
CenterCrop, ToTensor, Normalize), its audio a wav file (`{clip}.wav`) read whole, mean removed, `kaldi.fbank` per
sample (their parameters), cut or padded to the target length, SpecAugment with torchaudio's masking transforms,
normalized; labels multi-hot. The same frames as the loaders' rows (`pipelines.windows.spread_ids` of a random
window), the same output: video float32 (F, 3, 224, 224), audio float32 (1, T, 128). Theirs reads wavs with
`torchaudio.load`, which needs TorchCodec from torchaudio 2.9 on; this reads them with the standard library's
`wave` (the same int16 → float32 scaling).
"""

from __future__ import annotations

import wave
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from pipelines.config import AugmentConfig
from pipelines.reading import SampleReader
from pipelines.sources import SplitIndex
from pipelines.windows import spread_ids
from shards.schema import frame_ext

# ImageNet's statistics, as CAV-MAE normalizes
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_perfile_copy(index: SplitIndex, out: Path) -> Path:
    """`out` holding every clip of `index` as per-file data: frame_{i}/{key}.jpg (the shards' JPEG bytes) and
    {key}.wav (16 kHz mono int16 of the segment: a tone and noise, the content does not change the cost); kept
    when already there."""
    features = index.manifest.features
    done = out / "done"
    if done.exists():
        return out
    reader = SampleReader(index)
    rng = np.random.default_rng(0)
    samples = round(features.segment_s * features.sample_rate_hz)
    for n, ref in enumerate(index.samples):
        frames = reader.read(ref, [frame_ext(i) for i in range(features.num_frames)])
        for i in range(features.num_frames):
            (out / f"frame_{i}").mkdir(parents=True, exist_ok=True)
            (out / f"frame_{i}" / f"{ref.key}.jpg").write_bytes(frames[frame_ext(i)])
        t = np.arange(samples) / features.sample_rate_hz
        audio = 0.3 * np.sin(2 * np.pi * (300 + 50 * n) * t) + 0.05 * rng.standard_normal(samples)
        with wave.open(str(out / f"{ref.key}.wav"), "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(features.sample_rate_hz)
            wav.writeframes((audio * 32767).astype("<i2").tobytes())
    reader.close()
    done.touch()
    return out


def load_wav(path: Path) -> tuple[torch.Tensor, int]:
    """(float32 (channels, samples) in [-1, 1], sample rate) of a 16-bit PCM wav, as torchaudio.load returns it."""
    with wave.open(str(path), "rb") as wav:
        data = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, wav.getnchannels())
        return torch.from_numpy(data.T.astype(np.float32) / 32768.0), wav.getframerate()


class PerFileClips(Dataset):
    """Training clips of a per-file copy (`write_perfile_copy`) loaded as CAV-MAE's AudiosetDataset loads them;
    item i: (video, audio, labels)."""

    def __init__(self, index: SplitIndex, folder: Path, aug: AugmentConfig) -> None:
        self.folder, self.aug, self.features = folder, aug, index.manifest.features
        self.keys = [ref.key for ref in index.samples]
        reader = SampleReader(index)
        self.labels = [np.frombuffer(reader.read(ref, ["labels.i32"])["labels.i32"], "<i4") for ref in index.samples]
        reader.close()
        self.num_classes, self.stats = index.manifest.num_classes, index.manifest.logmel
        self.preprocess = T.Compose([
            T.Resize(aug.crop_px, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(aug.crop_px),
            T.ToTensor(),
            T.Normalize(mean=_IMAGENET_MEAN, std=_IMAGENET_STD),
        ])  # fmt: skip

    def __len__(self) -> int:
        return len(self.keys)

    def _wav2fbank(self, path: Path) -> torch.Tensor:
        waveform, rate = load_wav(path)
        waveform = waveform - waveform.mean()
        fbank = torchaudio.compliance.kaldi.fbank(
            waveform, htk_compat=True, sample_frequency=rate, use_energy=False, window_type="hanning",
            num_mel_bins=self.features.num_mel_bins, dither=0.0, frame_shift=10,
        )  # fmt: skip
        missing = self.aug.audio_frames - fbank.shape[0]
        return torch.nn.functional.pad(fbank, (0, 0, 0, missing)) if missing > 0 else fbank[: self.aug.audio_frames]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key, rng = self.keys[i], np.random.default_rng(i)
        start = int(rng.integers(0, max(self.features.fbank_frames - self.aug.audio_frames, 0) + 1))
        ids = spread_ids(start, self.aug, self.features, rng.random(self.aug.frames_used or self.features.num_frames))
        video = torch.stack([self.preprocess(Image.open(self.folder / f"frame_{j}" / f"{key}.jpg")) for j in ids])
        fbank = self._wav2fbank(self.folder / f"{key}.wav").T[None]  # (1, bins, T), as their masking expects
        fbank = torchaudio.transforms.FrequencyMasking(self.aug.freq_mask_px)(fbank)
        fbank = torchaudio.transforms.TimeMasking(self.aug.time_mask_px)(fbank)
        audio = (fbank[0].T[None] - self.stats.mean) / self.stats.std
        labels = torch.zeros(self.num_classes)
        labels[torch.from_numpy(self.labels[i].astype(np.int64))] = 1.0
        return video, audio, labels


def perfile_loader(index: SplitIndex, folder: Path, aug: AugmentConfig, batch_size: int, workers: int) -> Any:
    """A shuffling DataLoader over `PerFileClips` with `workers` worker processes (CAV-MAE's set-up)."""
    return torch.utils.data.DataLoader(
        PerFileClips(index, folder, aug), batch_size=batch_size, shuffle=True, num_workers=workers,
        persistent_workers=workers > 0, drop_last=True,
    )  # fmt: skip
