"""``python -m ros2_cbpnet.tools.bench`` = ``cbpnet-bench``."""
import sys

from .cli import main

sys.exit(main())
