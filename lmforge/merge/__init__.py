"""Model merging: mergekit YAML in, a streamed, checked model folder out (see run.py; the public function
is `lmforge.merge`, lmforge/__init__.py says why this file imports nothing)."""
