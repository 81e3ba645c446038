"""``python -m gpusaver.cli``: the same as the ``gpusaver`` command."""
import sys

from gpusaver.cli import main

sys.exit(main())
