#!/usr/bin/env python
"""`python slurm/submit.py CONFIG [KEY=VALUE ...] --nodes N --gpus-per-node G ...`

The same as `ssl-kd submit` (see `ssl-kd submit --help`); no training logic lives here.
"""

import sys

from ssl_kd.cli import main

if __name__ == "__main__":
    sys.exit(main(["submit", *sys.argv[1:]]))
