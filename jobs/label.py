"""Entrypoint for `ray job submit -- python jobs/label.py ...`: the flags of `simpsons-ray label`."""

import os
import sys

# Under `ray job submit --working-dir .` the package sits beside jobs/, not installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from simpsons_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
