import sys

from tfrecords_builder.cli import main

sys.exit(main())
