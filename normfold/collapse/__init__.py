"""The arithmetic of TLC layer collapse, shared by the torch driver and the ONNX pass.

Torch-free on purpose (numpy float64 only): ``normfold.passes.collapse`` must run for users who
installed normfold without torch. :mod:`.scores` says, per channel, how far an activation is from
linear and what to replace it with; :mod:`.merge` composes linear layers exactly; :mod:`.job` is
the ``normfold collapse IN.onnx`` job.
"""
