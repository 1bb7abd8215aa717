"""The nightly benchmark job: `python jobs/nightly.py --config jobs/configs/nightly_demo.yaml [--date YYYY-MM-DD]`,
the same options and exit codes as `pipeline nightly` (`pipeline.nightly.suite`)."""

import argparse
import sys

from pipeline.cli import NIGHTLY_EXIT_CODES, add_nightly_arguments, nightly_main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, epilog=NIGHTLY_EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_nightly_arguments(parser)
    sys.exit(nightly_main(parser.parse_args()))
