import sys

from proxyvm.cli import main

sys.exit(main())
