import sys

from replicad.cli import main

sys.exit(main())
