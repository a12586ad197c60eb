"""`accelerate launch vae_dist/train.py ...` and `python -m vae_dist.train ...`: how runs have always
been started. The program is vae-train (vae_dist.cli.train); this file only hands over to it.

    accelerate launch vae_dist/train.py --config mnist data.root=../shared/data
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file: Python put vae_dist/ itself on sys.path, where our module names (data, model, ...)
    # could shadow installed packages. Use the folder above it, so `import vae_dist` finds this copy.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from vae_dist.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
