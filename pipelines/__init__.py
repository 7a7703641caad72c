"""Streaming pipelines (DALI and PyTorch WebDataset) over the shards written by `preprocess`."""
