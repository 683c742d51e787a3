import sys

from services.safety.main import main

sys.exit(main())
