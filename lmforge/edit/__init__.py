"""Training-free editing from preference pairs: ProFS (the public function is `lmforge.edit`;
lmforge/__init__.py says why this file imports nothing)."""
