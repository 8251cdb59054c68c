"""Torch-free float64 arithmetic shared by the ONNX passes and the torch side.

No graph and no module here: weights in, weights out, testable on their own (the shape of
``torch.nn.utils.fusion.fuse_conv_bn_weights``). :mod:`.batchnorm` folds BatchNorm and other
per-channel affine maps into linear ops; :mod:`.conv_merge` composes linear layers (conv∘conv,
shortcuts) exactly; :mod:`.collapse_scores` scores how far an activation is from linear (TLC
layer collapse); :mod:`.fold_precision` decides whether a fold's weights survive the cast to
float16/bfloat16 (overflow, underflow, precision against the unfolded site). New math goes here. Callers cast the results once to the model's dtype.
"""
