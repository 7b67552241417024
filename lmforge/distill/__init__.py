"""Distillation: teacher to smaller student through the one training loop (see run.py; the public
function is `lmforge.distill`, lmforge/__init__.py says why this file imports nothing)."""
