"""The DALI loader: one `@pipeline_def` graph over the WebDataset shards of a split, for training and evaluation,
on the CPU (`device="cpu"`: tests, machines without a GPU) or the GPU (`device="gpu"`: JPEG decode on the GPU with
`mixed` decoding, crops, flips, normalization and SpecAugment there too). Same batches, same interface as
`pipelines.torch_loader.TorchLoader`.

Evaluation reads rank r's block of samples, `eval_range(N, r, W)` in shard order (the reader's `shard_id=r` of
`num_shards=W`, stuck to it), pads its last batch and drops the padding (`LastBatchPolicy.PARTIAL`), so every sample
is read once across ranks; each sample becomes `num_test_clips` rows with the torch loader's windows, crop and
normalization (the JPEG decoder is DALI's: see tests/pipelines/test_dali_loader.py for the measured difference).

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
from typing import Any

import numpy as np
import torch

from pipelines.augment import apply_color_normalized
from pipelines.config import LoaderError, LoaderOptions, frames_fed, frames_problem, logmel_norm
from pipelines.dali_graph import (
    DALI_IMPORT_ERROR,
    OUTPUT_NAMES,
    READER_NAME,
    GraphSpec,
    dali_cause,
    dali_device,
    mbt_pipeline,
    parse_source,
)
from pipelines.order import eval_batches, eval_range, train_batches
from pipelines.reading import HeaderCheck, SampleReader
from pipelines.sources import Split, SplitIndex, StreamSplit
from pipelines.transforms import decode_members
from shards.manifest import Manifest
from shards.schema import (
    LABELS_DTYPE,
    LABELS_EXT,
    LOGMEL_EXT,
    SchemaError,
    frame_ext,
    parse_labels,
)

if DALI_IMPORT_ERROR is None:
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

log = logging.getLogger(__name__)

# DALI's errors do not name the sample: after one, at most this many samples of the rank's block are checked on the
# CPU, in reading order, to name it (a few seconds at 8 frames per sample).
SCAN_LIMIT_SAMPLES = 1024


def find_bad_sample(index: SplitIndex, samples: list[int], frame_ids: list[int]) -> str | None:
    """What is wrong with the first of `samples` (indices into `index`) that cannot be read, decoded or shaped as the
    schema says, as the torch loader names it (shard, key: `pipelines.transforms.decode_members`); None when they
    all read."""
    reader = SampleReader(index)
    exts = [frame_ext(i) for i in frame_ids] + [LOGMEL_EXT, LABELS_EXT]
    try:
        for sample in samples:
            ref = index.samples[sample]
            try:
                raw = reader.read(ref, exts)
                decode_members(f"{index.shard_paths[ref.shard].name}: sample {ref.key}", raw, frame_ids, index.manifest)
            except LoaderError as err:
                return str(err)
    finally:
        reader.close()
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

    def __init__(self, split: Split, train: bool, batch_size: int, **options: Any) -> None:
        if DALI_IMPORT_ERROR is not None:
            raise LoaderError("nvidia-dali not installed: pip install -e '.[dali]'") from DALI_IMPORT_ERROR
        if isinstance(split, StreamSplit):
            raise LoaderError(
                "DALI's webdataset reader reads local files only: stream pipe: URLs with the PyTorch loader "
                "(--loader torch or auto), or mount the storage and pass the split's folder"
            )
        if not isinstance(split, SplitIndex):
            raise TypeError(f"DaliLoader reads a split object: pass pipelines.open_split({split!r})")
        self.options = opts = LoaderOptions.resolve(train, batch_size, **options)
        if opts.skip_bad_samples:
            raise LoaderError(
                "the DALI loader cannot skip bad samples: run tools/verify_shards.py and re-shard, "
                "or use --loader torch"
            )
        self.index = split
        self.rank, self.world_size = opts.rank, opts.world_size
        self.train, self.batch_size, self.seed = train, batch_size, opts.seed
        self.device, self.device_id = dali_device(opts.device)
        self.num_threads = opts.num_threads or max(opts.num_workers, 1)
        self.augment = opts.augment
        shuffle_buffer = opts.shuffle_buffer
        self.spec = self._graph_spec(shuffle_buffer)
        # DALI reads payloads at the index's offsets without their tar headers: each sample's are checked once.
        exts = [frame_ext(i) for i in self.spec.frames_read(train)] + [LOGMEL_EXT, LABELS_EXT]
        self._headers = HeaderCheck(split, exts, by_ext=LABELS_EXT)
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
        if problem := frames_problem(self.augment, features):
            raise LoaderError(problem)
        frames_used = frames_fed(self.augment, features.num_frames)
        shard_id, num_shards = self.rank, self.world_size
        if n < num_shards:  # DALI wants a sample per shard: shard i is sample i, the one of eval_range (if any)
            shard_id, num_shards = n * self.rank // self.world_size, n
        return GraphSpec(
            shard_paths=tuple(str(p.resolve()) for p in self.index.shard_paths),
            index_paths=tuple(str(p.resolve()) for p in self.index.index_paths),
            shard_id=shard_id,
            num_shards=num_shards,
            shuffle_buffer=min(shuffle_buffer, len(eval_range(n, shard_id, num_shards))),
            features=features,
            frames_used=frames_used,
            logmel_mean=logmel_norm(self.augment, manifest.logmel)[0],
            logmel_std=logmel_norm(self.augment, manifest.logmel)[1],
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
        sources = [parse_source(row) for row in outputs["source"].cpu().numpy()]
        keys = [key for _, _, key in sources]
        video, audio, labels = outputs["video"], outputs["audio"], outputs["labels"]
        counts = outputs["label_count"].cpu().numpy().reshape(-1)
        try:
            self._headers.check([(path, offset) for path, offset, _ in sources])
            problem = batch_problem(keys, audio, outputs["label_ids"].cpu().numpy(), counts, self.manifest)
        except LoaderError as err:
            problem = str(err)
        if problem is not None:
            raise LoaderError(
                f"{self.index.folder}: {problem}; the DALI loader cannot skip bad samples: run "
                f"tools/verify_shards.py {self.index.folder} and re-shard, or use --loader torch --skip-bad-samples"
            )
        if self.train:
            video = apply_color_normalized(video, outputs["color"].cpu(), dim=2)
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
