"""Labeling whole episodes on Ray Data: ``simpsons-ray label``.

Owns: ``config`` (LabelConfig), ``run`` (one labeling job: inputs, what is left to
do, the summary), ``resources`` (Ray, GPUs, the predictor pool), ``pipeline`` (the
Ray Dataset and its driver loop), ``completion`` (when an episode's rows are all in),
``episodes`` (what an episode is), ``ingest`` (read and decode tasks, no torch),
``predictor`` (the model in an actor), ``commit`` (rows land exactly once) and
``leases`` (one live job per episode on a shared output).

May import: ``core``, ``media``, ``model``, ``labels``.
"""
