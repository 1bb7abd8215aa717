"""Sweep job: `python jobs/sweep.py --config jobs/configs/sweep_demo.yaml`, the same options as `pipeline sweep`
(`ray job submit --working-dir . -- python jobs/sweep.py --config ...`). Re-running resumes the sweep."""

import argparse
import sys

from pipeline.cli import add_sweep_arguments, sweep_main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_sweep_arguments(parser)
    sys.exit(sweep_main(parser.parse_args()))
