"""Quantisation for deployment: fake quantisers that are exactly GGUF's block formats, the
GGUF export of a student (``kdtune export DIR --format gguf``) and torchao's converted model of
a torchao QAT run (``--format torchao``)."""
