import sys

from llmpulse.cli import main

sys.exit(main())
