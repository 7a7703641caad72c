"""The DALI loader: one `@pipeline_def` graph over the WebDataset shards of a split, for training and evaluation,
on the CPU (`device="cpu"`: tests, machines without a GPU) or the GPU (`device="gpu"`: JPEG decode on the GPU with
`mixed` decoding, crops, flips, normalization and SpecAugment there too). Same batches, same interface as
`pipelines.torch_loader.TorchLoader`.

Evaluation reads rank r's block of samples, `eval_range(N, r, W)` in shard order (the reader's `shard_id=r` of
`num_shards=W`, stuck to it), pads its last batch and drops the padding (`LastBatchPolicy.PARTIAL`), so every sample
is read once across ranks; each sample becomes `num_test_clips` rows with the torch loader's windows, crop and
normalization (the JPEG decoder is DALI's: see tests/test_dali_loader.py for the measured difference).

Training is one endless stream per rank: the reader shuffles rank r's block through a buffer of up to
`shuffle_buffer` samples (default SHUFFLE_BUFFER_SAMPLES) and wraps around at the block's end, so a rank never runs
dry whatever the shard sizes; an epoch is the next `train_batches(N, batch_size, W)` batches of that stream, the same
count on every rank.
Blocks are disjoint, so no sample is read by two ranks; within a rank the buffer shuffle is approximate (a sample may
come twice in an epoch and another not at all), as with any DALI reader. The stream position is saved with DALI's
pipeline checkpoint (reader position, shuffle and augmentation random states), so a restored loader continues the
stream exactly.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.config import SHUFFLE_BUFFER_SAMPLES, VIDEO_MEAN, VIDEO_STD, AugmentConfig, eval_windows
from pipelines.split import LoaderError, SplitIndex, eval_batches, eval_range, train_batches
from pipelines.stream import StreamSplit, is_stream_source
from pipelines.torch_loader import SampleReader, decode_frames, dist_rank_world
from shards.manifest import Manifest
from shards.schema import (
    LABELS_DTYPE,
    LABELS_EXT,
    LOGMEL_EXT,
    SchemaError,
    frame_ext,
    frame_size_problem,
    parse_labels,
    parse_logmel,
    split_member_name,
)

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    _DALI_IMPORT_ERROR: ImportError | None = None
except ImportError as _err:  # the module stays importable; DaliLoader() says how to install DALI
    _DALI_IMPORT_ERROR = _err

    def pipeline_def(graph: Any) -> Any:
        return graph


log = logging.getLogger(__name__)

READER_NAME = "reader"
OUTPUT_NAMES = ["video", "audio", "labels", "source", "label_ids", "label_count"]
# DALI's errors do not name the sample: after one, at most this many samples of the rank's block are checked on the
# CPU, in reading order, to name it (a few seconds at 8 frames per sample).
SCAN_LIMIT_SAMPLES = 1024
_PIXEL_MEAN = [m * 255 for m in VIDEO_MEAN]
_PIXEL_STD = [s * 255 for s in VIDEO_STD]


@dataclass(frozen=True)
class GraphSpec:
    """What the graph of one split on one rank is built from; all of it is fixed when the pipeline is built."""

    shard_paths: tuple[str, ...]
    index_paths: tuple[str, ...]
    shard_id: int
    num_shards: int
    shuffle_buffer: int
    frames_stored: int
    frames_used: int
    frame_short_side_px: int
    fbank_frames: int
    mel_bins: int
    logmel_mean: float
    logmel_std: float
    num_classes: int
    multi_label: bool
    augment: AugmentConfig

    def frames_read(self, train: bool) -> list[int]:
        """Stored frames the reader outputs: all of them in training, the union of the test windows otherwise."""
        if train:
            return list(range(self.frames_stored))
        starts = eval_windows(self.frames_stored, self.frames_used, self.augment.num_test_clips)
        return sorted({v + i for v in starts for i in range(self.frames_used)})


@pipeline_def
def mbt_pipeline(spec: GraphSpec, train: bool, device: str) -> tuple[Any, ...]:
    """Per sample: video, audio, labels, the reader's source info of the labels member (uint8, zero-padded), and the
    stored class indices (int32, zero-padded) with their count.

    Training: video float32 (F, 3, crop, crop), audio float32 (1, audio_frames, mel_bins).
    Evaluation: video float32 (N, F, 3, crop, crop), audio float32 (N, 1, audio_frames, mel_bins), N test clips.
    Labels: float32 (C,) multi-hot for multi-label splits, else int64 () class index.
    """
    frame_ids = spec.frames_read(train)
    *jpegs, logmel, labels = fn.readers.webdataset(
        paths=list(spec.shard_paths),
        index_paths=list(spec.index_paths),
        ext=[frame_ext(i) for i in frame_ids] + [LOGMEL_EXT, LABELS_EXT],
        dtypes=[types.UINT8] * len(frame_ids) + [types.FLOAT16, types.INT32],
        missing_component_behavior="error",
        shard_id=spec.shard_id,
        num_shards=spec.num_shards,
        stick_to_shard=True,
        random_shuffle=train,
        initial_fill=spec.shuffle_buffer,
        pad_last_batch=not train,
        name=READER_NAME,
    )
    decoder = "mixed" if device == "gpu" else "cpu"
    # fancy upsampling: the GPU decoder upsamples chroma as libjpeg-turbo does on the CPU (and torchvision)
    decoded = [fn.decoders.image(j, device=decoder, output_type=types.RGB, jpeg_fancy_upsampling=True) for j in jpegs]
    frames = fn.stack(*decoded, axis_name="F")
    mel = fn.reshape(fn.cast(logmel, dtype=types.FLOAT), shape=[spec.fbank_frames, spec.mel_bins])
    if device == "gpu":
        mel = mel.gpu()
    if train:
        video, audio = train_video(frames, spec), train_audio(mel, spec)
    else:
        video, audio = eval_video(frames, spec, frame_ids), eval_audio(mel, spec)
    if spec.multi_label:
        targets = fn.reductions.sum(fn.one_hot(labels, num_classes=spec.num_classes, axis=-1), axes=[0])
    else:
        targets = fn.cast(labels[0], dtype=types.INT64)
    if device == "gpu":
        targets = targets.gpu()
    source = fn.pad(fn.get_property(labels, key="source_info"), fill_value=0)
    # The stored class indices and their count, checked on the host: DALI would one-hot -1 or 527 silently.
    return video, audio, targets, source, fn.pad(labels, fill_value=0), labels.shape()


def random_int(high: Any) -> Any:
    """int32 () per sample, uniform over [0, high); `high` an int or a per-sample DataNode, at least 1."""
    draw = dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * high)
    return fn.cast(dmath.clamp(draw, 0, high - 1), dtype=types.INT32)  # u * high can round up to high


def random_sorted_subset(total: int, size: int) -> Any:
    """int32 (size,) per sample: a uniformly random subset of range(total), ascending.

    Item i is kept when fewer than `size` random keys lie below its own; the k-th kept item is the number of items
    whose running count of kept items (inclusive) is at most k.
    """

    def count(flags: Any, axis: int) -> Any:
        return fn.reductions.sum(fn.cast(flags, dtype=types.INT32), axes=[axis])

    keys = fn.random.uniform(range=[0.0, 1.0], shape=[total])
    kept = fn.cast(
        count(fn.reshape(keys, shape=[1, total]) < fn.reshape(keys, shape=[total, 1]), 1) < size, dtype=types.INT32
    )
    upto = fn.constant(idata=np.tril(np.ones((total, total), np.int32)).ravel().tolist(), shape=[total, total])
    running = fn.reductions.sum(upto * fn.reshape(kept, shape=[1, total]), axes=[1])
    positions = fn.constant(idata=list(range(size)), shape=[1, size])
    return fn.cast(count(fn.reshape(running, shape=[total, 1]) <= positions, 0), dtype=types.INT32)


def normalize_frames(frames: Any, mirror: Any = 0) -> Any:
    """float32 (F, 3, H, W) from uint8 (F, H, W, 3): scaled to [0, 1], minus VIDEO_MEAN, over VIDEO_STD."""
    return fn.crop_mirror_normalize(
        frames, mirror=mirror, mean=_PIXEL_MEAN, std=_PIXEL_STD, dtype=types.FLOAT, output_layout="FCHW"
    )


def train_video(frames: Any, spec: GraphSpec) -> Any:
    """float32 (F, 3, crop, crop): frames_used sorted frames, one random resized crop and one flip for all of them."""
    aug = spec.augment
    if spec.frames_used < spec.frames_stored:  # all frames were decoded: DALI cannot pick reader outputs per sample
        frames = fn.sequence_rearrange(frames, new_order=random_sorted_subset(spec.frames_stored, spec.frames_used))
    crops = fn.random_resized_crop(
        frames, size=[aug.crop_px, aug.crop_px], random_area=list(aug.resize_scale),
        random_aspect_ratio=list(aug.resize_ratio),
    )  # fmt: skip
    return normalize_frames(crops, mirror=fn.random.coin_flip(probability=aug.flip_prob))


def eval_video(frames: Any, spec: GraphSpec, frame_ids: list[int]) -> Any:
    """float32 (N, F, 3, crop, crop): the torch loader's test clips: short side resized to eval_short_side_px when
    the shards' is another, centre crop at centre_crop_box (top/left rounded down), normalized."""
    aug = spec.augment
    if spec.frame_short_side_px != aug.eval_short_side_px:  # the shards' frames all have that short side
        frames = fn.resize(frames, resize_shorter=aug.eval_short_side_px)
    top_left = (frames.shape(dtype=types.INT32)[1:3] - aug.crop_px) // 2
    crops = fn.slice(frames, start=top_left, shape=[aug.crop_px, aug.crop_px], axes=[1, 2])
    starts = eval_windows(spec.frames_stored, spec.frames_used, aug.num_test_clips)
    order = [frame_ids.index(v + i) for v in starts for i in range(spec.frames_used)]
    clips = fn.sequence_rearrange(normalize_frames(crops), new_order=order)
    return fn.reshape(clips, shape=[aug.num_test_clips, spec.frames_used, 3, aug.crop_px, aug.crop_px], layout="")


