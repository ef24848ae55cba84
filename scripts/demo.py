"""pxfabric demo: grows with the project (see README)."""
import sys

print("pxfabric: core library built; the controller demo arrives with pxcontroller.")
sys.exit(0)
