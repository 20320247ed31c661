"""``python -m fused_ema.examples.digits``: the digits example's command line."""

import sys

from fused_ema.examples.digits import main

sys.exit(main())
