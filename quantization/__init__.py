"""Quantisation for deployment: fake quantisers that are exactly GGUF's block formats, and the
GGUF export of a student (``kdtune export DIR --format gguf``)."""
