"""dpo-lean: DPO with the reference model run once into a Parquet cache, then a 4-bit LoRA policy trained alone."""

__version__ = "0.1.0"
