"""``/usr/bin/python3 -m pxfabric start|stop|list ...``: the ``pxcluster`` command line."""
import sys

from pxfabric.cluster import main

sys.exit(main())
