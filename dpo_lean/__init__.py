"""dpo-lean: DPO with the reference model run once into a Parquet cache, then a 4-bit LoRA policy trained alone.

Where things are (docs/design.md has the table; imports only go down it): ``cli`` -> the commands (``precompute``,
``train``, ``evaluate``, ``sweep``, ``export``, ``data_check``, ``demo``) -> ``scoring`` -> ``layout`` (prefix sharing)
-> ``modeling``, ``adapters``, ``logprobs``, ``objective`` -> ``losses/`` -> ``cache``, ``data/prepared``,
``fingerprint`` -> ``data/`` (load -> normalise -> template/tokenise) -> ``config`` -> ``storage``, ``measure``,
``launch``, ``errors``.
"""

__version__ = "0.1.0"
