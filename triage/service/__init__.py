"""The daemon: wiring, the scoring worker, scheduled jobs, the drift watch and ``triage status``.

This is the serving process. It never imports torch or MONAI (import-linter
checks the imports, a test checks the running process): decoding and the
MONAI chain run in decoder processes (:mod:`triage.inference.decoders`),
inference in onnxruntime.
"""
