"""``python -m simpsons_ray.cli``: the ``simpsons-ray`` command."""

import sys

from simpsons_ray.cli import main

sys.exit(main())
