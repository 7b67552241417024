"""Fine-tuning: SFT (full and LoRA), DPO/IPO, hyperparameter search (the public functions are
`lmforge.finetune`, `lmforge.dpo` and `lmforge.tune`; lmforge/__init__.py says why this file imports nothing)."""