def normalize_audio(window: Any, spec: GraphSpec) -> Any:
    return (window - spec.logmel_mean) / spec.logmel_std


def audio_window(mel: Any, start: Any, frames: int) -> Any:
    """(frames, mel_bins) from row `start`, zero-padded past the end (before normalization, as the torch loader)."""
    return fn.slice(mel, start=start, shape=[frames], axes=[0], out_of_bounds_policy="pad", fill_values=0)


def train_audio(mel: Any, spec: GraphSpec) -> Any:
    """float32 (1, audio_frames, mel_bins): a random window, normalized, then SpecAugment's bands set to 0."""
    aug = spec.augment
    start = random_int(max(spec.fbank_frames - aug.audio_frames, 0) + 1)
    audio = normalize_audio(audio_window(mel, fn.reshape(start, shape=[1]), aug.audio_frames), spec)
    bands = (
        (1, spec.mel_bins, aug.freq_mask_px, aug.num_freq_masks),
        (0, aug.audio_frames, min(aug.time_mask_px, aug.audio_frames), aug.num_time_masks),
    )
    for axis, extent, max_width, count in bands:
        if max_width <= 0 or count <= 0:
            continue
        widths = [random_int(max_width) for _ in range(count)]
        starts = [random_int(extent - width + 1) for width in widths]
        audio = fn.erase(
            audio, anchor=fn.cast(fn.stack(*starts), dtype=types.FLOAT),
            shape=fn.cast(fn.stack(*widths), dtype=types.FLOAT), axes=[axis], fill_value=0.0,
        )  # fmt: skip
    return fn.expand_dims(audio, axes=[0])


