"""The network and what it is scored by: ResNet and its artifact, preprocessing, calibration, metrics.

Owns: ``network`` (the ResNet, its head, freezing, BatchNorm folding),
``artifact`` (a trained model on disk or S3: weights, config, classes), ``preprocess``
(the one place images become model input, for training and labeling alike),
``calibration`` (temperature scaling, ECE), ``metrics`` (accuracy, F1, confusion
matrix) and ``multilabel`` (thresholds and set metrics of a sigmoid per character).

May import: ``core``, ``media``.
"""
