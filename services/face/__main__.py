import sys

from services.face.main import main

sys.exit(main())