def eval_audio(mel: Any, spec: GraphSpec) -> Any:
    """float32 (N, 1, audio_frames, mel_bins): the torch loader's evenly spaced windows, normalized."""
    aug = spec.augment
    starts = eval_windows(spec.fbank_frames, aug.audio_frames, aug.num_test_clips)
    windows = [fn.expand_dims(audio_window(mel, [a], aug.audio_frames), axes=[0]) for a in starts]
    return normalize_audio(fn.stack(*windows), spec)


def find_bad_sample(index: SplitIndex, samples: list[int], frame_ids: list[int]) -> str | None:
    """What is wrong with the first of `samples` (indices into `index`) that cannot be read, decoded or shaped as the
    schema says, named as the torch loader names it (shard, key); None when they all read."""
    reader = SampleReader(index)
    try:
        return next(filter(None, (_sample_problem(index, reader, sample, frame_ids) for sample in samples)), None)
    finally:
        reader.close()


def _sample_problem(index: SplitIndex, reader: SampleReader, sample: int, frame_ids: list[int]) -> str | None:
    manifest = index.manifest
    features = manifest.features
    ref = index.samples[sample]
    where = f"{index.shard_paths[ref.shard].name}: sample {ref.key}"
    try:
        raw = reader.read(ref, [frame_ext(i) for i in frame_ids] + [LOGMEL_EXT, LABELS_EXT])
        for i in frame_ids:
            if problem := frame_size_problem(raw[frame_ext(i)], features.short_side_px, frame_ext(i)):
                return f"{where}: bad JPEG ({problem})"
        decode_frames([raw[frame_ext(i)] for i in frame_ids])
        parse_logmel(raw[LOGMEL_EXT], features)
        parse_labels(raw[LABELS_EXT], manifest.num_classes, manifest.multi_label)
    except LoaderError as err:
        return str(err)
    except RuntimeError as err:
        return f"{where}: bad JPEG ({err})"
    except SchemaError as err:
        return f"{where}: {err}"
    return None


