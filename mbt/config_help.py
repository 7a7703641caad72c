"""What `python -m mbt.train --help` prints: the program, its options, and every setting with its type, its value as
resolved from what was given before `--help` (the preset, config files, flags) and a description (`FLAG_HELP`, one
per setting: a test fails on a setting without one)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mbt.config_io import keys_help

USAGE = """usage: python -m mbt.train [--preset NAME] [--config FILE.yaml ...] [--KEY VALUE ...] [--print-config]
       torchrun [--nnodes N --node-rank I --rdzv-endpoint HOST:PORT] --nproc-per-node G -m mbt.train ...

Train MBT (the Multimodal Bottleneck Transformer) on video+audio shards, in one process or under torchrun; run the
same command again to resume from the run folder's last checkpoint.

options:
  --preset NAME       {presets} (default demo): the settings everything else overrides
  --config FILE.yaml  settings from a YAML file (repeatable; config.yaml of a run reloads it), over the preset
  --print-config      print the resolved settings as YAML and exit without starting a run
  -h, --help          this help; give --preset (and --config, flags) first to see their resolved values

settings: --KEY VALUE or --KEY=VALUE ('-' reads as '_'); values: numbers, true/false, none, comma lists for tuples.
Each: --key (type) value resolved from {given}, then what it sets."""

FLAG_HELP = {
    "model.num_classes": "classes of the head (custom preset: taken from the training split's manifest)",
    "model.fusion": "bottleneck (MBT), cross (vanilla cross-attention), late, or video / audio (one tower)",
    "model.fusion_layer": "Lf: the first layer where the towers fuse (0..depth; layers below run per modality)",
    "model.num_bottlenecks": "B: shared bottleneck tokens between the towers",
    "model.cls_bottleneck": "pool cls: one bottleneck token more than num_bottlenecks (scenic); false: exactly B",
    "model.test_with_bottlenecks": "evaluate with the bottleneck (scenic's default); false: towers apart at test time",
    "model.pool": "cls (each tower's CLS token, logits averaged) or gap / gmp / gsp (mean / max / sum of all tokens)",
    "model.embed_dim": "channels of both towers (ViT-B: 768)",
    "model.depth": "transformer blocks per tower (ViT-B: 12)",
    "model.num_heads": "attention heads per block (ViT-B: 12)",
    "model.mlp_ratio": "MLP hidden width as a multiple of embed_dim",
    "model.num_frames": "video frames per clip the model sees",
    "model.img_size": "video input side in pixels; augment.crop_px follows it when only this is given",
    "model.patch_size": "patch side in pixels and log-mel bins",
    "model.audio_frames": "log-mel frames the model hears; augment.audio_frames follows it when only this is given",
    "model.num_mel_bins": "log-mel bins per frame (the shards': 128)",
    "model.audio_patch_stride": "stride of the audio patches (16: no overlap; AST overlaps with 10)",
    "model.video_embed": "frame (per-frame patches + temporal embedding) or tubelet (scenic's 3D tubelets)",
    "model.tubelet_frames": "frames per tubelet with video_embed tubelet",
    "model.gelu": "exact (timm) or tanh (flax, scenic) GELU",
    "model.drop_rate": "dropout after embeddings and in MLPs",
    "model.attn_drop_rate": "dropout of attention weights",
    "model.drop_path_rate": "stochastic depth, rising linearly to this over the blocks (MBT recipe: 0.3)",
    "model.drop_path_scale": "stochastic depth rescales a kept branch by 1/(1-p) (timm); false: unscaled (scenic)",
    "model.grad_checkpointing": "recompute each block in the backward pass: less memory, more time",
    "augment.crop_px": "training and evaluation crop side in pixels (follows model.img_size)",
    "augment.frames_used": "frames per clip, one from each equal part of its audio window (none: all stored)",
    "augment.frame_sampling": "spread (one frame per equal part of the audio window) or consecutive (scenic's DMVR)",
    "augment.frame_stride": "consecutive: stored frames between two used ones (scenic: 2 of 25 fps)",
    "augment.video_crop": "scale_jitter (scenic) or inception (random resized crop, AST/timm)",
    "augment.scale_jitter": "scale_jitter: each axis scaled by U(low, high) before the random crop",
    "augment.resize_scale": "inception: area fraction range of the random resized crop",
    "augment.resize_ratio": "inception: aspect ratio range of the random resized crop",
    "augment.flip_prob": "probability of a horizontal flip in training",
    "augment.color_prob": "probability of colour augmentation (DMVR) in training",
    "augment.color_drop_prob": "probability of grey scale in training",
    "augment.eval_short_side_px": "evaluation: frames resized to this short side, then centre-cropped",
    "augment.audio_frames": "log-mel frames cut from each clip (follows model.audio_frames)",
    "augment.audio_pad": "a window past the clip's log-mel: zeros, or repeat the clip from its start (scenic)",
    "augment.freq_mask_px": "SpecAugment: frequency masks of width U[0, this) bins",
    "augment.time_mask_px": "SpecAugment: time masks of width U[0, this) frames",
    "augment.num_freq_masks": "SpecAugment: frequency masks per clip",
    "augment.num_time_masks": "SpecAugment: time masks per clip",
    "augment.num_test_clips": "evaluation: evenly spaced synchronized clips per sample, logits averaged",
    "augment.mixup_alpha": "mixup Beta(alpha, alpha), one lambda for both modalities; 0: off",
    "augment.logmel_mean": "log-mel normalization mean (none: the training split's manifest's)",
    "augment.logmel_std": "log-mel normalization std (none: the training split's manifest's)",
    "train_shards": "training split: folder, brace pattern of folders or shards, or pipe:/file: URLs (streamed)",
    "eval_shards": "evaluation split, as train_shards; empty: no evaluation during training",
    "shuffle_buffer": "training samples shuffled in memory per rank (DALI reader, streamed splits)",
    "loader": "auto (DALI on CUDA when it imports, else PyTorch), dali or torch",
    "num_workers": "loader workers per rank (DALI: threads)",
    "batch_size": "global batch: over all ranks and gradient accumulation steps",
    "eval_batch_size": "samples per rank per evaluation batch (each with num_test_clips clips)",
    "grad_accum": "micro-batches accumulated per optimizer step",
    "skip_bad_samples": "skip (and count) samples that cannot be decoded instead of stopping",
    "init_video": "ViT checkpoint (.npz or timm .pth) for the video tower; none: random",
    "init_audio": "ViT checkpoint (.npz or timm .pth) for the audio tower; none: random",
    "init": "scenic (restore the ViT files as scenic's code does), vit (every tensor), or none (from scratch)",
    "init_required": "refuse to train without the ViT files unless init is none (the audioset/vggsound recipe)",
    "optimizer": "sgd (momentum, the MBT recipe) or adamw",
    "lr": "peak learning rate, reached after warm-up, then cosine decay to 0",
    "momentum": "SGD momentum",
    "weight_decay": "weight decay",
    "epochs": "passes over the training split",
    "warmup_epochs": "linear warm-up length in epochs",
    "label_smoothing": "label smoothing of the targets",
    "clip_grad_norm": "gradient norm clipped to this; none or 0: no clipping",
    "clip_grad_scope": "per_rank (each rank's gradient clipped before the mean, scenic) or global (the mean)",
    "max_steps": "stop after this many optimizer steps (none: epochs decide)",
    "out_dir": "run folder: config.yaml, checkpoints/, metrics.jsonl, TensorBoard events, eval/",
    "seed": "seed of weights, augmentation and order",
    "eval_every_epochs": "evaluate every this many epochs (and at the end)",
    "checkpoint_every_steps": "save a checkpoint every this many steps (and at the end)",
    "keep_checkpoints": "checkpoints kept (the latest ones)",
    "log_every_steps": "log loss, lr and clips/s every this many steps",
    "bf16": "bf16 autocast (CUDA only)",
    "compile": "torch.compile the model",
    "sdpa_backend": "attention kernel in training: auto (PyTorch's choice) or a named SDPA backend (GPU)",
    "device": "auto (CUDA when present), cuda or cpu",
}


def help_text(cls: type, values: Mapping[str, Any], presets: tuple[str, ...], given: str) -> str:
    """The usage, the options and one entry per setting of dataclass `cls` with its value from the plain tree
    `values` (resolved from `given`, e.g. "the demo preset") and its description."""
    lines = [USAGE.format(presets=", ".join(presets), given=given), ""]
    for line in keys_help(cls, values):
        key = line.split()[0].removeprefix("--")
        lines += [line, f"      {FLAG_HELP.get(key, '')}"]
    return "\n".join(lines)
