"""Same as `ssl-kd eval knn`: see `python eval/knn.py --help`."""

import sys

from ssl_kd.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "knn", *sys.argv[1:]]))
