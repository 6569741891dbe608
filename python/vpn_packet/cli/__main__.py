"""`python -m vpn_packet.cli ...`: the same as the `vpn-packet` command."""

import sys

from vpn_packet.cli import main

sys.exit(main())
