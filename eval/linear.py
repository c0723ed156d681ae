"""Same as `ssl-kd eval linear`: see `python eval/linear.py --help`."""

import sys

from ssl_kd.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "linear", *sys.argv[1:]]))
