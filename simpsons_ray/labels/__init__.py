"""What labeling writes and querying reads: the labels' schema, the output's layout, the frames behind the rows.

Owns: ``schema`` (the Parquet columns), ``layout`` (where every file of an output
lives) and ``thumbnails`` (the pictures of rows, read back from their sources).

May import: ``core``, ``media``.
"""
