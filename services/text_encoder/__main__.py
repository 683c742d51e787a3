import sys

from services.text_encoder.main import main

sys.exit(main())
