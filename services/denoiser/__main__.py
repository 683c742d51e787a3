import sys

from services.denoiser.main import main

sys.exit(main())
