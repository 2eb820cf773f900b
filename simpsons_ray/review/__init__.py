"""Closing the loop: frames the model is unsure of go to people, and their answers come back as training data.

``export`` picks frames of a labels output (the most uncertain, a random sample, or
one character's weakest) spread over episodes and shots, and writes them for Label
Studio (pictures, tasks with the model's answer, a labeling config) or as one
folder per answer; ``trainingset`` reads the reviews back (Label Studio's JSON
export, or the folders after a person moved pictures between them) and writes a
training folder that ``simpsons-ray train`` reads.

Owns: ``picks`` (a key per frame, and the order spread over episodes and shots),
``candidates`` (reading a labels output for a pick), ``manifest`` (export.json, the
exported frames, their names), ``reviews`` (what people said, and when it is clear),
``labelstudio`` and ``folders`` (the two formats, out and back), ``export`` (``review
export``) and ``trainingset`` (``review import``).

May import: ``core``, ``media``, ``model``, ``labels``, ``query``.
"""

from simpsons_ray.review.export import DEFAULT_LIMIT, DEFAULT_MIN_GAP_S, ExportConfig, ExportResult, run_export
from simpsons_ray.review.manifest import FORMATS, NOBODY
from simpsons_ray.review.picks import KINDS
from simpsons_ray.review.trainingset import ImportConfig, ImportResult, run_import

__all__ = ["DEFAULT_LIMIT", "DEFAULT_MIN_GAP_S", "FORMATS", "KINDS", "NOBODY", "ExportConfig", "ExportResult", "ImportConfig",
           "ImportResult", "run_export", "run_import"]
