"""The M2F-D pipeline: Ray and Dagster wiring over the pure extractors/ and models/."""
import os

# Intel MKL (torch's CPU BLAS) promises results that are identical run to run, for a fixed thread count,
# only in its conditional numerical reproducibility mode; without it a multithreaded routine may order
# its sums differently from one run to the next. "AUTO" keeps the fastest code path for the CPU (on this
# project's x86_64 test machine the weights it trains are bit-equal to the default's). It is read at
# MKL's first call, so setting it here (every entry point, Ray worker and Dagster code location imports
# this package before any torch computation) is early enough; a value set by the user is kept.
os.environ.setdefault("MKL_CBWR", "AUTO")
