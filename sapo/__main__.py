import sys

from sapo.cli import main

sys.exit(main())
