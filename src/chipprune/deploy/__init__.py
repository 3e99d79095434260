"""Deployment: export to ONNX and TorchScript, checked against PyTorch."""
