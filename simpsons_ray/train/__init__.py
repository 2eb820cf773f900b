"""Training on Ray Train, and scoring a trained model: ``simpsons-ray train`` and ``simpsons-ray evaluate``.

Owns: ``config`` (TrainConfig: every setting with its default and its help),
``recipe`` (optimizer, LR schedule, mixing, weight averaging), ``steps`` (plain
PyTorch: one epoch, evaluation), ``state`` (checkpoints), ``worker`` (the Ray Train
loop), ``driver`` (``train``), ``results`` (the artifact's scores and pictures),
``datasets`` (Kaggle layouts and splits), ``training_set`` (the ``--data`` roots
pooled, frames of nobody, the split), ``parent`` (the ``--init-from`` model: its
settings, its head grown, the lineage), ``data`` (decoding on Ray Data, batches
on the workers), ``compose`` (frames of 0-3 characters), ``evaluation``.

May import: ``core``, ``media``, ``model``.
"""
