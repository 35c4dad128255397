import sys

from gradsign.cli import main

sys.exit(main())
