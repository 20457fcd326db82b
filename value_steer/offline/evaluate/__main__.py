"""``python -m value_steer.offline.evaluate``: the same as ``value-steer eval``."""

import sys

from value_steer.offline.evaluate import main

sys.exit(main())
