"""`python -m vpn_packet ...`: the same as the `vpn-packet` command."""

import sys

from vpn_packet.cli import main

sys.exit(main())
