"""``simpsons-ray demo``: train, label, query and report end to end on generated pictures; and those pictures.

Owns: ``synthetic`` (characters as coloured shapes, scenes, frame dumps; the tests
use them too) and ``run`` (the demo itself).

May import: every stage below ``cli``.
"""
from simpsons_ray.demo.run import DemoConfig, run_demo

__all__ = ["DemoConfig", "run_demo"]
