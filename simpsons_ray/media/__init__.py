"""What a frame's bytes are and where they come from: image files, tar archives, video files, and ``source`` strings.

Owns: ``images`` (decode any image safely: bombs, truncation, odd modes),
``archives`` (tar and tar.gz read as streams), ``video`` (probe, time ranges,
decoding sampled frames, seeking to one frame) and ``sources`` (the ``source``
column's forms: a file, ``<archive>#<member>``, ``<video>#t=<seconds>``).
Labeling reads episodes through it; the thumbnails of the report and the
contact sheets read single frames back through it.

May import: ``core``.
"""
