"""``simpsons-ray report``: one self-contained HTML page of a labels output.

Owns: ``facts`` (each episode reduced to what the page shows, and the tables
across episodes), ``parts`` (escaped text, tables, inline SVG charts), ``assets``
(the page's style and script), ``html`` (the page) and ``build`` (read, reduce,
write: :func:`build_report`).

May import: ``core``, ``media``, ``labels``, ``query``.
"""

from simpsons_ray.report.build import ReportResult, build_report
from simpsons_ray.report.facts import DEFAULT_LOW_CONFIDENCE, DEFAULT_THUMBNAILS, ReportConfig

__all__ = ["DEFAULT_LOW_CONFIDENCE", "DEFAULT_THUMBNAILS", "ReportConfig", "ReportResult", "build_report"]