def batch_problem(
    keys: list[str], audio: torch.Tensor, label_ids: np.ndarray, counts: np.ndarray, manifest: Manifest
) -> str | None:
    """What is wrong with a batch the DALI graph made, naming the key, or None: a log-mel row that is not finite
    (the torch loader refuses such samples before normalizing), or stored labels outside the schema's rules."""
    finite = torch.isfinite(audio.flatten(1)).all(dim=1)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0, 0])
        return f"sample {keys[row]}: {LOGMEL_EXT} holds NaN or infinite values"
    for row, (ids, count) in enumerate(zip(label_ids, counts, strict=True)):
        try:
            parse_labels(ids[:count].astype(LABELS_DTYPE).tobytes(), manifest.num_classes, manifest.multi_label)
        except SchemaError as err:
            return f"sample {keys[row]}: {err}"
    return None


def dali_cause(message: str) -> str:
    """The failing operator and DALI's reason from a pipeline error message, on one line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    operator = next((line.rstrip(",") for line in lines if line.startswith("Error in")), "")
    reason = lines[lines.index("encountered:") + 1] if "encountered:" in lines[:-1] else lines[0] if lines else ""
    return f"{operator}: {reason}" if operator else reason


def dali_device(device: str | torch.device) -> tuple[str, int | None]:
    """("cpu", None) or ("gpu", CUDA device id) for "cpu", "gpu", "cuda", "cuda:1" or a torch.device."""
    try:
        parsed = torch.device("cuda" if device == "gpu" else device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise LoaderError(f"device must be 'cpu', 'gpu' or a CUDA device, got {device!r}")
    if parsed.type == "cpu":
        return "cpu", None
    if not torch.cuda.is_available():
        raise LoaderError(f"device {device!r} needs CUDA; use device='cpu' or the torch loader")
    return "gpu", torch.cuda.current_device() if parsed.index is None else parsed.index


def key_of_source(source: np.ndarray) -> str:
    """The sample key from a reader's zero-padded source info, `<tar path>:<offset>:<key>.<ext>`."""
    member = source.tobytes().rstrip(b"\0").decode().rsplit(":", 1)[-1]
    return split_member_name(member)[0]


