"""Torch-free float64 arithmetic shared by the ONNX passes and the torch side.

No graph and no module here: weights in, weights out, testable on their own (the shape of
``torch.nn.utils.fusion.fuse_conv_bn_weights``). :mod:`.batchnorm` folds BatchNorm and other
per-channel affine maps into linear ops; :mod:`.padding` is the one rule for a Conv's zero
padding (ONNX ``auto_pad``/``pads``, torch ``padding``); :mod:`.conv_merge` composes linear
layers (conv∘conv, shortcuts) exactly; :mod:`.branches` turns parallel branches into one kernel;
:mod:`.collapse_scores` scores how far an activation is from linear (TLC layer collapse);
:mod:`.paired_accuracy` is the sampling error of an accuracy difference on one evaluation set;
:mod:`.fold_precision` decides whether a fold's weights survive the cast to float16/bfloat16
(overflow, underflow, precision against the unfolded site). New math goes here. Callers cast
the results once to the model's dtype.

A condition that makes a site impossible to rewrite exactly (a constant that is not per
channel, a shortcut whose taps miss the kernel) raises :class:`normfold.errors.Refusal` with
the reason, which the pass reports; ``ValueError`` is kept for calls that are a bug.
"""
