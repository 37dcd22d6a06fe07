"""mixtune: fine-tune Mixtral-style mixture-of-experts models (SFT, then DPO)."""

__version__ = "0.1.0"
