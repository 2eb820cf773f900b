"""simpsons-ray: which Simpsons characters are on screen in every frame.

Rooms: ``storage`` (URIs), ``datasets`` (Kaggle layouts), ``preprocess``,
``model`` (ResNet + artifact), ``training`` (Ray Train), ``evaluation``,
``frames`` and ``labeling`` (Ray Data), ``schema`` (labels Parquet),
``query``, ``plots``, ``cli``.
"""

__version__ = "0.1.0"
