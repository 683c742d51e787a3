import sys

from services.orchestrator.main import main

sys.exit(main())
