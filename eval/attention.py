"""Same as `ssl-kd eval attention`: see `python eval/attention.py --help`."""

import sys

from ssl_kd.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "attention", *sys.argv[1:]]))
