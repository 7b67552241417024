"""Fine-tuning: SFT (full and LoRA), DPO/IPO, hyperparameter search.

The package is callable: `lmforge.finetune(config, overrides)` works whether the name holds the lazy public
function or this package (see lmforge/callable_package.py).
"""

from lmforge.callable_package import forward_calls

forward_calls(__name__, "lmforge.finetune.sft:finetune")
