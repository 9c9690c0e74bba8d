"""`python -m server.cli ...` runs the `refinery` command."""

import sys

from server.cli.main import main

sys.exit(main())
