"""``/usr/bin/python3 -m pxfabric.cluster ...``: the same command line as ``-m pxfabric``."""
import sys

from pxfabric.cluster.cli import main

sys.exit(main())
