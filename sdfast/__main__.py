import sys

from sdfast.cli import main

sys.exit(main())
