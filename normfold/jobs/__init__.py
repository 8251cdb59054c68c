"""Jobs: the orchestration above the passes, one module per job.

:mod:`.optimize` (load → exact passes → check → verify → save), :mod:`.inspect` (what optimize
would do, nothing written), :mod:`.collapse` (the approximate ONNX layer collapse) and
:mod:`.common`, what they share (the working copy, the output check, the report's model
summary). The public entry points stay ``normfold.optimize``, ``normfold.inspect`` and
``normfold.verify``; the CLI (:mod:`normfold.cli`) is a shell over these.
"""
