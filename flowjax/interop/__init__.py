"""Weights in and out of flowjax: PyTorch teachers in, safetensors out."""
