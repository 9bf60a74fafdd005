import sys

from camae.cli import main

sys.exit(main())
