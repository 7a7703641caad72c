"""The Multimodal Bottleneck Transformer: model, training and evaluation."""
