"""``python -m moequant.verify CHECKPOINT [--reference DIR] [--json]``."""

import sys

from moequant.verify import main

sys.exit(main())