class DaliLoader:
    """Batches of one split for this rank from a DALI pipeline; the interface of `TorchLoader`.

    `for batch in loader` runs the rest of the current epoch (training) or the whole rank's part (evaluation).
    `state_dict()` is the stream position: epoch, batches consumed and, in training, DALI's pipeline checkpoint of
    this rank; `load_state_dict()` makes the next iteration continue there. `num_threads` is DALI's CPU thread
    count (default: `num_workers`, at least 1). `device` "cpu" runs the graph on the CPU; "gpu", "cuda" or a CUDA
    torch.device runs it on that CUDA device (without an index: the current one, which torchrun scripts set with
    `torch.cuda.set_device(local_rank)`) and returns the batch's tensors there. Bad samples cannot be skipped inside
    a DALI pipeline: `skip_bad_samples=True` is refused.
    """

    def __init__(
        self,
        folder: str | Path | SplitIndex | StreamSplit,
        train: bool,
        batch_size: int,
        num_workers: int = 2,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        augment: AugmentConfig | None = None,
        skip_bad_samples: bool = False,
        device: str | torch.device = "cpu",
        num_threads: int | None = None,
        shuffle_buffer: int = SHUFFLE_BUFFER_SAMPLES,
    ) -> None:
        if _DALI_IMPORT_ERROR is not None:
            raise LoaderError("nvidia-dali not installed: pip install -e '.[dali]'") from _DALI_IMPORT_ERROR
        if batch_size < 1:
            raise LoaderError(f"batch_size must be at least 1, got {batch_size}")
        if skip_bad_samples:
            raise LoaderError(
                "the DALI loader cannot skip bad samples: run tools/verify_shards.py and re-shard, "
                "or use --loader torch"
            )
        if is_stream_source(folder):
            raise LoaderError(
                "DALI's webdataset reader reads local files only: stream pipe: URLs with the PyTorch loader "
                "(--loader torch or auto), or mount the storage and pass the split's folder"
            )
        self.index = folder if isinstance(folder, SplitIndex) else SplitIndex(folder)
        self.rank, self.world_size = dist_rank_world(rank, world_size)
        self.train, self.batch_size, self.seed = train, batch_size, seed
        self.device, self.device_id = dali_device(device)
        self.num_threads = num_threads or max(num_workers, 1)
        self.augment = augment or AugmentConfig()
        if shuffle_buffer < 1:
            raise LoaderError(f"shuffle_buffer must be at least 1, got {shuffle_buffer}")
        self.spec = self._graph_spec(shuffle_buffer)
        self.epoch = 0
        self.position = 0
        self.skipped: list[str] = []  # always empty: the interface of TorchLoader, which can skip bad samples
        self._iterator: Any = None
        self._checkpoint: bytes | None = None
        self._stream_seed = self._seed_at(0, 0)
        self._pass_open = False
        self._batches_read = 0

    def _graph_spec(self, shuffle_buffer: int) -> GraphSpec:
        manifest, n = self.index.manifest, len(self.index)
        features = manifest.features
        frames_used = self.augment.frames_used or features.num_frames
        if not 1 <= frames_used <= features.num_frames:
            raise LoaderError(f"frames_used={frames_used}, but the shards hold {features.num_frames} frames")
        shard_id, num_shards = self.rank, self.world_size
        if n < num_shards:  # DALI wants a sample per shard: shard i is sample i, the one of eval_range (if any)
            shard_id, num_shards = n * self.rank // self.world_size, n
        return GraphSpec(
            shard_paths=tuple(str(p.resolve()) for p in self.index.shard_paths),
            index_paths=tuple(str(p.resolve()) for p in self.index.index_paths),
            shard_id=shard_id,
            num_shards=num_shards,
            shuffle_buffer=min(shuffle_buffer, len(eval_range(n, shard_id, num_shards))),
            frames_stored=features.num_frames,
            frames_used=frames_used,
            frame_short_side_px=features.short_side_px,
            fbank_frames=features.fbank_frames,
            mel_bins=features.num_mel_bins,
            logmel_mean=manifest.logmel.mean,
            logmel_std=manifest.logmel.std,
            num_classes=manifest.num_classes,
            multi_label=manifest.multi_label,
            augment=self.augment,
        )

    @property
    def manifest(self) -> Manifest:
        return self.index.manifest

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        n = len(self.index)
        if self.train:
            return train_batches(n, self.batch_size, self.world_size)
        return eval_batches(n, self.batch_size, self.rank, self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` at its first batch; the training stream itself just goes on."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "batches": self.position}
        checkpoint = self._iterator.checkpoints()[0] if self.train and self._iterator is not None else self._checkpoint
        if checkpoint is not None:  # DALI's serialized protobuf, as text so that the state stays JSON
            encoded = base64.b64encode(checkpoint).decode("ascii")
            state["dali"] = {"rank": self.rank, "world_size": self.world_size, "checkpoint": encoded}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at `state`: exactly where this rank's stream was when its DALI checkpoint is there; else a new
        stream seeded by the position (a warning says so), with the same epoch length."""
        self.epoch, self.position = int(state["epoch"]), int(state["batches"])
        self._iterator, self._checkpoint = None, None
        if not self.train:
            return
        saved = state.get("dali")
        if saved is not None and (saved["rank"], saved["world_size"]) == (self.rank, self.world_size):
            self._checkpoint = base64.b64decode(saved["checkpoint"])
            return
        log.warning(
            "no DALI checkpoint of rank %d of %d in the loader state: a new stream continues at epoch %d, batch %d",
            self.rank, self.world_size, self.epoch, self.position,
        )  # fmt: skip
        self._stream_seed = self._seed_at(self.epoch, self.position)

    def _seed_at(self, epoch: int, batches: int) -> int:
        return int(np.random.SeedSequence([self.seed, self.rank, epoch, batches]).generate_state(1)[0] >> 1)

    def _build(self) -> Any:
        pipe = mbt_pipeline(
            self.spec, self.train, self.device,
            batch_size=self.batch_size, num_threads=self.num_threads,
            device_id=self.device_id,
            seed=self._stream_seed, enable_checkpointing=self.train, checkpoint=self._checkpoint,
        )  # fmt: skip
        try:
            self._iterator = DALIGenericIterator(
                [pipe],
                OUTPUT_NAMES,
                reader_name=None if self.train else READER_NAME,
                last_batch_policy=LastBatchPolicy.FILL if self.train else LastBatchPolicy.PARTIAL,
                auto_reset=True,
                prepare_first_batch=False,
            )
        except RuntimeError as err:
            raise LoaderError(f"{self.index.folder}: DALI could not build the pipeline: {err}") from err
        self._checkpoint = None
        self._batches_read = 0
        return self._iterator

    def _next(self) -> dict[str, torch.Tensor] | None:
        """The next DALI batch, or None at the end of an evaluation pass; DALI's errors as LoaderError."""
        try:
            outputs = next(self._iterator)[0]
        except StopIteration:
            return None
        except RuntimeError as err:
            self._iterator = None  # a pipeline that failed cannot run on
            raise LoaderError(self._failure(str(err))) from err
        self._batches_read += 1
        return outputs

    def _failure(self, dali_message: str) -> str:
        """The error message after DALI failed: the bad sample if the first samples the reader reads name it (from
        the current batch on in evaluation, from the block's start in training), else the rank's shards."""
        block = list(eval_range(len(self.index), self.spec.shard_id, self.spec.num_shards))
        start = 0 if self.train else self._batches_read * self.batch_size
        scan = [block[(start + i) % len(block)] for i in range(min(SCAN_LIMIT_SAMPLES, len(block)))]
        found = find_bad_sample(self.index, scan, self.spec.frames_read(self.train))
        if found is not None:
            return f"{found} (DALI: {dali_cause(dali_message)})"
        first, last = (self.index.shard_paths[self.index.samples[i].shard].name for i in (block[0], block[-1]))
        return (
            f"{self.index.folder}: DALI failed on a sample of rank {self.rank}, in {first} .. {last}: {dali_message}\n"
            f"run tools/verify_shards.py {self.index.folder} to find it"
        )

    def _batch(self, outputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        keys = [key_of_source(row) for row in outputs["source"].cpu().numpy()]
        video, audio, labels = outputs["video"], outputs["audio"], outputs["labels"]
        counts = outputs["label_count"].cpu().numpy().reshape(-1)
        problem = batch_problem(keys, audio, outputs["label_ids"].cpu().numpy(), counts, self.manifest)
        if problem is not None:
            raise LoaderError(
                f"{self.index.folder}: {problem}; the DALI loader cannot skip bad samples: run "
                f"tools/verify_shards.py {self.index.folder} and re-shard, or use --loader torch --skip-bad-samples"
            )
        if self.train:
            return {
                "video": video, "audio": audio, "labels": labels, "key": keys,
                "clip_index": torch.zeros(len(keys), dtype=torch.int64, device=video.device),
            }  # fmt: skip
        clips = self.augment.num_test_clips
        return {
            "video": video.flatten(0, 1),
            "audio": audio.flatten(0, 1),
            "labels": labels.repeat_interleave(clips, dim=0),
            "key": [key for key in keys for _ in range(clips)],
            "clip_index": torch.arange(clips, dtype=torch.int64, device=video.device).repeat(len(keys)),
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.train:
            yield from self._train_epoch()
        else:
            yield from self._eval_pass()

    def _train_epoch(self) -> Iterator[dict[str, Any]]:
        if self._iterator is None:
            self._build()
        while self.position < len(self):
            outputs = self._next()
            self.position += 1
            yield self._batch(outputs)
        self.epoch, self.position = self.epoch + 1, 0

    def _eval_pass(self) -> Iterator[dict[str, Any]]:
        if not eval_range(len(self.index), self.rank, self.world_size):
            return
        if self._iterator is None or self._pass_open:  # a pass left half-way cannot be reset: start afresh
            self._build()
        self._pass_open = True
        while (outputs := self._next()) is not None:
            batch = self._batch(outputs)
            if batch["key"]:
                yield batch
        self._pass_open = False
