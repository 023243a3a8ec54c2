"""``python -m autovpn``: see autovpn.cli."""

import sys

from autovpn.cli import main

sys.exit(main())
