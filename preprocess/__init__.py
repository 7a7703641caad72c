"""Offline stage: ffmpeg decoding, log-mel features, dataset readers and the WebDataset shard writer."""
