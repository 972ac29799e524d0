"""EnSiam pretraining: SimSiam with K views pulled towards the mean of their projections.

Importing the package sets how long an idle OpenMP thread of torch spins before it sleeps, because
libgomp reads that once, when torch loads it: see ``runtime.py`` ("Spin-wait").
"""

import os as _os

# libgomp's default without OMP_WAIT_POLICY is 300,000 spins (GCC manual, GOMP_SPINCOUNT); a setting
# of the user's (either variable) wins.
OPENMP_SPIN_COUNT = "20000"
if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & _os.environ.keys():
    _os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT
