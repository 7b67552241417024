"""Model merging: mergekit YAML in, a streamed, checked model folder out (see run.py).

The package is callable: `lmforge.merge(config, out, ...)` works whether the name holds the lazy public
function or this package (see lmforge/callable_package.py).
"""

from lmforge.callable_package import forward_calls

forward_calls(__name__, "lmforge.merge.run:merge")
