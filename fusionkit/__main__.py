"""`python -m fusionkit ...` is the `fusionkit` command."""

import sys

from .cli import main

sys.exit(main())
