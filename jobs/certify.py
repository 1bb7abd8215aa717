"""Certification job: `python jobs/certify.py --config jobs/configs/demo.yaml`, the same options as
`pipeline certify`."""

import argparse
import sys

from pipeline.cli import CERTIFY_EPILOG, add_certify_arguments, certify_main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, epilog=CERTIFY_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_certify_arguments(parser)
    sys.exit(certify_main(parser.parse_args()))
