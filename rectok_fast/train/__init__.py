"""Training pipelines (thin CLIs over library code): ``tokenizer`` (RecTok stage 1 / 2), ``dit``
(DiT^DH), ``stats``, ``cache_latents`` and the end-to-end ``demo``.  Each is runnable as
``python -m rectok_fast.train.<name>`` (what ``torchrun`` launches) and as ``rectok-fast <command>``."""
