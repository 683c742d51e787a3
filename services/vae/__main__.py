import sys

from services.vae.main import main

sys.exit(main())
