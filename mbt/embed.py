"""Video tokenisers other than the per-frame patches of `mbt.model.Tower`.

TubeletEmbed is scenic's `3d_conv` temporal encoding (ViViT, MBT-B/16x2): one Conv3d over non-overlapping tubelets
of `tubelet_frames` frames x patch x patch pixels, its tokens in (time, row, column) order, to which the tower adds
one learned position embedding over all of them (no separate temporal embedding).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn


class TubeletEmbed(nn.Module):
    """video (B, F, 3, H, W) → tokens (B, T'·H'·W', D), T' = F / tubelet_frames, H' = H / patch, W' = W / patch,
    token index t·H'·W' + h·W' + w (scenic's reshape of its (B, T', H', W', D) convolution output)."""

    def __init__(self, img_size: int, patch_size: int, num_frames: int, tubelet_frames: int, embed_dim: int) -> None:
        super().__init__()
        kernel = (tubelet_frames, patch_size, patch_size)
        self.proj = nn.Conv3d(3, embed_dim, kernel, stride=kernel)
        self.grid_size = (num_frames // tubelet_frames, img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        tubelets = self.proj(rearrange(video, "b f c h w -> b c f h w"))
        if tuple(tubelets.shape[2:]) != self.grid_size:  # its position embedding has this grid's tokens alone
            raise ValueError(
                f"video of {video.shape[1]} frames of {video.shape[3]}x{video.shape[4]} makes a tubelet grid "
                f"{tuple(tubelets.shape[2:])}, but the model's is {self.grid_size}"
            )
        return rearrange(tubelets, "b d t h w -> b (t h w) d")


def central_frame_kernel(kernel_2d: torch.Tensor, tubelet_frames: int) -> torch.Tensor:
    """A Conv3d weight (D, C, tubelet_frames, kh, kw) that sees only the tubelet's central frame (index
    tubelet_frames // 2) through the 2D patch kernel (D, C, kh, kw): scenic's `central_frame_initializer` for
    initialising a tubelet embedding from an image ViT."""
    out = kernel_2d.new_zeros(kernel_2d.shape[0], kernel_2d.shape[1], tubelet_frames, *kernel_2d.shape[2:])
    out[:, :, tubelet_frames // 2] = kernel_2d
    return out
