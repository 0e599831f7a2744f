"""The lean side: loads an engine dir and generates images with numpy, onnxruntime, tokenizers and Pillow.

Nothing under this package imports torch, diffusers or transformers (tests/test_lean_runtime.py proves it).
"""
