"""``python -m gpusaver``: the same as the ``gpusaver`` command."""
import sys

from gpusaver.cli import main

sys.exit(main())
